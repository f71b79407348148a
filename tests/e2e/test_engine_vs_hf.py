"""Greedy output of the engine is token-identical to transformers' generate (fp32, CPU), and
the sampled tokens' logprobs agree within 1e-4, under every scheduling regime."""
from __future__ import annotations

import pytest
import torch

from servelm import SamplingParams
from tests.conftest import assert_all_blocks_free, make_engine, random_prompts, run_to_completion

# every test here runs with synchronous and with asynchronous scheduling
pytestmark = pytest.mark.usefixtures("scheduling_mode")

MAX_NEW = 32
LENGTHS = (1, 3, 7, 16, 17, 33, 64, 120)  # mixed, across block boundaries (block_size 4)


def hf_greedy(model, prompt: list[int], max_new: int = MAX_NEW):
    """(token ids, logprob of each chosen token) from HF generate; EOS ignored."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new,
                             do_sample=False, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0)
    ids = out.sequences[0, len(prompt):].tolist()
    lps = [torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(out.logits, ids)]
    return ids, lps


@pytest.fixture(scope="module")
def references(tiny_model_factory):
    cache = {}

    def get(arch, prompts):
        _, model = tiny_model_factory(arch)
        return [cache.setdefault((arch, tuple(p)), hf_greedy(model, p)) for p in prompts]
    return get


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=2)


def hf_refs(model, prompts, max_new: int = MAX_NEW):
    """transformers' greedy (token ids, logprobs) for each prompt."""
    return [hf_greedy(model, p, max_new) for p in prompts]


def check_engine(model_dir: str, model, prompts, **engine_kw) -> None:
    """An engine made with ``engine_kw`` generates transformers' greedy output (check); it and
    its worker processes are shut down after."""
    eng = make_engine(model_dir, **engine_kw)
    try:
        check(run_to_completion(eng, prompts, GREEDY), hf_refs(model, prompts))
    finally:
        eng.core.shutdown()


def check(outs, refs):
    for o, (ids, lps) in zip(outs, refs):
        c = o.outputs[0]
        assert c.token_ids == ids
        ours = [c.logprobs[i][t].logprob for i, t in enumerate(c.token_ids)]
        assert max(abs(a - b) for a, b in zip(ours, lps)) < 1e-4
        assert c.finish_reason == "length"


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "llama3-rope", "qwen2", "qwen3"])
def test_greedy_matches_hf(tiny_model_factory, references, arch):
    d, _ = tiny_model_factory(arch)
    prompts = random_prompts(8, LENGTHS, seed=1)
    eng = make_engine(d)
    outs = run_to_completion(eng, prompts, GREEDY)
    check(outs, references(arch, prompts))
    assert_all_blocks_free(eng)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_chunked_prefill_matches_hf(tiny_model_factory, references, arch):
    d, _ = tiny_model_factory(arch)
    prompts = random_prompts(8, LENGTHS, seed=2)
    eng = make_engine(d, max_num_batched_tokens=13)  # prompts split into chunks of <= 13 tokens
    outs = run_to_completion(eng, prompts, GREEDY)
    check(outs, references(arch, prompts))
    assert_all_blocks_free(eng)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prefix_cache_hits_match_hf(tiny_model_factory, references, arch):
    d, _ = tiny_model_factory(arch)
    shared = random_prompts(1, (40,), seed=3)[0]
    tails = random_prompts(8, (1, 5, 9, 2), seed=4)
    prompts = [shared + t for t in tails]
    eng = make_engine(d, max_num_seqs=2)  # later requests find the shared blocks cached
    outs = run_to_completion(eng, prompts, GREEDY)
    stats = eng.stats()
    assert stats.prefix_cache_hits > 0
    assert sum(o.num_cached_tokens for o in outs) > 0
    check(outs, references(arch, prompts))
    # a second round: everything but the last token of each prompt can come from the cache
    outs2 = run_to_completion(eng, prompts, GREEDY, ids=[f"again{i}" for i in range(8)])
    check(outs2, references(arch, prompts))
    assert eng.stats().prefix_cache_hits > stats.prefix_cache_hits
    assert_all_blocks_free(eng)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_preemption_matches_hf(tiny_model_factory, references, arch):
    d, _ = tiny_model_factory(arch)
    prompts = random_prompts(8, LENGTHS, seed=5)
    # 60 blocks of 4 tokens: the longest sequence (120 + 32) needs 38, so requests must take turns
    eng = make_engine(d, num_gpu_blocks_override=60, enable_prefix_caching=False)
    outs = run_to_completion(eng, prompts, GREEDY)
    assert eng.stats().num_preemptions > 0
    check(outs, references(arch, prompts))
    assert_all_blocks_free(eng)


def test_n_greater_than_one_shares_prompt_blocks(tiny_model_factory, references):
    d, _ = tiny_model_factory("llama")
    prompts = random_prompts(3, (37, 12, 64), seed=6)
    eng = make_engine(d)
    outs = run_to_completion(eng, prompts, SamplingParams(n=3, temperature=0, max_tokens=MAX_NEW,
                                                         ignore_eos=True, logprobs=0))
    refs = references("llama", prompts)
    for o, (ids, _) in zip(outs, refs):
        assert [c.index for c in o.outputs] == [0, 1, 2]
        assert all(c.token_ids == ids for c in o.outputs)
    # the 2nd and 3rd samples of each prompt reuse the first one's full prompt blocks
    assert eng.stats().prefix_cache_hits >= 2 * sum((len(p) - 1) // 4 * 4 for p in prompts)
    assert_all_blocks_free(eng)


def test_sampled_n_outputs_differ_and_are_seeded(tiny_model_factory):
    d, _ = tiny_model_factory("llama")
    prompt = random_prompts(1, (10,), seed=7)
    sp = SamplingParams(n=4, temperature=1.0, seed=42, max_tokens=16, ignore_eos=True)
    a = run_to_completion(make_engine(d), prompt, sp)[0]
    b = run_to_completion(make_engine(d), prompt, sp)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1


def test_repetition_penalty_matches_hf(tiny_model_factory):
    d, model = tiny_model_factory("llama")
    prompts = random_prompts(4, (5, 20), seed=8)
    eng = make_engine(d)
    outs = run_to_completion(eng, prompts, SamplingParams(temperature=0, max_tokens=24,
                                                         ignore_eos=True, repetition_penalty=1.3))
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), max_new_tokens=24,
                                 do_sample=False, repetition_penalty=1.3, pad_token_id=0)
        assert o.outputs[0].token_ids == ref[0, len(p):].tolist()


def test_prompt_logprobs_match_hf(tiny_model_factory):
    d, model = tiny_model_factory("qwen2")
    prompts = random_prompts(3, (9, 30, 2), seed=9)
    eng = make_engine(d, max_num_batched_tokens=8)  # prompt logprobs gathered across chunks
    outs = run_to_completion(eng, prompts, SamplingParams(temperature=0, max_tokens=2,
                                                         prompt_logprobs=3))
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([p])).logits[0].float(), -1)
        assert o.prompt_logprobs[0] is None and len(o.prompt_logprobs) == len(p)
        for i in range(1, len(p)):
            row = o.prompt_logprobs[i]
            assert abs(row[p[i]].logprob - lp[i - 1, p[i]].item()) < 1e-4
            top = lp[i - 1].topk(3)
            assert all(abs(row[t].logprob - v) < 1e-4
                       for t, v in zip(top.indices.tolist(), top.values.tolist()))
    assert_all_blocks_free(eng)


def test_seeded_sampling_same_alone_and_in_batch(tiny_model_factory):
    d, _ = tiny_model_factory("llama")
    target = random_prompts(1, (11,), seed=10)[0]
    sp = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=20,
                        ignore_eos=True)
    alone = run_to_completion(make_engine(d), [target], sp)[0].outputs[0].token_ids
    others = random_prompts(6, (3, 25, 8), seed=11)
    mixed_params = [SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True),
                    SamplingParams(temperature=0, max_tokens=10)] * 3
    eng = make_engine(d, max_num_batched_tokens=16)
    outs = run_to_completion(eng, others[:3] + [target] + others[3:],
                             mixed_params[:3] + [sp] + mixed_params[3:])
    assert outs[3].outputs[0].token_ids == alone
    assert_all_blocks_free(eng)


def test_abort_mid_flight_frees_blocks(tiny_model_factory):
    d, _ = tiny_model_factory("llama")
    eng = make_engine(d, max_num_batched_tokens=16)
    prompts = random_prompts(10, LENGTHS, seed=12)
    for i, p in enumerate(prompts):
        eng.add_request(f"a{i}", p, SamplingParams(n=2 if i % 3 == 0 else 1, temperature=0.5,
                                                   max_tokens=40, ignore_eos=True))
    for _ in range(6):
        eng.step()
    eng.abort_request([f"a{i}" for i in range(0, 10, 2)])
    finished = set()
    for _ in range(1000):
        if not eng.has_unfinished_requests():
            break
        finished |= {o.request_id for o in eng.step() if o.finished}
    assert finished == {f"a{i}" for i in range(1, 10, 2)}
    assert_all_blocks_free(eng)


def test_stop_conditions(tiny_model_factory):
    d, _ = tiny_model_factory("llama")
    prompt = random_prompts(1, (12,), seed=13)
    eng = make_engine(d)
    free = run_to_completion(eng, prompt, GREEDY)[0].outputs[0].token_ids
    stop_tok = free[5]
    first = free.index(stop_tok)
    o = run_to_completion(eng, prompt, SamplingParams(temperature=0, max_tokens=32,
                                                      stop_token_ids=[stop_tok]), ids=["s"])[0]
    assert o.outputs[0].token_ids == free[:first + 1]
    assert o.outputs[0].finish_reason == "stop" and o.outputs[0].stop_reason == stop_tok
    o = run_to_completion(eng, prompt, SamplingParams(temperature=0, max_tokens=32, min_tokens=first + 2,
                                                      stop_token_ids=[stop_tok]), ids=["m"])[0]
    assert len(o.outputs[0].token_ids) >= first + 2
    assert stop_tok not in o.outputs[0].token_ids[:first + 1]
    o = run_to_completion(eng, prompt, SamplingParams(temperature=0, max_tokens=3), ids=["x"])[0]
    assert o.outputs[0].token_ids == free[:3] and o.outputs[0].finish_reason == "length"
    assert_all_blocks_free(eng)


def test_eos_ends_generation_unless_ignored(tiny_model_factory):
    d, _ = tiny_model_factory("llama")
    prompt = random_prompts(1, (12,), seed=13)
    eng = make_engine(d)
    free = run_to_completion(eng, prompt, GREEDY)[0].outputs[0].token_ids
    # make the engine treat a token it will produce as EOS: the core stamps each new request
    # with its config's EOS ids, so a core config with another EOS set is enough
    eos = free[4]
    import dataclasses
    mc = dataclasses.replace(eng.config.model, eos_token_ids=(eos,))
    eng.core.config = dataclasses.replace(eng.core.config, model=mc)
    o = run_to_completion(eng, prompt, SamplingParams(temperature=0, max_tokens=32), ids=["e"])[0]
    assert o.outputs[0].token_ids == free[:free.index(eos) + 1]
    assert o.outputs[0].finish_reason == "stop" and o.outputs[0].stop_reason is None
    o = run_to_completion(eng, prompt, GREEDY, ids=["i"])[0]
    assert o.outputs[0].token_ids == free


def test_request_that_can_never_fit_finishes_with_reason(tiny_model_factory):
    d, _ = tiny_model_factory("llama")
    eng = make_engine(d, num_gpu_blocks_override=8)  # 32 tokens of KV in all
    long, short = random_prompts(2, (40, 10), seed=14)
    # a prompt the whole cache cannot hold is refused at admission (test_admission.py)
    with pytest.raises(ValueError, match="could never run"):
        eng.add_request("long", long, SamplingParams(max_tokens=64))
    # one that fits runs until it outgrows the whole cache, then ends with the reason
    (out,) = run_to_completion(eng, [short], SamplingParams(temperature=0, max_tokens=64,
                                                            ignore_eos=True))
    assert out.outputs[0].finish_reason == "length"
    assert "KV cache" in str(out.outputs[0].stop_reason)
    assert 0 < len(out.outputs[0].token_ids) <= 32 - 10 + 1  # the last one needs no KV yet
    assert_all_blocks_free(eng)


def test_invalid_requests_raise_value_error(tiny_model_factory):
    d, _ = tiny_model_factory("llama")
    eng = make_engine(d, max_model_len=64)
    with pytest.raises(ValueError, match="max_model_len"):
        eng.add_request("long", list(range(1, 65)), SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        eng.add_request("bad", [1, 2, 999], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        eng.add_request("empty", [], SamplingParams())
    with pytest.raises(ValueError, match="tokenizer"):
        eng.add_request("text", "hello", SamplingParams())
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    assert not eng.has_unfinished_requests()
