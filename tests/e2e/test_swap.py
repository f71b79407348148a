"""Swap preemption (preemption_mode="swap"): a preempted request's KV blocks go to host memory
and come back, so it resumes without recomputing; greedy output equals the engine that never
preempts. Blocks shared with other requests stay on the device; a full swap space falls back
to recompute."""
from __future__ import annotations

import pytest

from servelm.sampling_params import SamplingParams
from tests.conftest import assert_all_blocks_free, make_engine, random_prompts, run_to_completion

pytestmark = pytest.mark.usefixtures("scheduling_mode")

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def _spy_swaps(eng) -> dict:
    """Counts the scheduler's swap-outs and swap-ins (blocks) and recompute preemptions."""
    kv, counts = eng.core.scheduler.kv, {"out": 0, "in": 0, "recompute": 0}
    swap_out, swap_in, free = kv.swap_out, kv.swap_in, kv.free

    def spy_out(req):
        pairs = swap_out(req)
        counts["out"] += len(pairs) if pairs is not None else 0
        return pairs

    def spy_in(req):
        pairs = swap_in(req)
        counts["in"] += len(pairs) if pairs is not None else 0
        return pairs
    kv.swap_out, kv.swap_in = spy_out, spy_in
    return counts


def _tight(path, **kw):
    # 8 prompts of ~20 tokens generating 40: ~15 blocks of 4 tokens each at the end, 40 blocks
    # in all: most of them must leave the device at some point
    return make_engine(path, **{"num_gpu_blocks_override": 40, "kv_cache_memory": None, **kw})


@pytest.mark.parametrize("swap_space,expect", [(0.01, "swap"), (2e-6, "fallback")])
def test_swap_preemption_output_identical(tiny_model_factory, swap_space, expect):
    path, _ = tiny_model_factory("llama")
    prompts = random_prompts(8, [18, 23, 9, 30], seed=3)
    ref = run_to_completion(make_engine(path), prompts, GREEDY)
    eng = _tight(path, preemption_mode="swap", swap_space=swap_space)
    counts = _spy_swaps(eng)
    outs = run_to_completion(eng, prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
    assert eng.stats().num_preemptions > 0
    if expect == "swap":
        assert counts["out"] > 0 and counts["in"] == counts["out"]
    else:  # a host space of a few blocks: most preemptions recompute
        assert eng.stats().num_preemptions > counts["out"]
    assert_all_blocks_free(eng)
    sched = eng.core.scheduler
    assert not sched.swapped and len(sched.kv.host_free) == sched.kv.num_host_blocks


def test_swap_keeps_shared_blocks_on_device(tiny_model_factory):
    """n > 1 samples share their prompt's blocks: a swapped sample keeps its references to
    them and copies only its own blocks; outputs equal the unpreempted engine's."""
    path, _ = tiny_model_factory("llama")
    prompt = random_prompts(1, [24], seed=5)[0]
    sp = SamplingParams(temperature=0.8, seed=11, n=3, max_tokens=30, ignore_eos=True)
    ref = run_to_completion(make_engine(path), [prompt], sp)
    eng = _tight(path, preemption_mode="swap", swap_space=0.01, num_gpu_blocks_override=22)
    kv = eng.core.scheduler.kv
    seen = []
    swap_out = kv.swap_out

    def spy(req):
        shared = [b for b in req.block_ids[:kv.blocks_needed(req.num_computed_tokens)]
                  if kv.pool.ref_cnt[b] > 1]
        pairs = swap_out(req)
        if pairs is not None:
            seen.append((shared, [g for g, _ in pairs], list(req.swapped_kv.kept.values())))
        return pairs
    kv.swap_out = spy
    out = run_to_completion(eng, [prompt], sp)[0]
    assert sorted(c.token_ids for c in out.outputs) == sorted(c.token_ids for c in ref[0].outputs)
    assert seen, "no request was swapped"
    assert any(shared for shared, _, _ in seen)
    for shared, copied, kept in seen:
        assert not set(shared) & set(copied) and set(shared) <= set(kept)
    assert_all_blocks_free(eng)


def test_abort_while_swapped_frees_host_blocks(tiny_model_factory):
    path, _ = tiny_model_factory("llama")
    eng = _tight(path, preemption_mode="swap", swap_space=0.01, max_num_seqs=8)
    prompts = random_prompts(8, [18, 23, 9, 30], seed=3)
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, GREEDY)
    sched = eng.core.scheduler
    for _ in range(200):
        eng.step()
        if sched.swapped:
            break
    assert sched.swapped, "nothing was swapped"
    eng.abort_request([r.request_id for r in list(sched.swapped)])
    while eng.has_unfinished_requests():
        eng.step()
    assert_all_blocks_free(eng)
    assert len(sched.kv.host_free) == sched.kv.num_host_blocks


def test_preemption_mode_is_validated(tiny_model_factory):
    from servelm.config import EngineArgs
    path, _ = tiny_model_factory("llama")
    with pytest.raises(ValueError, match="preemption_mode must be one of"):
        EngineArgs(model=path, device="cpu", preemption_mode="disk").create_engine_config()
    with pytest.raises(ValueError, match="swap_space must be >= 0"):
        EngineArgs(model=path, device="cpu", preemption_mode="swap",
                   swap_space=-1).create_engine_config()
    # a swap space without swapping would be silently unused: refused
    with pytest.raises(ValueError, match="only used with preemption_mode='swap'"):
        EngineArgs(model=path, device="cpu", swap_space=2).create_engine_config()
