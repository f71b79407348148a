"""Multi-step scheduling (num_scheduler_steps, vLLM's name) on the CPU: one schedule of greedy
decodes runs several passes of the C decode step, each fed the tokens of the one before. The
tokens must be the single-step engine's exactly: stops mid-group, max_tokens and the context
limit not multiples of the group, requests waiting or sampling, a cache too small for the
extra positions, and the prefix cache registering the blocks the passes filled."""
from __future__ import annotations

import pytest
import torch

from servelm import SamplingParams
from servelm.cpu import native
from tests.conftest import make_engine, run_to_completion

pytestmark = pytest.mark.skipif(native.load() is None,
                                reason="no C compiler: the CPU decode step is not built")

PROMPTS = [[5, 17, 2, 99, 31], [7] * 3 + [(11 * i) % 250 + 1 for i in range(37)], [200]]


def _engine(path: str, steps: int, **kw):
    kw.setdefault("threads", 1)
    kw.setdefault("async_scheduling", False)  # (refused with num_scheduler_steps > 1)
    return make_engine(path, device="cpu", num_scheduler_steps=steps, **kw)


def _tokens(outs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outs]


def _count_passes(engine) -> list[int]:
    """The num_scheduler_steps of every schedule that ran (a list the engine appends to)."""
    sched, seen = engine.core.scheduler, []
    schedule = sched.schedule

    def wrapped():
        out = schedule()
        if out.total_num_scheduled_tokens:
            seen.append(out.num_scheduler_steps)
        return out
    sched.schedule = wrapped
    return seen


@pytest.fixture(scope="module")
def llama(tiny_model_factory):
    return tiny_model_factory("llama")[0]


@pytest.fixture(scope="module")
def reference(llama):
    """The single-step engine's greedy tokens, 3 prompts x 29 tokens."""
    sp = SamplingParams(temperature=0, max_tokens=29, ignore_eos=True)
    return _tokens(run_to_completion(_engine(llama, 1), PROMPTS, sp))


@pytest.mark.parametrize("steps", [2, 4, 7])
def test_same_tokens_as_single_steps(llama, reference, steps):
    """29 tokens (not a multiple of the group: the last schedule is capped by max_tokens)."""
    engine = _engine(llama, steps)
    seen = _count_passes(engine)
    sp = SamplingParams(temperature=0, max_tokens=29, ignore_eos=True)
    assert _tokens(run_to_completion(engine, PROMPTS, sp)) == reference
    assert max(seen) == steps and sum(s > 1 for s in seen) >= 2, seen
    # 1 prompt step, then 28 tokens in groups of at most `steps`
    assert len(seen) <= 1 + -(-28 // steps) + 1, seen


def test_stop_token_mid_group(llama, reference):
    """A stop token sampled inside a group ends the request there; the passes after it are
    dropped, the other requests go on."""
    stop = reference[0][5]  # the 6th token of the first prompt's output
    first = reference[0].index(stop)
    engine = _engine(llama, 4)
    sps = [SamplingParams(temperature=0, max_tokens=29, stop_token_ids=[stop]),
           SamplingParams(temperature=0, max_tokens=29, ignore_eos=True),
           SamplingParams(temperature=0, max_tokens=11, ignore_eos=True)]
    outs = run_to_completion(engine, PROMPTS, sps)
    got = _tokens(outs)
    assert got[0] == reference[0][:first + 1] and outs[0].outputs[0].finish_reason == "stop"
    assert got[1] == reference[1]
    assert got[2] == reference[2][:11] and outs[2].outputs[0].finish_reason == "length"


def test_not_greedy_or_logprobs_take_single_steps(llama, reference):
    """A request that samples, or asks for logprobs, runs beside greedy ones: every schedule
    is a single pass while it runs (the sampler needs each step's logits), and the greedy ones'
    tokens stay the same."""
    engine = _engine(llama, 4)
    seen = _count_passes(engine)
    sps = [SamplingParams(temperature=0, max_tokens=29, ignore_eos=True),
           SamplingParams(temperature=0.8, seed=3, max_tokens=29, ignore_eos=True),
           SamplingParams(temperature=0, max_tokens=29, ignore_eos=True, logprobs=2)]
    outs = run_to_completion(engine, PROMPTS, sps)
    got = _tokens(outs)
    assert got[0] == reference[0] and got[2] == reference[2]
    assert len(got[1]) == 29 and len(outs[2].outputs[0].logprobs) == 29
    assert set(seen) == {1}, seen


def test_waiting_requests_are_admitted_between_groups(llama, reference):
    """max_num_seqs 2 for 3 prompts: the third waits, so schedules are single passes until it
    runs; then groups. Same tokens."""
    engine = _engine(llama, 4, max_num_seqs=2)
    seen = _count_passes(engine)
    sp = SamplingParams(temperature=0, max_tokens=29, ignore_eos=True)
    assert _tokens(run_to_completion(engine, PROMPTS, sp)) == reference
    assert 4 in seen and seen.index(4) > 1, seen


def test_context_limit_caps_the_group(llama):
    """No max_tokens: generation stops at max_model_len, within a group."""
    sp = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    want = _tokens(run_to_completion(_engine(llama, 1, max_model_len=30), PROMPTS[:1], sp))
    got = _tokens(run_to_completion(_engine(llama, 4, max_model_len=30), PROMPTS[:1], sp))
    assert got == want and len(got[0]) == 30 - len(PROMPTS[0])


def test_small_cache_falls_back_to_single_steps(llama, reference):
    """A KV cache too small for all three sequences: groups while their extra positions fit
    in the free blocks, then single passes (a group never preempts), then the preemption any
    engine makes when blocks run out. The same tokens."""
    sp = SamplingParams(temperature=0, max_tokens=29, ignore_eos=True)
    # the sequences end at 34, 69 and 30 tokens: 9 + 18 + 8 = 35 blocks of 4; this cache has
    # 30 (+ the null block)
    engine = _engine(llama, 8, num_gpu_blocks_override=31)
    seen = _count_passes(engine)
    assert _tokens(run_to_completion(engine, PROMPTS, sp)) == reference
    assert 8 in seen and 1 in seen[seen.index(8):], seen
    assert engine.core.scheduler.num_preemptions > 0  # (what the cache size is for)


def test_prefix_cache_registers_the_filled_blocks(llama, reference):
    """The blocks a group filled are hashed once their tokens are known: a later prompt that
    repeats prompt + outputs hits them."""
    engine = _engine(llama, 4)
    sp = SamplingParams(temperature=0, max_tokens=29, ignore_eos=True)
    run_to_completion(engine, PROMPTS[1:2], sp)
    again = PROMPTS[1] + reference[1][:24]  # 64 tokens: 16 full blocks of 4
    out = run_to_completion(engine, [again], SamplingParams(temperature=0, max_tokens=1))[0]
    assert out.num_cached_tokens >= 60, out.num_cached_tokens


def test_bad_values_are_refused(llama):
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="num_scheduler_steps"):
            _engine(llama, bad)
    with pytest.raises(ValueError, match="enforce_eager"):
        _engine(llama, 4, enforce_eager=True)
    with pytest.raises(ValueError, match="speculative_config"):
        _engine(llama, 4, speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="async_scheduling"):
        _engine(llama, 4, async_scheduling=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_refused_on_a_gpu(llama):
    with pytest.raises(ValueError, match="GPU"):
        make_engine(llama, device="cuda", num_scheduler_steps=4)
