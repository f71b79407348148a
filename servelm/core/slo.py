"""SLO-aware scheduling (``scheduling_policy="slo"``): what a step will cost, which waiting
requests can still meet their time-to-first-token objective, and how many prompt tokens a step
may take without breaking the running requests' time-per-output-token objective.

Goodput (requests meeting both SLOs) is what the policy maximises. Under overload, serving
every request late yields none; so the waiting queue is ordered by TTFT deadline (arrival +
ttft_slo_ms), a request whose deadline is out of reach even behind only the requests that can
still make theirs is shed at once (HTTP 503, ``slo_unattainable``, so its client can go
elsewhere), and prompt work per step is sized so decodes keep their mean TPOT.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

from servelm.core.request import Request


class StepCostModel:
    """Seconds per step as ``a + b * tokens``, fitted online by exponentially weighted least
    squares over the observed steps (recent ones weigh most: the machine and batch mix
    drift). A GPU step is near flat while memory-bound (small decode batches) and linear in
    tokens once compute-bound; one line over the mix is the estimate the policy needs."""

    def __init__(self, decay: float = 0.97, min_samples: int = 8) -> None:
        self.decay, self.min_samples = decay, min_samples
        self.n = 0
        self._s = [0.0] * 5  # weighted sums: w, x, y, xx, xy
        self.recent_step_s = 0.0  # moving average of step times (the steps as they come)
        self.num_outliers = 0

    def observe(self, tokens: int, seconds: float) -> None:
        # a step far slower than the model says is a one-off (a kernel compiled or a CUDA
        # graph captured on first use, a preemption's copies), not the cost of its tokens:
        # left out, or a few such stalls would tilt the line for hundreds of steps
        if self.ready and seconds > 4 * self.predict(tokens) + 0.05:
            self.num_outliers += 1
            return
        d, s = self.decay, self._s
        for i, v in enumerate((1.0, tokens, seconds, tokens * tokens, tokens * seconds)):
            s[i] = s[i] * d + v
        self.recent_step_s = seconds if self.n == 0 else 0.8 * self.recent_step_s + 0.2 * seconds
        self.n += 1

    @property
    def ready(self) -> bool:
        return self.n >= self.min_samples

    def coefficients(self) -> tuple[float, float]:
        """(a seconds, b seconds per token), both >= 0."""
        w, x, y, xx, xy = self._s
        if w == 0:
            return 0.0, 0.0
        den = w * xx - x * x
        b = max(0.0, (w * xy - x * y) / den) if den > 1e-9 * max(1.0, w * xx) else 0.0
        a = (y - b * x) / w
        if a < 0:  # the fit's intercept went negative: a line through the origin instead
            a, b = 0.0, (xy / xx if xx > 0 else 0.0)
        return a, b

    def predict(self, tokens: int) -> float:
        a, b = self.coefficients()
        return a + b * tokens

    def time_for(self, prompt_tokens: int, per_step: int, decode_tokens: int) -> float:
        """Seconds until ``prompt_tokens`` are computed at most ``per_step`` per step, each
        step also carrying ``decode_tokens``."""
        if prompt_tokens <= 0:
            return 0.0
        a, b = self.coefficients()
        steps = math.ceil(prompt_tokens / max(1, per_step))
        return steps * (a + b * decode_tokens) + b * prompt_tokens


def tokens_within(cost: StepCostModel, seconds: float) -> int:
    """Tokens a step can carry and still last at most ``seconds`` (large when the model has
    no per-token cost yet)."""
    a, b = cost.coefficients()
    return int((seconds - a) / b) if b > 0 else 1 << 30


def ttft_deadline(req: Request) -> float:
    """When req's first token is due (wall clock); infinite without a TTFT objective."""
    return (req.arrival_time + req.ttft_slo_ms / 1e3 if req.ttft_slo_ms is not None
            else math.inf)


def deadline_key(req: Request) -> tuple[float, float]:
    """The slo policy's waiting order: earliest TTFT deadline first, then arrival."""
    return ttft_deadline(req), req.arrival_time


def unattainable(waiting: Iterable[Request], now: float, cost: StepCostModel, per_step: int,
                 decode_tokens: int, ahead: int = 0) -> list[tuple[Request, float]]:
    """The waiting requests that cannot meet their TTFT, walking the queue in deadline order:
    each is estimated to start after the prompt work of those before it that can still make
    theirs (a request found hopeless does not delay the ones after it). Returns (request,
    estimated seconds until the queue ahead would have drained). Only requests that never
    produced a token are candidates. ``ahead``: prompt tokens of running requests still to
    compute (they go first)."""
    out = []
    in_flight = cost.predict(decode_tokens)  # the step running now finishes first
    for req in waiting:
        todo = req.num_tokens - req.num_computed_tokens
        if (req.ttft_slo_ms is None or req.num_output_tokens or req.num_output_placeholders
                or req.first_token_time is not None):
            ahead += todo
            continue
        eta = now + in_flight + cost.time_for(ahead + todo, per_step, decode_tokens)
        if eta > ttft_deadline(req):
            out.append((req, eta - now))
        else:
            ahead += todo
    return out


TPOT_HORIZON = 32  # tokens ahead over which a long step's delay may be made up


def prefill_token_limit(running: Iterable[Request], now: float, cost: StepCostModel,
                        decode_tokens: int) -> Optional[int]:
    """Prompt tokens the next step may carry so that no decoding request's mean TPOT goes
    over its objective. TPOT is a mean: a request with n output tokens, H more to come within
    the horizon (TPOT_HORIZON, or fewer by its max_tokens) and later steps as long as recent
    ones (t_d; at least a decode-only step) has ``slo * (n + H - 1) - elapsed - (H - 1) * t_d``
    for this step, and never less than ``slo`` (a request behind catches up only with steps
    shorter than its objective, and starving every prompt would not help it). Without the
    horizon a request that just got its first token would hold every step to ``slo``; with
    later steps assumed decode-only, sustained overload (every step long) would break every
    TPOT. None: no limit."""
    bound = math.inf
    t_d = max(cost.predict(decode_tokens), cost.recent_step_s)
    for r in running:
        if r.tpot_slo_ms is None or r.first_token_time is None:
            continue
        slo, n = r.tpot_slo_ms / 1e3, r.num_output_tokens
        left = (r.params.max_tokens - n) if r.params.max_tokens is not None else TPOT_HORIZON
        h = max(1, min(TPOT_HORIZON, left))
        allowed = slo * (n + h - 1) - (now - r.first_token_time) - (h - 1) * t_d
        bound = min(bound, max(slo, allowed))
    if bound == math.inf or not cost.ready or cost.coefficients()[1] <= 0:
        return None
    return max(0, tokens_within(cost, bound) - decode_tokens)


def retry_after_s(seconds: float) -> int:
    """Whole seconds for a Retry-After header (at least 1)."""
    return max(1, math.ceil(seconds))
