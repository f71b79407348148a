"""The live dashboard: ``GET /dashboard`` (a static page), its assets, and ``/dashboard/data``.

The page holds no data, so it and its assets are served without the API key; the data
endpoint takes the same ``check_api_key`` dependency as /v1 (401 in OpenAI's shape). The page
polls ``/dashboard/data?since=<last step seen>`` about once a second and draws its charts
itself (plain JS and <canvas>, no external assets).
"""
from __future__ import annotations

import re
from collections import deque
from importlib import resources
from typing import Any, Callable, Iterable, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response

from servelm.server.protocol import APIError, bad_request
from servelm.server.serving import dumps

# name -> media type; nothing else under /dashboard/static is served (no path handling at all)
_ASSETS = {"dashboard.html": "text/html; charset=utf-8",
           "dashboard.js": "text/javascript; charset=utf-8",
           "dashboard.css": "text/css; charset=utf-8"}
# the page may load only its own assets and talk only to this server
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                                       "frame-ancestors 'none'"}
_THROUGHPUT_WINDOW_S = 10.0  # tokens/s: over the steps of the last 10 s
_MIN_SPAN_S = 1.0  # a step's record has its start time only: a shorter span overstates the rate
_SINCE = re.compile(r"-?\d{1,18}")  # fits msgpack's int64


class StepHistory:
    """The step records this server has received, oldest first. Each poll asks the core only
    for the steps after the newest one here (a snapshot of every step the core keeps costs its
    loop milliseconds), and the throughput window may reach back further than the core's ring
    buffer does."""

    def __init__(self, maxlen: int = 4096) -> None:
        self.steps: deque[dict] = deque(maxlen=maxlen)

    @property
    def last_step(self) -> int:
        return self.steps[-1]["step"] if self.steps else -1

    def add(self, num_steps: int, steps: Iterable[dict]) -> None:
        """The steps of a snapshot whose core has taken ``num_steps`` steps in all."""
        if num_steps - 1 < self.last_step:  # another core (a new app lifespan): start again
            self.steps.clear()
        last = self.last_step  # two polls in flight may both bring the same steps
        self.steps.extend(s for s in steps if s["step"] > last)

    def after(self, since: int) -> list[dict]:
        out = []
        for s in reversed(self.steps):  # the newest few, usually
            if s["step"] <= since:
                break
            out.append(s)
        return out[::-1]


def add_dashboard(app: FastAPI, check_api_key: Callable) -> None:
    """Registers the page, its assets and the data endpoint on ``app``."""
    history = StepHistory()  # this app's, like everything else it keeps

    @app.get("/dashboard", include_in_schema=False)
    async def page() -> Response:
        return _asset("dashboard.html")

    @app.get("/dashboard/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        return _asset(name)

    @app.get("/dashboard/data", dependencies=[Depends(check_api_key)])
    async def data(request: Request) -> Response:
        since = parse_since(request.query_params.get("since"))
        serving = request.app.state.serving
        try:
            snap = await serving.client.get_telemetry(history.last_step)
        except TimeoutError as e:
            raise APIError(503, str(e), type="service_unavailable", code="timeout") from None
        history.add(snap["num_steps"], snap["steps"])
        # the rates need the whole window, not only the steps this page has not seen
        body = {**snap, **summarize({**snap, "steps": history.steps}), "model": serving.model_name,
                "steps": history.after(since)}
        return Response(dumps(body), media_type="application/json",
                        headers={"Cache-Control": "no-store"})


def _asset(name: str) -> Response:
    media_type = _ASSETS.get(name)
    if media_type is None:
        raise APIError(404, f"no dashboard asset {name!r}.", code="not_found")
    body = resources.files("servelm.server").joinpath("static", name).read_bytes()
    return Response(body, media_type=media_type, headers=_HEADERS)


def parse_since(value: Optional[str]) -> int:
    """``since``: the last step the page has seen (-1, the default: none)."""
    if value is None:
        return -1
    if not _SINCE.fullmatch(value.strip()) or int(value) < -1:
        raise bad_request(f"since must be an integer >= -1 (the last step seen; -1 for all "
                          f"kept steps), got {value[:40]!r}.", "since")
    return int(value)


def percentiles(values: list[float], qs: tuple[int, ...] = (50, 90, 99)) -> dict:
    """{'p50': ..., 'count': n} by linear interpolation between ranks (numpy's default);
    None for each when there are no values."""
    xs = sorted(values)
    out: dict[str, Any] = {"count": len(xs)}
    for q in qs:
        if not xs:
            out[f"p{q}"] = None
            continue
        pos = (len(xs) - 1) * q / 100
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        out[f"p{q}"] = xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
    return out


def summarize(snap: dict) -> dict:
    """The figures the page shows as numbers, from a telemetry snapshot whose ``steps`` are
    all the recent ones (oldest first), not only those after some ``since``."""
    ttft, tpot = [], []
    for t in snap["finished"]:
        first = t["first_token_time"]
        if first is None:
            continue  # aborted or refused before its first token
        ttft.append((first - t["arrival_time"]) * 1e3)
        n = t["num_output_tokens"]
        if n > 1 and t["finished_time"] is not None:
            tpot.append((t["finished_time"] - first) * 1e3 / (n - 1))
    out_tps, total_tps, span = _throughput(snap["steps"], snap["time"])
    queries, n_slo = snap["prefix_cache_queries"], snap["num_slo_requests"]
    return {
        "ttft_ms": percentiles(ttft), "tpot_ms": percentiles(tpot),
        "output_tokens_per_s": out_tps, "total_tokens_per_s": total_tps,
        "throughput_window_s": span,
        "prefix_cache_hit_rate": snap["prefix_cache_hits"] / queries if queries else None,
        # requests shed by the slo policy count as misses (num_shed says how many)
        "slo_attainment": snap["num_slo_met"] / n_slo if n_slo else None,
    }


def _throughput(steps: Any, now: float) -> tuple[float, float, float]:
    """(output tokens/s, all tokens/s, seconds observed) over the steps of the last
    _THROUGHPUT_WINDOW_S, or since the oldest step kept when the engine's life is shorter.
    Missing step numbers (the core's ring buffer overflowed between two polls) take their
    share of the time around them out of the window rather than count as idle. Output tokens
    are the decode tokens: one per request sampling its next token (a step record does not
    say how many drafts were accepted)."""
    start = now - _THROUGHPUT_WINDOW_S
    if steps:
        start = max(start, steps[0]["time"])
    decode = total = 0
    missing = 0.0
    later = None
    for s in reversed(steps):  # ``steps``: oldest first (a list or a deque)
        if s["time"] < start:
            break
        decode += s["num_decode_tokens"]
        total += s["num_prefill_tokens"] + s["num_decode_tokens"] + s["num_spec_tokens"]
        k = later["step"] - s["step"] if later is not None else 1
        if k > 1:  # k - 1 steps missing between these two: that share of the time between
            missing += (later["time"] - s["time"]) * (k - 1) / k
        later = s
    span = max(now - start - missing, _MIN_SPAN_S)
    return decode / span, total / span, span
