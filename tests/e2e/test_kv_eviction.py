"""KV eviction (StreamingLLM sinks, H2O heavy hitters) on the paged cache, pinned to a reference
built on transformers: the same model stepped through a DynamicCache that evicts, compacts and
re-rotates the same way (same chunks, same survivors, keys re-positioned), greedy in fp32. The
engine must produce its tokens and logprobs, free the blocks it evicts, keep its KV bounded,
generate past max_model_len, and keep evicted KV out of the prefix cache."""
from __future__ import annotations

import pytest
import torch

from servelm import SamplingParams
from tests.conftest import assert_all_blocks_free, make_engine, random_prompts, run_to_completion
from tests.e2e.test_engine_vs_hf import check

BS = 4  # make_engine's block size


def _rotate_back(k: torch.Tensor, inv_freq: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """k [KVH, L, D] rotated for positions p -> for p - d (d [L])."""
    ang = d.float()[:, None] * inv_freq[None, :]  # [L, D/2]
    c, s = ang.cos()[None], ang.sin()[None]
    x1, x2 = k.chunk(2, dim=-1)
    return torch.cat([x1 * c + x2 * s, x2 * c - x1 * s], dim=-1)


def hf_evicting_greedy(model, prompt, max_new, policy, budget, sinks, recent=0):
    """transformers' greedy tokens and logprobs under the engine's eviction rule: a request
    whose cache would exceed budget + a block first shrinks to the budget (survivors moved to
    cache indices 0.., keys re-rotated), and computes at most what keeps it within that."""
    import inspect

    from transformers import DynamicCache
    cache = DynamicCache()
    # (transformers 5.2x renames past_key_values to cache)
    cache_kw = ("cache" if "cache" in inspect.signature(model.forward).parameters
                else "past_key_values")
    inv_freq = model.model.rotary_emb.inv_freq
    tokens, computed, held = list(prompt), 0, 0
    scores = torch.zeros(0, dtype=torch.float64)
    ids, lps = [], []
    while len(ids) < max_new:
        n = len(tokens) - computed
        if held > budget and held + n > budget + BS:
            if policy == "streaming":
                kept = torch.cat([torch.arange(sinks), torch.arange(held - (budget - sinks), held)])
            else:
                mid = scores[sinks:held - recent]
                top = torch.topk(mid - torch.arange(mid.shape[0]) * 1e-12,
                                 budget - sinks - recent).indices
                kept = torch.cat([torch.arange(sinks), torch.sort(top).values + sinks,
                                  torch.arange(held - recent, held)])
            d = kept - torch.arange(budget)
            for layer in cache.layers:
                layer.keys = _rotate_back(layer.keys[0][:, kept], inv_freq, d)[None]
                layer.values = layer.values[:, :, kept]
            scores = scores[kept] if policy == "h2o" else scores
            held = budget
        n = min(n, budget + BS - held)
        x = torch.tensor([tokens[computed:computed + n]])
        pos = torch.arange(held, held + n)[None]
        with torch.no_grad():
            o = model(input_ids=x, position_ids=pos, use_cache=True,
                      output_attentions=policy == "h2o", **{cache_kw: cache})
        if policy == "h2o":
            scores = torch.cat([scores, torch.zeros(n, dtype=torch.float64)])
            for a in o.attentions:  # [1, H, n, held + n]
                scores += a[0].double().sum(dim=(0, 1))
        held += n
        computed += n
        if computed == len(tokens):
            lp = torch.log_softmax(o.logits[0, -1].float(), -1)
            t = int(lp.argmax())
            ids.append(t)
            lps.append(float(lp[t]))
            tokens.append(t)
    return ids, lps


@pytest.fixture(scope="module")
def eager_llama(tiny_model_factory):
    d, model = tiny_model_factory("llama")
    model.config._attn_implementation = "eager"  # attention weights for the h2o reference
    model.model.config._attn_implementation = "eager"
    return d, model


GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=0)


@pytest.mark.parametrize("policy,kw", [
    ("streaming", dict(sink_tokens=4)),
    ("streaming", dict(sink_tokens=0)),  # the naive window
    ("h2o", dict(sink_tokens=2, kv_recent_tokens=6)),
])
def test_eviction_matches_reference(eager_llama, policy, kw):
    d, model = eager_llama
    budget = 16
    prompts = random_prompts(3, (9, 30, 47), seed=11)
    eng = make_engine(d, kv_eviction=policy, kv_eviction_budget=budget, **kw)
    outs = run_to_completion(eng, prompts, GREEDY)
    refs = [hf_evicting_greedy(model, p, 40, policy, budget, kw["sink_tokens"],
                               kw.get("kv_recent_tokens", 0)) for p in prompts]
    check(outs, refs)
    assert_all_blocks_free(eng)
    eng.core.shutdown()


def test_generation_past_max_model_len_with_constant_kv(eager_llama):
    """max_model_len 64, budget 24: a 40-token prompt generates 200 tokens; the cache never
    holds more than budget + a block, so its blocks in use stay constant once it evicts."""
    d, model = eager_llama
    eng = make_engine(d, kv_eviction="streaming", kv_eviction_budget=24, max_model_len=64)
    prompt = random_prompts(1, (40,), seed=3)[0]
    eng.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    sched = eng.core.scheduler
    held, out = [], None
    while eng.has_unfinished_requests():
        for o in eng.step():
            out = o
        if sched.running:
            held.append(len(sched.running[0].block_ids))
    assert len(out.outputs[0].token_ids) == 200 and out.outputs[0].finish_reason == "length"
    assert max(held) <= (24 + BS) // BS + 1
    ref, _ = hf_evicting_greedy(model, prompt, 200, "streaming", 24, 4)
    assert out.outputs[0].token_ids == ref
    assert_all_blocks_free(eng)
    # without max_tokens the sequence still ends at max_model_len
    outs = run_to_completion(eng, [prompt], SamplingParams(temperature=0, ignore_eos=True,
                                                           max_tokens=None))
    assert len(prompt) + len(outs[0].outputs[0].token_ids) == 64
    eng.core.shutdown()


def test_evicted_kv_stays_out_of_the_prefix_cache(eager_llama):
    """A request that evicted leaves no re-positioned block in the prefix cache: the same
    prompt again, and a longer one sharing its start, give the reference's tokens (a hit on a
    compacted block would not)."""
    d, model = eager_llama
    eng = make_engine(d, kv_eviction="streaming", kv_eviction_budget=16)
    p = random_prompts(1, (44,), seed=5)[0]
    ref = hf_evicting_greedy(model, p, 40, "streaming", 16, 4)
    for _ in range(2):
        check(run_to_completion(eng, [p], GREEDY), [ref])
    q = p + random_prompts(1, (6,), seed=6)[0]
    check(run_to_completion(eng, [q], GREEDY), [hf_evicting_greedy(model, q, 40, "streaming",
                                                                   16, 4)])
    assert eng.stats().prefix_cache_hits > 0  # the untouched first blocks were reused
    pool = eng.core.scheduler.kv.pool
    assert len(pool.cached) <= 16 // BS + 1
    eng.core.shutdown()


def test_eviction_under_preemption_and_a_batch(eager_llama):
    """Several requests at once in a small pool (preempted and recomputed, then evicting
    again), each still the reference's output: evictions fall where a request's cache reaches
    budget + a block, whatever the chunks and batches, so a recompute evicts the same tokens."""
    d, model = eager_llama
    prompts = random_prompts(4, (20, 33, 9, 41), seed=8)
    eng = make_engine(d, kv_eviction="streaming", kv_eviction_budget=16,
                      num_gpu_blocks_override=14, kv_cache_memory=None,
                      enable_prefix_caching=False)
    outs = run_to_completion(eng, prompts, GREEDY)
    assert eng.stats().num_preemptions > 0
    check(outs, [hf_evicting_greedy(model, p, 40, "streaming", 16, 4) for p in prompts])
    assert_all_blocks_free(eng)
    eng.core.shutdown()


@pytest.mark.parametrize("kw,match", [
    (dict(kv_eviction="lru"), "kv_eviction must be one of"),
    (dict(kv_eviction="streaming", kv_eviction_budget=3), "at least a block"),
    (dict(kv_eviction="streaming", kv_eviction_budget=600), "must fit in max_model_len"),
    (dict(kv_eviction="streaming", kv_eviction_budget=16, kv_recent_tokens=8), "h2o's"),
    (dict(kv_eviction="h2o", kv_eviction_budget=16, kv_recent_tokens=20), "kv_recent_tokens"),
    (dict(kv_eviction_budget=64), "need kv_eviction"),
    (dict(sink_tokens=8), "need kv_eviction"),
    (dict(kv_eviction="streaming", kv_eviction_budget=16, enable_chunked_prefill=False),
     "enable_chunked_prefill"),
])
def test_eviction_settings_refused(eager_llama, kw, match):
    d, _ = eager_llama
    with pytest.raises(ValueError, match=match):
        make_engine(d, **kw)


def test_a_request_budget_of_its_own(eager_llama):
    """kv_eviction_budget per request: each request evicts to its own budget (the reference's
    tokens at that budget), next to one on the engine's; out-of-range budgets are refused."""
    d, model = eager_llama
    eng = make_engine(d, kv_eviction="streaming", kv_eviction_budget=16)
    p = random_prompts(2, (30, 37), seed=9)
    own = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=0,
                         kv_eviction_budget=8)
    outs = run_to_completion(eng, p, [own, GREEDY])
    check(outs, [hf_evicting_greedy(model, p[0], 40, "streaming", 8, 4),
                  hf_evicting_greedy(model, p[1], 40, "streaming", 16, 4)])
    for bad in (4, 509):
        with pytest.raises(ValueError, match="kv_eviction_budget must be in"):
            eng.add_request("x", p[0], SamplingParams(kv_eviction_budget=bad))
    eng.core.shutdown()
    plain = make_engine(d)
    with pytest.raises(ValueError, match="needs an engine started with kv_eviction"):
        plain.add_request("x", p[0], SamplingParams(kv_eviction_budget=16))
    plain.core.shutdown()


@pytest.mark.parametrize("policy,parallel", [
    ("h2o", dict(tensor_parallel_size=2)),  # scores summed over the ranks' heads
    ("streaming", dict(pipeline_parallel_size=2)),  # each stage moves its layers' KV
])
def test_eviction_under_parallelism(eager_llama, policy, parallel):
    d, model = eager_llama
    kw = dict(sink_tokens=2, kv_recent_tokens=6) if policy == "h2o" else {}
    prompts = random_prompts(2, (26, 41), seed=12)
    eng = make_engine(d, kv_eviction=policy, kv_eviction_budget=16, **kw, **parallel)
    try:
        outs = run_to_completion(eng, prompts, GREEDY)
        check(outs, [hf_evicting_greedy(model, p, 40, policy, 16, kw.get("sink_tokens", 4),
                                         kw.get("kv_recent_tokens", 0)) for p in prompts])
    finally:
        eng.core.shutdown()
