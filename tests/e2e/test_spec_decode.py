"""Speculative decoding with the n-gram proposer on tiny HF models (CPU, fp32): greedy output is
token-identical to the engine without speculation, with drafts really accepted; seeded sampling
is reproducible; bad configs are refused with the key named. Chunked prefill, prefix-cache hits,
preemption, n > 1, stops and max_model_len: test_spec_models.py, for every method."""
from __future__ import annotations

import numpy as np
import pytest

from servelm.config import EngineArgs
from servelm.sampling_params import SamplingParams
from servelm.spec_decode.ngram import ngram_drafts
from tests.conftest import assert_all_blocks_free, make_engine, random_prompts, run_to_completion

pytestmark = pytest.mark.usefixtures("scheduling_mode")

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
         "prompt_lookup_max": 3}
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def repetitive_prompts(n: int, seed: int) -> list[list[int]]:
    """Random spans repeated: lookups find earlier occurrences (and the tiny random models
    fall into loops, which their own outputs then repeat)."""
    return [(p * 4)[:30] for p in random_prompts(n, [5, 7, 6, 9], seed=seed)]


def spec_stats(eng) -> tuple[int, int]:
    s = eng.stats()
    return s.spec_num_draft_tokens, s.spec_num_accepted_tokens


def _same(a, b) -> None:
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_greedy_identical_with_drafts_accepted(tiny_model_factory, arch):
    path, _ = tiny_model_factory(arch)
    prompts = repetitive_prompts(6, seed=1)
    plain = run_to_completion(make_engine(path), prompts, GREEDY)
    eng = make_engine(path, speculative_config=NGRAM)
    _same(run_to_completion(eng, prompts, GREEDY), plain)
    drafted, accepted = spec_stats(eng)
    assert drafted > 0 and accepted > 0, (drafted, accepted)
    assert_all_blocks_free(eng)


def test_seeded_sampling_reproducible(tiny_model_factory):
    path, _ = tiny_model_factory("llama")
    prompts = repetitive_prompts(4, seed=4)
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7, n=2, max_tokens=30,
                            ignore_eos=True)
    runs = []
    for _ in range(2):
        eng = make_engine(path, speculative_config=NGRAM)
        runs.append([[c.token_ids for c in o.outputs]
                     for o in run_to_completion(eng, prompts, params)])
    assert runs[0] == runs[1]


def test_disable_by_batch_size(tiny_model_factory):
    """Above the batch size no drafts are made (and steps overlap again); output unchanged."""
    path, _ = tiny_model_factory("llama")
    prompts = repetitive_prompts(6, seed=5)
    plain = run_to_completion(make_engine(path), prompts, GREEDY)
    # adaptive off: the counts compared below are then not timing-dependent
    cfg = {**NGRAM, "disable_by_batch_size": 2, "adaptive": False}
    eng = make_engine(path, speculative_config=cfg)
    _same(run_to_completion(eng, prompts, GREEDY), plain)
    drafted_big, _ = spec_stats(eng)
    eng1 = make_engine(path, speculative_config=cfg)
    run_to_completion(eng1, prompts[:1], GREEDY)
    assert spec_stats(eng1)[0] > 0  # one request: drafted
    # six requests: drafted only once few enough remained (the batch drains at the end)
    assert drafted_big < 6 * spec_stats(eng1)[0]


def test_offline_stats(tiny_model_factory):
    from servelm import LLM
    path, _ = tiny_model_factory("llama")
    llm = LLM(path, device="cpu", dtype="float32", skip_tokenizer_init=True,
              speculative_config=NGRAM, kv_cache_memory=1 << 24)
    llm.generate(repetitive_prompts(6, seed=1), GREEDY, use_tqdm=False)
    s = llm.spec_decode_stats()
    assert s["num_drafts"] > 0 and 0 < s["acceptance_rate"] <= 1
    assert s["mean_acceptance_length"] == 1 + s["num_accepted_tokens"] / s["num_drafts"]
    assert sum(s["accepted_per_position"]) == s["num_accepted_tokens"]
    assert len(s["accepted_per_position"]) == 4


@pytest.mark.parametrize("cfg,match", [
    ({"method": "medusa", "num_speculative_tokens": 2},
     r"'method'\] must be one of \['draft_model', 'layer_skip', 'ngram'\]"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, r"'model'\] is required"),
    ({"method": "ngram"}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}, "unknown key.*lookahead"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
      "prompt_lookup_max": 2}, "prompt_lookup_max"),
    ('{"method": "ngram", ', "not valid JSON"),
    ({"method": "ngram", "num_speculative_tokens": 2, "adaptive": "yes"}, r"'adaptive'\] must be"),
])
def test_invalid_configs(tiny_model_factory, cfg, match):
    path, _ = tiny_model_factory("llama")
    with pytest.raises(ValueError, match=match):
        EngineArgs(model=path, device="cpu", speculative_config=cfg).create_engine_config()


def test_ngram_lookup():
    t = np.array([5, 6, 7, 8, 1, 5, 6, 7, 2, 3, 5, 6, 7])
    # the longest suffix (5 6 7) last occurred at 5..7, followed by 2 3 5 6
    assert ngram_drafts(t, 1, 3, 4).tolist() == [2, 3, 5, 6]
    assert ngram_drafts(t, 1, 3, 2).tolist() == [2, 3]
    assert ngram_drafts(np.array([1, 2, 3, 4]), 1, 3, 4) is None  # nothing repeats
    # a shorter suffix when the longer one has no earlier match
    assert ngram_drafts(np.array([9, 4, 1, 2, 4]), 1, 3, 3).tolist() == [1, 2, 4]
    assert ngram_drafts(np.array([7]), 1, 3, 3) is None
