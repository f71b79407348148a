"""kv_cache_dtype="fp8": the engine stores e4m3 KV with a scale per token and head (the layout
of attention/kv_quant.py): twice the tokens in the same memory, outputs close to the model-dtype
cache, and the cache paths that copy blocks (prefix reuse, swap preemption) keep working."""
from __future__ import annotations

import math

import torch

from servelm import SamplingParams
from tests.conftest import assert_all_blocks_free, make_engine, random_prompts, run_to_completion


def _run(engine, prompts, max_tokens=8):
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=1)
    return run_to_completion(engine, prompts, sp)


def test_fp8_kv_doubles_capacity_and_stays_close(tiny_model_factory):
    path, _ = tiny_model_factory("llama")
    prompts = random_prompts(4, [7, 30, 13, 21], seed=11)
    auto = make_engine(path)
    fp8 = make_engine(path, kv_cache_dtype="fp8")
    k_cache = fp8.core.executor.runner.kv_caches[0][0]
    assert k_cache.dtype == torch.uint8 and k_cache.shape[-1] == 16 + 4  # head_dim 16 + scale
    # fp32 model: 4 bytes per value vs 1 + 4/16: 3.2x the blocks in the same memory
    ratio = fp8.core.scheduler.kv.num_blocks / auto.core.scheduler.kv.num_blocks
    assert math.isclose(ratio, 4 * 16 / 20, rel_tol=0.01)
    a, f = _run(auto, prompts), _run(fp8, prompts)
    for oa, of in zip(a, f):
        # the first token's logprob under each cache (same prompt): close, not equal
        la = oa.outputs[0].logprobs[0][oa.outputs[0].token_ids[0]].logprob
        lf = of.outputs[0].logprobs[0][of.outputs[0].token_ids[0]].logprob
        assert oa.outputs[0].token_ids[0] == of.outputs[0].token_ids[0]
        assert abs(la - lf) < 0.15 and la != lf  # e4m3: ~2-3% per value
    assert_all_blocks_free(fp8)


def test_fp8_kv_prefix_reuse_and_swap(tiny_model_factory):
    path, _ = tiny_model_factory("llama")
    shared = random_prompts(1, [24], seed=3)[0]
    prompts = [shared + p for p in random_prompts(3, [5, 9, 6], seed=4)]
    eng = make_engine(path, kv_cache_dtype="fp8")
    first = [o.outputs[0].token_ids for o in _run(eng, prompts)]
    rerun = _run(eng, prompts)  # the prompts' fp8 blocks found in the prefix cache
    assert [o.outputs[0].token_ids for o in rerun] == first
    assert all(o.num_cached_tokens >= 24 for o in rerun)
    # a cache too small for all at once (13 blocks of 640 bytes: 2 layers x K,V x 4 slots x
    # 2 heads x (16 + 4) bytes; each request needs ~11): swap preemption moves fp8 blocks
    small = make_engine(path, kv_cache_dtype="fp8", preemption_mode="swap",
                        num_gpu_blocks_override=None, kv_cache_memory=13 * 640)
    swap_outs = []
    runner = small.core.executor.runner
    orig = runner.swap.swap_out
    runner.swap.swap_out = lambda caches, pairs: (swap_outs.append(len(pairs)),
                                                  orig(caches, pairs))[1]
    out = [o.outputs[0].token_ids for o in _run(small, prompts, max_tokens=8)]
    assert out == first
    assert small.core.scheduler.num_preemptions > 0 and sum(swap_outs) > 0  # fp8 blocks moved
    assert_all_blocks_free(small)
