"""The dashboard's data: what the Scheduler records per step (batch composition, queue lengths,
KV usage) and per request (queued, first scheduled, first token, finished; SLO met), the
snapshot's ``since`` filtering, and the figures the server derives from a snapshot.

Runs the Scheduler with the fake model runner of test_scheduler and a fake clock, so every
time in a timeline is known exactly."""
from __future__ import annotations

import random

import pytest

from servelm.core.request import Request, RequestStatus
from servelm.core.telemetry import Telemetry
from servelm.sampling_params import SamplingParams
from tests.unit.test_scheduler import EOS, Driver, add, fake_proposer, make, rand_prompt


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def composition(sched) -> list[tuple[int, int, int]]:
    return [(s.num_prefill_tokens, s.num_decode_tokens, s.num_spec_tokens)
            for s in sched.telemetry.steps]


def request(rid: str, n_prompt: int, arrival: float, max_tokens: int, **slo) -> Request:
    return Request(rid, list(range(10, 10 + n_prompt)), SamplingParams(max_tokens=max_tokens),
                   arrival, eos_token_ids=(EOS,), **slo)


# ---- steps -----------------------------------------------------------------------------------
def test_step_composition_chunked_prefill_and_decode():
    """A 100-token prompt in chunks of the 64-token budget, then a short prompt joining a
    decode step: each step's record splits its tokens into prefill and decode."""
    sched, runner = make(budget=64, caching=False)
    add(sched, "a", rand_prompt(random.Random(0), 100), max_tokens=3)
    d = Driver(sched, runner)
    d.step()  # a: 64 prompt tokens
    d.step()  # a: the last 36, samples its first token
    add(sched, "b", rand_prompt(random.Random(1), 10), max_tokens=2)
    d.step()  # a decodes, b's whole prompt
    d.step()  # both decode; both finish
    assert not sched.has_unfinished_requests()
    assert composition(sched) == [(64, 0, 0), (36, 0, 0), (10, 1, 0), (0, 2, 0)]
    steps = list(sched.telemetry.steps)
    assert [s.step for s in steps] == [0, 1, 2, 3]
    assert [s.num_running for s in steps] == [1, 1, 2, 2]
    assert all(s.num_waiting == 0 and s.num_swapped == 0 for s in steps)
    assert all(0 < s.kv_cache_usage <= 1 for s in steps)
    assert sched.telemetry_snapshot()["kv_cache_usage"] == 0  # all freed


def test_step_records_waiting_requests():
    sched, runner = make(max_num_seqs=1)
    add(sched, "a", [11, 12, 13], max_tokens=2)
    add(sched, "b", [21, 22, 23], max_tokens=2)
    Driver(sched, runner).run()
    steps = list(sched.telemetry.steps)
    assert (steps[0].num_running, steps[0].num_waiting) == (1, 1)
    assert (steps[-1].num_running, steps[-1].num_waiting) == (1, 0)


def test_spec_tokens_counted_apart_from_decode():
    """With drafts, a request verifying k drafts counts as one decode token plus k speculative
    ones; every step's parts add up to the tokens it scheduled."""
    sched, runner = make(budget=64, max_num_seqs=8, proposer=fake_proposer)
    rng = random.Random(3)
    for i in range(5):
        add(sched, f"r{i}", rand_prompt(rng, rng.randrange(3, 20)), max_tokens=12)
    d = Driver(sched, runner)
    d.run()
    scheduled = [so for so in d.trace if so.total_num_scheduled_tokens]
    records = list(sched.telemetry.steps)
    assert len(records) == len(scheduled)
    for so, rec in zip(scheduled, records):
        spec = so.scheduled_spec_decode_tokens
        assert rec.num_spec_tokens == sum(len(v) for v in spec.values())
        assert rec.num_decode_tokens == sum(
            1 for rid, n in so.num_scheduled_tokens.items() if n - len(spec.get(rid, ())) == 1)
        assert (rec.num_prefill_tokens + rec.num_decode_tokens + rec.num_spec_tokens
                == so.total_num_scheduled_tokens)
    assert sum(r.num_spec_tokens for r in records) > 0
    assert sum(r.num_prefill_tokens for r in records) > 0


# ---- snapshots -------------------------------------------------------------------------------
def test_snapshot_since_returns_only_later_steps():
    sched, runner = make(budget=8, caching=False)
    add(sched, "a", list(range(10, 30)), max_tokens=4)
    Driver(sched, runner).run()
    n = sched.telemetry.num_steps
    assert n >= 5
    snap = sched.telemetry_snapshot(-1)
    assert snap["num_steps"] == n
    assert [s["step"] for s in snap["steps"]] == list(range(n))
    assert [s["step"] for s in sched.telemetry_snapshot(1)["steps"]] == list(range(2, n))
    assert sched.telemetry_snapshot(n - 1)["steps"] == []
    assert sched.telemetry_snapshot(n + 100)["steps"] == []
    # the totals of stats() ride along
    for key in ("num_running", "num_waiting", "num_swapped", "kv_cache_usage", "num_preemptions",
                "prefix_cache_queries", "prefix_cache_hits", "time", "num_finished"):
        assert key in snap, key


def test_ring_buffers_keep_the_newest():
    tel = Telemetry(max_steps=5, max_finished=2)
    for i in range(8):
        tel.record_step(float(i), i, 0, 0, 1, 0, 0, 0.5)
    assert [s["step"] for s in tel.snapshot(-1, [])["steps"]] == [3, 4, 5, 6, 7]
    assert [s["step"] for s in tel.snapshot(5, [])["steps"]] == [6, 7]
    for i in range(3):
        r = request(f"r{i}", 3, 0.0, 1)
        r.status = RequestStatus.FINISHED_LENGTH
        tel.record_finished(r)
    snap = tel.snapshot(-1, [])
    assert [t["request_id"] for t in snap["finished"]] == ["r1", "r2"]
    assert snap["num_finished"] == 3  # counters are totals, not the buffer's length


# ---- request timelines -----------------------------------------------------------------------
def test_timelines_have_each_phase_time_and_slo_outcome():
    sched, runner = make(max_num_seqs=2, caching=False)
    clock = sched.clock = Clock(10.0)
    sched.add_request(request("a", 8, 10.0, 3, ttft_slo_ms=2000, tpot_slo_ms=1500))
    sched.add_request(request("b", 5, 10.0, 3, ttft_slo_ms=100))  # missed: 1.5 s to 1st token
    sched.add_request(request("c", 4, 10.2, 3))  # no slot: waits, then is aborted
    d = Driver(sched, runner)

    def later() -> None:  # between schedule (and the runner) and update: the step's run time
        clock.t += 0.5

    clock.t = 11.0
    d.step(between=later)  # schedules a, b at 11.0; their first tokens land at 11.5
    live = {t["request_id"]: t for t in sched.telemetry_snapshot()["live"]}
    assert set(live) == {"a", "b", "c"}
    assert (live["a"]["first_scheduled_time"], live["a"]["first_token_time"]) == (11.0, 11.5)
    assert live["a"]["finished_time"] is None and live["a"]["num_output_tokens"] == 1
    assert live["c"]["first_scheduled_time"] is None  # still queued
    clock.t = 12.0
    sched.finish_requests(["c"], RequestStatus.FINISHED_ABORTED)
    d.step(between=later)  # second tokens at 12.5
    clock.t = 13.0
    d.step(between=later)  # third tokens at 13.5: both finish
    assert not sched.has_unfinished_requests()

    snap = sched.telemetry_snapshot()
    assert snap["live"] == []
    done = {t["request_id"]: t for t in snap["finished"]}
    a, b, c = done["a"], done["b"], done["c"]
    assert (a["arrival_time"], a["first_scheduled_time"], a["first_token_time"],
            a["finished_time"]) == (10.0, 11.0, 11.5, 13.5)
    assert (a["num_prompt_tokens"], a["num_output_tokens"], a["finish_reason"]) == (8, 3, "length")
    assert a["slo_met"] is True  # TTFT 1500 ms <= 2000; TPOT (13.5 - 11.5) / 2 = 1000 <= 1500
    assert b["slo_met"] is False
    assert (c["first_scheduled_time"], c["first_token_time"], c["finished_time"],
            c["finish_reason"], c["slo_met"]) == (None, None, 12.0, "abort", None)
    assert (snap["num_finished"], snap["num_slo_requests"], snap["num_slo_met"],
            snap["num_shed"]) == (3, 2, 1, 0)
    assert [s["time"] for s in snap["steps"]] == [11.0, 12.0, 13.0]


# ---- what the server derives from a snapshot -------------------------------------------------
def test_dashboard_figures():
    from servelm.server.dashboard import percentiles, summarize

    assert percentiles([]) == {"count": 0, "p50": None, "p90": None, "p99": None}
    p = percentiles([50.0, 10.0, 40.0, 20.0, 30.0])
    assert p["count"] == 5 and p["p50"] == 30.0
    assert p["p90"] == pytest.approx(46.0) and p["p99"] == pytest.approx(49.6)

    def tl(arrival, first, finished, n_out):
        return {"arrival_time": arrival, "first_token_time": first, "finished_time": finished,
                "num_output_tokens": n_out}

    now = 100.0
    steps = [{"step": i, "time": now - 20 + i, "num_prefill_tokens": 10, "num_decode_tokens": 4,
              "num_spec_tokens": 2} for i in range(20)]  # one a second, 20 s
    snap = {"time": now, "steps": steps,
            "finished": [tl(0.0, 0.1, 1.1, 11), tl(0.0, 0.3, 0.3, 1), tl(0.0, None, 0.5, 0)],
            "prefix_cache_queries": 200, "prefix_cache_hits": 50,
            "num_slo_requests": 4, "num_slo_met": 3}
    out = summarize(snap)
    assert out["ttft_ms"]["count"] == 2 and out["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert out["tpot_ms"]["count"] == 1 and out["tpot_ms"]["p50"] == pytest.approx(100.0)
    # the last 10 s hold the steps at t = 90 .. 99
    assert out["throughput_window_s"] == 10.0
    assert out["output_tokens_per_s"] == pytest.approx(4.0)
    assert out["total_tokens_per_s"] == pytest.approx(16.0)
    assert out["prefix_cache_hit_rate"] == 0.25 and out["slo_attainment"] == 0.75

    # a young engine: the window is its life so far; nothing to divide yet: None
    young = summarize({**snap, "steps": steps[-3:], "finished": [], "prefix_cache_queries": 0,
                       "num_slo_requests": 0})
    assert young["throughput_window_s"] == pytest.approx(3.0)
    assert young["output_tokens_per_s"] == pytest.approx(4.0)
    assert young["prefix_cache_hit_rate"] is None and young["slo_attainment"] is None
    assert young["ttft_ms"]["p50"] is None
    idle = summarize({**snap, "steps": []})
    assert idle["output_tokens_per_s"] == 0 and idle["total_tokens_per_s"] == 0
    # steps the server never received (steps 12..15, t = 92..95) are not idle time: their 4 s
    # leave the window, and the rate is over the 6 s seen
    holes = summarize({**snap, "steps": [s for s in steps if not 12 <= s["step"] <= 15]})
    assert holes["throughput_window_s"] == pytest.approx(6.0)
    assert holes["output_tokens_per_s"] == pytest.approx(4.0)


def test_server_step_history():
    """The server asks the core only for steps it has not seen, and answers each page's since."""
    from servelm.server.dashboard import StepHistory

    def steps(lo, hi):
        return [{"step": i, "time": float(i)} for i in range(lo, hi)]

    h = StepHistory(maxlen=5)
    assert h.last_step == -1 and h.after(-1) == []
    h.add(3, steps(0, 3))
    h.add(4, steps(1, 4))  # a second poll in flight brought some of the same steps
    assert [s["step"] for s in h.steps] == [0, 1, 2, 3] and h.last_step == 3
    h.add(7, steps(4, 7))
    assert [s["step"] for s in h.steps] == [2, 3, 4, 5, 6]  # the newest maxlen
    assert [s["step"] for s in h.after(4)] == [5, 6] and h.after(6) == []
    assert [s["step"] for s in h.after(-1)] == [2, 3, 4, 5, 6]
    h.add(2, steps(0, 2))  # a new core counts from 0 again
    assert [s["step"] for s in h.steps] == [0, 1]


@pytest.mark.parametrize("value,want", [(None, -1), ("-1", -1), ("0", 0), ("42", 42),
                                        (" 7 ", 7)])
def test_since_parsing(value, want):
    from servelm.server.dashboard import parse_since
    assert parse_since(value) == want


@pytest.mark.parametrize("value", ["", "abc", "-2", "1.5", "1e3", "0x10", "9" * 19])
def test_since_parsing_refuses(value):
    from servelm.server.dashboard import parse_since
    from servelm.server.protocol import APIError
    with pytest.raises(APIError) as info:
        parse_since(value)
    assert info.value.status == 400 and info.value.param == "since"
