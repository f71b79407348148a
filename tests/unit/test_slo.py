"""SLO-aware scheduling in a simulated overload: the real Scheduler, a runner that only
samples (token 7 for every request whose step completes its tokens), and a fake clock that
each step advances by a fixed cost model (base + per token). Requests arrive by a Poisson process at 1.5x the measured capacity with TTFT and TPOT
objectives; the slo policy's goodput (requests meeting both) must far exceed FCFS's, and
shed requests are told at once (finish_reason slo_unattainable, a Retry-After in seconds)."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest

from servelm.config import CacheConfig, SchedulerConfig
from servelm.core.request import Request
from servelm.core.scheduler import Scheduler
from servelm.core.slo import StepCostModel, prefill_token_limit, unattainable
from servelm.sampling_params import SamplingParams
from servelm.core.step import ModelRunnerOutput, SchedulerOutput

BASE_S, PER_TOKEN_S = 0.015, 0.00008  # a step: 15 ms + 0.08 ms per token
TTFT_MS, TPOT_MS = 500.0, 50.0


@dataclass
class Outcome:
    arrival: float
    first_token: float = math.nan
    finished: float = math.nan
    num_tokens: int = 0
    shed: bool = False
    retry_after: object = None

    def met(self) -> bool:
        if self.shed or math.isnan(self.finished):
            return False
        tpot = ((self.finished - self.first_token) / (self.num_tokens - 1)
                if self.num_tokens > 1 else 0.0)
        return (self.first_token - self.arrival) * 1e3 <= TTFT_MS and tpot * 1e3 <= TPOT_MS


def workload(n: int, rate: float, seed: int) -> list[tuple[float, list[int], int]]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate) if math.isfinite(rate) else 0.0
        prompt = [rng.randrange(10, 1000) for _ in range(rng.randrange(100, 700))]
        out.append((t, prompt, rng.randrange(16, 96)))
    return out


def simulate(policy: str, reqs, slo: bool = True, steps: list | None = None,
             **config) -> tuple[dict[str, Outcome], float]:
    """Runs the requests to completion in simulated time; (outcomes, makespan seconds).
    ``steps`` collects (seconds, decoding requests in the step) per step."""
    clock = [0.0]
    sched = Scheduler(SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048,
                                      max_model_len=4096, policy=policy, **config),
                      CacheConfig(block_size=16), 4096, clock=lambda: clock[0])

    def execute(so: SchedulerOutput) -> ModelRunnerOutput:
        # synchronous steps: a request samples this step iff it holds a placeholder now
        return ModelRunnerOutput({rid: [7] for rid in so.num_scheduled_tokens
                                  if sched.requests[rid].num_output_placeholders})
    outcomes: dict[str, Outcome] = {}
    pending = list(enumerate(reqs))
    for _ in range(200_000):
        while pending and pending[0][1][0] <= clock[0]:
            i, (t, prompt, m) = pending.pop(0)
            rid = f"r{i}"
            sched.add_request(Request(rid, prompt, SamplingParams(max_tokens=m, ignore_eos=True),
                                      t, ttft_slo_ms=TTFT_MS if slo else None,
                                      tpot_slo_ms=TPOT_MS if slo else None))
            outcomes[rid] = Outcome(t)
        if not sched.has_unfinished_requests():
            if not pending:
                break
            clock[0] = pending[0][1][0]
            continue
        so = sched.schedule()
        ro = execute(so)
        dt = BASE_S + PER_TOKEN_S * so.total_num_scheduled_tokens
        clock[0] += dt
        if steps is not None:
            steps.append((dt, sum(n == 1 for n in so.num_scheduled_tokens.values())))
        for o in sched.update(so, ro):
            oc = outcomes[o.req_id]
            if o.new_token_ids and math.isnan(oc.first_token):
                oc.first_token = clock[0]
            oc.num_tokens += len(o.new_token_ids)
            if o.finish_reason is not None:
                oc.finished = clock[0]
                oc.shed = o.finish_reason == "slo_unattainable"
                oc.retry_after = o.stop_reason
    else:
        pytest.fail("simulation did not finish")
    return outcomes, clock[0]


def test_slo_policy_keeps_goodput_under_overload():
    # capacity: the same kind of requests all at once, FCFS, completions per second
    burst = workload(300, math.inf, seed=1)
    done, makespan = simulate("fcfs", burst, slo=False)
    capacity = len(done) / makespan
    reqs = workload(1000, 1.5 * capacity, seed=2)
    duration = reqs[-1][0]
    goodput = {}
    for policy in ("fcfs", "slo"):
        outcomes, _ = simulate(policy, reqs)
        goodput[policy] = sum(o.met() for o in outcomes.values()) / duration
        if policy == "slo":
            shed = [o for o in outcomes.values() if o.shed]
            assert shed and all(isinstance(o.retry_after, int) and o.retry_after >= 1
                                for o in shed)
            # shed early: a shed request learns it well before its deadline would pass
            assert all(o.finished - o.arrival <= TTFT_MS / 1e3 for o in shed)
            assert all(o.num_tokens == 0 for o in shed)
    assert goodput["slo"] >= 0.8 * capacity, (goodput, capacity)
    assert goodput["slo"] >= 3 * goodput["fcfs"], (goodput, capacity)


def test_slo_policy_under_light_load_meets_every_slo_and_sheds_none():
    burst = workload(200, math.inf, seed=3)
    done, makespan = simulate("fcfs", burst, slo=False)
    reqs = workload(400, 0.5 * len(done) / makespan, seed=4)
    outcomes, _ = simulate("slo", reqs)
    assert not any(o.shed for o in outcomes.values())
    assert sum(o.met() for o in outcomes.values()) >= 0.98 * len(reqs)


def test_step_time_target_while_decoding():
    """max_step_ms_while_decoding: once the cost model has learnt the step cost, steps that
    carry decodes stay within the target (prompts then go through in chunks), without it they
    run up to the full token budget."""
    reqs = workload(150, 20.0, seed=5)
    for target in (None, 40.0):
        steps: list = []
        outcomes, _ = simulate("fcfs", reqs, slo=False, steps=steps,
                               max_step_ms_while_decoding=target)
        assert all(not math.isnan(o.finished) for o in outcomes.values())
        longest = max(dt for dt, n_dec in steps[20:] if n_dec)
        if target is None:
            assert longest > 0.1
        else:  # a block of prompt tokens always fits: the target plus at most 16 tokens
            assert longest <= target / 1e3 + 16 * PER_TOKEN_S + 1e-9, longest


def test_cost_model_fits_a_line():
    m = StepCostModel()
    assert not m.ready
    rng = random.Random(0)
    for _ in range(50):
        t = rng.randrange(1, 4000)
        m.observe(t, 0.01 + 2e-5 * t)
    a, b = m.coefficients()
    assert m.ready and a == pytest.approx(0.01, rel=1e-6) and b == pytest.approx(2e-5, rel=1e-6)
    assert m.time_for(0, 100, 5) == 0.0
    m.observe(100, 2.5)  # a first-use compile stall: left out
    assert m.num_outliers == 1 and m.coefficients() == pytest.approx((a, b))
    # 250 prompt tokens at 100 per step, 5 decodes riding along: 3 steps
    assert m.time_for(250, 100, 5) == pytest.approx(3 * (a + 5 * b) + 250 * b)


def _req(rid, n_prompt, arrival, ttft=None, tpot=None, n_out=0, first_token=None,
         max_tokens=64):
    r = Request(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens),
                arrival, ttft_slo_ms=ttft, tpot_slo_ms=tpot)
    r.all_token_ids += [5] * n_out
    r.first_token_time = first_token
    return r


def test_unattainable_walks_the_queue_in_deadline_order():
    m = StepCostModel(min_samples=1)
    for t in (100, 1000, 2000):
        m.observe(t, 0.01 + 1e-4 * t)  # 1000 tokens: 0.11 s
    # three 1000-token prompts due in 0.3 s each, 1000 tokens per step: the first two fit, the
    # third would start after them; a request without TTFT and one already answered never shed
    q = [_req("a", 1000, 0.0, ttft=300), _req("b", 1000, 0.0, ttft=300),
         _req("c", 1000, 0.0, ttft=300), _req("free", 1000, 0.0),
         _req("started", 1000, 0.0, ttft=1, n_out=2, first_token=0.05)]
    out = unattainable(q, now=0.0, cost=m, per_step=1000, decode_tokens=0)
    assert [r.request_id for r, _ in out] == ["c"]
    assert out[0][1] > 0.3


def test_prefill_limit_keeps_decodes_within_tpot():
    m = StepCostModel(min_samples=1)
    for t in (10, 1000, 2000) + (3,) * 20:  # lately decode-only steps
        m.observe(t, 0.01 + 1e-4 * t)
    # 10 tokens out over 0.45 s, 50 ms objective, the last token to come (max_tokens 11):
    # 0.05 s of slack left: (0.05 - 0.01) / 1e-4 = 400 tokens, less the 3 decodes of this step
    r = _req("d", 10, 0.0, tpot=50, n_out=10, first_token=1.0, max_tokens=11)
    lim = prefill_token_limit([r], now=1.45, cost=m, decode_tokens=3)
    assert lim == 397
    # behind schedule: the step may still last the objective itself
    assert prefill_token_limit([r], now=5.0, cost=m, decode_tokens=3) == 397
    # ahead of schedule: banked slack allows a longer step
    assert prefill_token_limit([r], now=1.0, cost=m, decode_tokens=3) > 397
    assert prefill_token_limit([_req("x", 10, 0.0)], now=1.0, cost=m, decode_tokens=3) is None
    # more tokens to come: the delay is made up over the horizon (32 tokens here): a request
    # that just got its first token does not hold the step to its objective
    fresh = _req("f", 10, 0.0, tpot=50, n_out=1, first_token=1.0, max_tokens=200)
    t_d = max(0.01 + 3e-4, m.recent_step_s)
    allowed = 0.05 * 32 - 0.01 - 31 * t_d
    assert prefill_token_limit([fresh], now=1.01, cost=m, decode_tokens=3) == \
        int((allowed - 0.01) / 1e-4) - 3 > 397
    # ... unless recent steps were long too (sustained overload): then the objective itself
    for _ in range(20):
        m.observe(2000, 0.01 + 1e-4 * 2000)
    assert prefill_token_limit([fresh], now=1.01, cost=m, decode_tokens=3) == 397
