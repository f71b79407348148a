"""What the scheduler saw, kept for the live dashboard: recent steps and request timelines.

Bounded ring buffers owned by the Scheduler (one per engine core, no module state). A step
record is a few ints; a timeline is written once when its request finishes. ``snapshot``
returns plain dicts and lists (msgpack and JSON ready), only the steps after ``since_step``,
so a page polling twice a second receives each step once.
"""
from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

from servelm.core.request import Request


@dataclass
class StepRecord:
    step: int  # index of the step since the engine started
    time: float  # wall clock (time.time()) when it was scheduled
    num_prefill_tokens: int  # prompt tokens (and recomputed ones after preemption)
    num_decode_tokens: int  # one per request sampling its next token
    num_spec_tokens: int  # draft tokens verified (speculative decoding)
    num_running: int
    num_waiting: int
    num_swapped: int
    kv_cache_usage: float  # fraction of KV blocks held by requests


@dataclass
class RequestTimeline:
    request_id: str
    arrival_time: float
    first_scheduled_time: Optional[float]  # queued until then
    first_token_time: Optional[float]  # prefilling until then, decoding after
    finished_time: Optional[float]  # None while the request runs
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    num_preemptions: int
    finish_reason: Optional[str]
    ttft_slo_ms: Optional[float]
    tpot_slo_ms: Optional[float]
    slo_met: Optional[bool]  # both SLOs met; None when the request set none


def timeline(req: Request) -> RequestTimeline:
    return RequestTimeline(
        req.request_id, req.arrival_time, req.first_scheduled_time, req.first_token_time,
        req.finished_time, req.num_prompt_tokens, req.num_output_tokens,
        max(req.num_cached_tokens, 0), req.num_preemptions,
        req.status.finish_reason if req.is_finished else None,
        req.ttft_slo_ms, req.tpot_slo_ms, req.slo_met())


class Telemetry:
    def __init__(self, max_steps: int = 600, max_finished: int = 200) -> None:
        self.steps: deque[StepRecord] = deque(maxlen=max_steps)
        self.finished: deque[RequestTimeline] = deque(maxlen=max_finished)
        self.num_steps = 0
        # totals since start (counters, for rates between two snapshots)
        self.num_finished = 0
        self.num_slo_requests = 0  # finished requests that set an SLO
        self.num_slo_met = 0
        self.num_shed = 0  # refused by the slo policy (counted as misses)

    def record_step(self, t: float, prefill: int, decode: int, spec: int, running: int,
                    waiting: int, swapped: int, usage: float) -> None:
        self.steps.append(StepRecord(self.num_steps, t, prefill, decode, spec, running, waiting,
                                     swapped, usage))
        self.num_steps += 1

    def record_finished(self, req: Request, shed: bool = False) -> None:
        tl = timeline(req)
        self.finished.append(tl)
        self.num_finished += 1
        self.num_shed += shed
        if tl.slo_met is not None:
            self.num_slo_requests += 1
            self.num_slo_met += tl.slo_met

    def snapshot(self, since_step: int, live: Iterable[Request], max_live: int = 100) -> dict:
        """Steps after ``since_step`` (-1: all kept), the last finished timelines, and those of
        up to ``max_live`` unfinished requests (running first, then the oldest waiting)."""
        steps = [asdict(s) for s in self.steps if s.step > since_step]
        live_tl = []
        for i, req in enumerate(live):
            if i >= max_live:
                break
            live_tl.append(asdict(timeline(req)))
        return {"num_steps": self.num_steps, "steps": steps,
                "finished": [asdict(t) for t in self.finished], "live": live_tl,
                "num_finished": self.num_finished, "num_slo_requests": self.num_slo_requests,
                "num_slo_met": self.num_slo_met, "num_shed": self.num_shed}
