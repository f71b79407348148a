"""Speculative decoding on tiny HF models (CPU, fp32): a draft model (the target itself, so
every draft should be accepted, which checks that the draft's KV stays right after rejections,
preemption and prefix hits; and a different random model), self-speculative layer skip, token
trees, and n-gram in the regimes every method shares. Greedy output equals the engine's without speculation across chunked prefill,
prefix-cache hits, preemption (recompute and swap), n > 1, stops and max_model_len; all KV
blocks are free afterwards; bad configs are refused with the reason."""
from __future__ import annotations

import pytest
import torch

from servelm.config import EngineArgs
from servelm.sampling_params import SamplingParams
from tests.conftest import _make_config, assert_all_blocks_free, make_engine, run_to_completion
from tests.e2e.test_spec_decode import GREEDY, NGRAM, repetitive_prompts, spec_stats

pytestmark = pytest.mark.usefixtures("scheduling_mode")


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory) -> str:
    """A differently initialised tiny Qwen2 with the test vocabulary: a draft unlike the target."""
    import transformers as tf
    torch.manual_seed(99)
    m = tf.AutoModelForCausalLM.from_config(_make_config("qwen2"), dtype=torch.float32).eval()
    d = tmp_path_factory.mktemp("draft-qwen2")
    m.save_pretrained(d)
    return str(d)


def _draft(path: str, k: int = 4) -> dict:
    return {"method": "draft_model", "model": path, "num_speculative_tokens": k}


LAYER_SKIP = {"method": "layer_skip", "draft_layers": 1, "num_speculative_tokens": 3}


def _tree(path: str, tree=(2, 2, 1)) -> dict:
    return {**_draft(path, len(tree)), "tree": list(tree)}


def _spec(method: str, path: str) -> dict:
    """The config of `method`, a draft model being the target itself."""
    return {"ngram": NGRAM, "draft_model": _draft(path), "layer_skip": LAYER_SKIP,
            "tree": _tree(path)}[method]


def _tokens(outs) -> list:
    return [[c.token_ids for c in o.outputs] for o in outs]


@pytest.mark.parametrize("arch,tree", [("llama", False), ("qwen2", False), ("qwen3", False),
                                       ("llama", True), ("qwen3", True)])
def test_self_draft_identical_and_fully_accepted(tiny_model_factory, arch, tree):
    path, _ = tiny_model_factory(arch)
    prompts = repetitive_prompts(6, seed=1)
    plain = run_to_completion(make_engine(path), prompts, GREEDY)
    eng = make_engine(path, speculative_config=_tree(path) if tree else _draft(path))
    assert _tokens(run_to_completion(eng, prompts, GREEDY)) == _tokens(plain)
    drafted, accepted = spec_stats(eng)
    # the draft is the target: its drafts are the target's greedy tokens, so (fp32 rounding
    # of different batch shapes aside) all are accepted, which needs its KV right throughout;
    # with a tree, the likeliest branch is taken at every depth (3 of its 10 nodes)
    full = eng.stats().spec_num_drafts * 3 if tree else drafted
    assert drafted > 0 and accepted >= 0.9 * full, (drafted, accepted, full)
    # accepted tokens by position: by depth for a tree (3), by draft for a chain (4)
    assert len(eng.stats().spec_accepted_per_pos) == (3 if tree else 4)
    assert_all_blocks_free(eng)


@pytest.mark.parametrize("cfg", ["other", "layer_skip", "other_tree"])
def test_other_drafts_identical(tiny_model_factory, other_draft, cfg):
    path, _ = tiny_model_factory("llama")
    prompts = repetitive_prompts(6, seed=2)
    plain = run_to_completion(make_engine(path), prompts, GREEDY)
    spec = {"other": _draft(other_draft, 3), "layer_skip": LAYER_SKIP,
            "other_tree": _tree(other_draft, (3, 2, 1, 1))}[cfg]
    eng = make_engine(path, speculative_config=spec)
    assert _tokens(run_to_completion(eng, prompts, GREEDY)) == _tokens(plain)
    drafted, accepted = spec_stats(eng)
    assert drafted > 0
    if cfg == "layer_skip":  # the random model's loops are partly visible from its first layer
        assert accepted > 0
    assert_all_blocks_free(eng)


@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
@pytest.mark.parametrize("method", ["ngram", "draft_model", "layer_skip", "tree"])
def test_chunked_prefill_prefix_hits_and_preemption(tiny_model_factory, method,
                                                    preemption_mode):
    path, _ = tiny_model_factory("llama")
    # a shared 12-token head: later requests hit the blocks of earlier ones while they run
    head = repetitive_prompts(1, seed=30)[0][:12]
    prompts = [head + p for p in repetitive_prompts(8, seed=3)]
    plain = run_to_completion(make_engine(path), prompts, GREEDY)
    spec = _spec(method, path)
    kw = dict(swap_space=0.01) if preemption_mode == "swap" else {}
    # a 16-token budget chunks every prompt (and the draft's catch-up); 40 blocks of 4 tokens
    # force preemptions; a second round runs the same prompts again
    eng = make_engine(path, speculative_config=spec, max_num_batched_tokens=16,
                      num_gpu_blocks_override=40, kv_cache_memory=None,
                      preemption_mode=preemption_mode, **kw)
    assert _tokens(run_to_completion(eng, prompts, GREEDY)) == _tokens(plain)
    again = run_to_completion(eng, prompts, GREEDY, ids=[f"again{i}" for i in range(8)])
    assert _tokens(again) == _tokens(plain)
    s = eng.stats()
    assert s.num_preemptions > 0 and s.prefix_cache_hits > 0
    assert s.spec_num_accepted_tokens > 0
    if method == "draft_model":  # self-draft: its KV right after preemption and prefix hits
        assert s.spec_num_accepted_tokens >= 0.95 * s.spec_num_draft_tokens
    assert_all_blocks_free(eng)


@pytest.mark.parametrize("method", ["ngram", "draft_model", "layer_skip", "tree"])
def test_n_stops_and_max_model_len(tiny_model_factory, method):
    path, _ = tiny_model_factory("llama")
    prompts = repetitive_prompts(4, seed=4)
    plain = run_to_completion(make_engine(path), prompts, GREEDY)
    stop = plain[0].outputs[0].token_ids[17]
    params = [SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop]),
              SamplingParams(temperature=0, max_tokens=13, ignore_eos=True),
              SamplingParams(temperature=0, n=3, max_tokens=25, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)]
    spec = _spec(method, path)
    # max_model_len 50: the last request runs into it, drafting (and its lookahead slots)
    # right up to the end of the context
    ref = run_to_completion(make_engine(path, max_model_len=50), prompts, params)
    eng = make_engine(path, max_model_len=50, speculative_config=spec)
    out = run_to_completion(eng, prompts, params)
    assert _tokens(out) == _tokens(ref)
    assert ([[c.finish_reason for c in o.outputs] for o in out]
            == [[c.finish_reason for c in o.outputs] for o in ref])
    assert len(out[3].outputs[0].token_ids) == 50 - len(prompts[3])
    assert spec_stats(eng)[1] > 0
    assert_all_blocks_free(eng)


def test_seeded_sampling_reproducible(tiny_model_factory, other_draft):
    path, _ = tiny_model_factory("llama")
    prompts = repetitive_prompts(4, seed=5)
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7, n=2, max_tokens=30,
                            ignore_eos=True)
    runs = []
    for _ in range(2):
        eng = make_engine(path, speculative_config=_draft(other_draft))
        runs.append(_tokens(run_to_completion(eng, prompts, params)))
    assert runs[0] == runs[1]


@pytest.mark.parametrize("method", ["ngram", "draft_model", "layer_skip", "tree"])
def test_seeded_sampling_independent_of_speculation(tiny_model_factory, other_draft, method):
    """A seeded request's randomness is drawn per token position, and a verified draft is kept
    only where it equals the target's own sample: the output is the one without speculation,
    however many drafts were verified when (stronger than reproducible)."""
    path, _ = tiny_model_factory("llama")
    prompts = repetitive_prompts(4, seed=8)
    params = SamplingParams(temperature=0.3, seed=11, n=2, max_tokens=30, ignore_eos=True)
    plain = _tokens(run_to_completion(make_engine(path), prompts, params))
    spec = _spec(method, path)
    eng = make_engine(path, speculative_config=spec)
    assert _tokens(run_to_completion(eng, prompts, params)) == plain
    drafted, accepted = spec_stats(eng)
    # drafts verified; the self-draft's are the target's likeliest tokens, often sampled
    assert drafted > 0 and (accepted > 0 or method not in ("draft_model", "tree"))


def test_draft_kv_shares_the_memory_budget(tiny_model_factory, other_draft):
    """The draft's KV comes out of the same budget: blocks of target + draft KV."""
    from tests.conftest import TEST_DEVICE
    if TEST_DEVICE != "cpu":
        pytest.skip("the CPU budget's arithmetic (on a GPU the tests fix the block count)")
    path, _ = tiny_model_factory("llama")
    budget = 1 << 20
    plain = make_engine(path, kv_cache_memory=budget)
    eng = make_engine(path, kv_cache_memory=budget, speculative_config=_draft(other_draft))
    target_block = plain.core.executor.runner.config.kv_bytes_per_block()
    draft_block = eng.core.executor.runner.proposer.kv_bytes_per_block()
    assert draft_block > 0
    assert plain.core.scheduler.kv.num_blocks == budget // target_block
    assert eng.core.scheduler.kv.num_blocks == budget // (target_block + draft_block)
    skip = make_engine(path, kv_cache_memory=budget, speculative_config=LAYER_SKIP)
    assert skip.core.scheduler.kv.num_blocks == budget // target_block  # shares the target's


def test_offline_stats(tiny_model_factory):
    from servelm import LLM
    path, _ = tiny_model_factory("llama")
    llm = LLM(path, device="cpu", dtype="float32", skip_tokenizer_init=True,
              speculative_config=_draft(path), kv_cache_memory=1 << 24)
    llm.generate(repetitive_prompts(4, seed=6), GREEDY, use_tqdm=False)
    s = llm.spec_decode_stats()
    assert s["num_drafts"] > 0 and s["mean_acceptance_length"] > 3


def _config_with_vocab(tmp_path, vocab: int, max_pos: int = 512) -> str:
    import transformers as tf
    from tests.conftest import TINY
    cfg = tf.LlamaConfig(**{**TINY, "vocab_size": vocab, "max_position_embeddings": max_pos})
    m = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    m.save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize("cfg,match", [
    ({"method": "draft_model", "model": "VOCAB", "num_speculative_tokens": 2},
     "vocabulary of 300 tokens, the target 256"),
    ({"method": "draft_model", "model": "SHORT", "num_speculative_tokens": 2},
     "context of 64 tokens, shorter than the target's max_model_len"),
    ({"method": "draft_model", "model": "/nonexistent/draft", "num_speculative_tokens": 2},
     "speculative_config\\['model'\\]"),
    ({"method": "layer_skip", "draft_layers": 2, "num_speculative_tokens": 2},
     "smaller than the target's 2 layers"),
    ({"method": "layer_skip", "num_speculative_tokens": 2}, "'draft_layers'\\] is required"),
    ({"method": "layer_skip", "draft_layers": 1, "num_speculative_tokens": 2,
      "prompt_lookup_max": 3}, "do not apply to method 'layer_skip'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"},
     "do not apply to method 'ngram'"),
    ({"method": "draft_model", "model": "SELF", "num_speculative_tokens": 3, "tree": [2, 1]},
     "'tree'\\] has depth 2; it must equal num_speculative_tokens \\(3\\)"),
    ({"method": "draft_model", "model": "SELF", "num_speculative_tokens": 3, "tree": [4, 4, 4]},
     "84 nodes; at most 64"),
    ({"method": "draft_model", "model": "SELF", "num_speculative_tokens": 2, "tree": [2, 0]},
     "branching factors >= 1"),
    ({"method": "draft_model", "model": "SELF", "num_speculative_tokens": 2, "tree": "2,2"},
     "must be a list of branching factors"),
    ({"method": "layer_skip", "draft_layers": 1, "num_speculative_tokens": 2, "tree": [2, 1]},
     "do not apply to method 'layer_skip'"),
])
def test_invalid_configs(tiny_model_factory, tmp_path, cfg, match):
    path, _ = tiny_model_factory("llama")
    sub = {"VOCAB": lambda: _config_with_vocab(tmp_path / "v", 300),
           "SHORT": lambda: _config_with_vocab(tmp_path / "s", 256, max_pos=64),
           "SELF": lambda: path}
    if cfg.get("model") in sub:
        cfg = {**cfg, "model": sub[cfg["model"]]()}
    with pytest.raises(ValueError, match=match):
        EngineArgs(model=path, device="cpu", speculative_config=cfg).create_engine_config()
