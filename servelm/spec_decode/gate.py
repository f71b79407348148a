"""Whether drafting pays at the current load, decided from what steps measured.

Verifying k drafts per request makes a step compute (k + 1)x the tokens, and drafting keeps the
host from overlapping the next step with this one. At small batches that is nearly free (a
decode step is bound by reading the weights) and accepted drafts multiply throughput; at large
batches the step becomes compute-bound and speculation can cost more than it returns (vLLM's
n-gram slows busy servers down). No fixed threshold is right for every model, GPU and
acceptance rate, so the gate measures both arms: output tokens per second of wall time of
steps that verified drafts ("spec") and of steps that did not ("plain"), per batch-size bucket
(powers of two), as exponentially weighted averages; it picks the faster arm, and every
`explore_every` steps of a bucket re-measures the other one for `explore_steps` steps.

Timing decides only whether a step verifies drafts, never which tokens come out: greedy output
is the target's argmax either way, and seeded sampling draws per token position
(sampling.sampler.position_seed), so outputs stay reproducible."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class _Arm:
    tokens: float = 0.0  # EW average output tokens per step
    seconds: float = 0.0  # EW average wall seconds per step
    n: int = 0  # steps measured
    seen: int = 0  # steps observed (the first is not measured: first-use compiles, captures)
    last: int = -1  # the bucket's step count at the latest measurement

    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Bucket:
    arms: dict = field(default_factory=lambda: {True: _Arm(), False: _Arm()})
    steps: int = 0
    exploring: int = 0  # steps left of re-measuring the arm that is not the best


class SpeculationGate:
    def __init__(self, clock: Callable[[], float] = time.perf_counter, explore_every: int = 128,
                 explore_steps: int = 4, alpha: float = 0.25) -> None:
        self.clock = clock
        self.explore_every, self.explore_steps, self.alpha = explore_every, explore_steps, alpha
        self.buckets: dict[int, _Bucket] = {}
        self._prev: tuple[float, bool] | None = None  # (end time, arm) of the previous step

    @staticmethod
    def _key(num_samplers: int) -> int:
        return max(1, num_samplers).bit_length()

    def choose(self, num_samplers: int) -> bool:
        """Draft for the next step of a batch of num_samplers sampling requests?"""
        b = self.buckets.setdefault(self._key(num_samplers), _Bucket())
        spec, plain = b.arms[True], b.arms[False]
        if spec.n < self.explore_steps:  # measure speculation first, then the plain arm
            return True
        if plain.n < self.explore_steps:
            return False
        best = spec.tok_s() >= plain.tok_s()
        if b.exploring:
            b.exploring -= 1
            return not best
        if b.steps - b.arms[not best].last > self.explore_every:
            b.exploring = self.explore_steps - 1
            return not best
        return best

    def interrupt(self) -> None:
        """A step that sampled nothing (prompt chunks only) ran: the next interval is no
        decode step's cost."""
        self._prev = None

    def observe(self, num_samplers: int, drafted: bool, tokens: int) -> None:
        """A step finished (on the host's clock: launched, for an overlapped step): tokens it
        produced, whether it verified drafts. The interval since the previous step is its cost;
        the first step after a switch of arms is not counted (its interval mixes both), nor an
        arm's first step in a bucket (a CUDA graph captured or a kernel compiled on first use),
        nor an interval far longer than the arm's average (the engine was idle in between)."""
        now = self.clock()
        prev, self._prev = self._prev, (now, drafted)
        b = self.buckets.setdefault(self._key(num_samplers), _Bucket())
        b.steps += 1
        if prev is None or prev[1] != drafted:
            return
        dt = now - prev[0]
        arm = b.arms[drafted]
        arm.seen += 1
        if dt <= 0 or arm.seen == 1 or (arm.n >= 2 and dt > 4 * arm.seconds):
            return
        a = self.alpha if arm.n else 1.0
        arm.tokens += a * (tokens - arm.tokens)
        arm.seconds += a * (dt - arm.seconds)
        arm.n += 1
        arm.last = b.steps
