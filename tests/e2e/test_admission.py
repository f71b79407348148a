"""Admission: a prompt the whole KV cache cannot hold is refused at once (ValueError, HTTP 400),
never queued to finish empty; the engine warns at start when max_model_len exceeds the cache."""
from __future__ import annotations

import logging

import pytest

from servelm.sampling_params import SamplingParams
from tests.conftest import make_engine, run_to_completion


def test_prompt_larger_than_the_kv_cache_is_refused(tiny_model_factory, caplog):
    path, _ = tiny_model_factory("llama")
    with caplog.at_level(logging.WARNING, logger="servelm.engine.core"):
        # 16 blocks of 4 tokens: 64 tokens of KV (2 layers x K,V x 4 tokens x 2 heads x 16 x 4 B)
        eng = make_engine(path, kv_cache_memory=16 * 2048, num_gpu_blocks_override=16,
                          max_model_len=512)
    cap = eng.core.scheduler.kv.num_blocks * eng.config.cache.block_size
    assert any("exceeds the KV cache" in r.message for r in caplog.records)
    with pytest.raises(ValueError, match="could never run"):
        eng.add_request("big", list(range(1, cap + 1)), SamplingParams(max_tokens=1))
    assert not eng.has_unfinished_requests()
    out = run_to_completion(eng, [list(range(1, cap))], SamplingParams(max_tokens=1))[0]
    assert len(out.outputs[0].token_ids) == 1  # the largest prompt that fits still runs
