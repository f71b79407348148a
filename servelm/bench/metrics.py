"""Serving-benchmark metrics: pure functions from per-request records to a summary.

Metric names and definitions follow `vllm bench serve`: TTFT is send -> first text chunk, ITL the
gaps between text chunks, TPOT = (E2EL - TTFT) / (output_tokens - 1) for outputs of more than one
token, E2EL send -> end of stream; throughputs divide by the whole benchmark's duration.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

SLO_KEYS = ("ttft", "tpot", "e2el")


@dataclass(frozen=True)
class RequestRecord:
    """What the client saw of one request. Times are time.perf_counter() seconds."""

    prompt_len: int  # the server's usage.prompt_tokens when reported, else the dataset's
    output_tokens: int  # usage.completion_tokens when reported, else the number of text chunks
    send_time: float
    chunk_times: tuple[float, ...]  # arrival of each chunk that carried text
    end_time: float
    error: Optional[str] = None  # None: success

    @property
    def success(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.send_time if self.chunk_times else 0.0

    @property
    def e2el(self) -> float:
        return self.end_time - self.send_time

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    @property
    def tpot(self) -> Optional[float]:
        """Seconds per output token after the first; None for outputs of <= 1 token."""
        if self.output_tokens <= 1:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


@dataclass(frozen=True)
class GoodputSLO:
    """Service-level objectives in ms; a request is "good" when it meets every one set."""

    ttft_ms: Optional[float] = None
    tpot_ms: Optional[float] = None
    e2el_ms: Optional[float] = None

    @classmethod
    def parse(cls, items: Sequence[str]) -> "GoodputSLO":
        """Parse vLLM's `--goodput ttft:500 tpot:50 e2el:2000` syntax."""
        values: dict[str, float] = {}
        for item in items:
            key, sep, value = item.partition(":")
            if not sep or key not in SLO_KEYS:
                raise ValueError(f"--goodput takes KEY:MS pairs with KEY in {', '.join(SLO_KEYS)}"
                                 f" (e.g. --goodput ttft:500 tpot:50); got {item!r}.")
            try:
                ms = float(value)
            except ValueError:
                raise ValueError(f"--goodput {item!r}: {value!r} is not a number of ms.") from None
            if not ms >= 0:
                raise ValueError(f"--goodput {item!r}: the SLO must be >= 0 ms.")
            values[f"{key}_ms"] = ms
        if not values:
            raise ValueError("--goodput needs at least one KEY:MS pair, e.g. ttft:500.")
        return cls(**values)

    def is_met(self, record: RequestRecord) -> bool:
        # vLLM counts the TPOT of a 1-token output as 0.
        measured = {"ttft_ms": record.ttft, "tpot_ms": record.tpot or 0.0, "e2el_ms": record.e2el}
        return all(getattr(self, k) is None or 1000 * v <= getattr(self, k)
                   for k, v in measured.items())


@dataclass(frozen=True)
class BenchSummary:
    """Field names match vLLM's result JSON. Latencies in ms, throughputs per second."""

    completed: int
    failed: int
    duration: float  # seconds, first send to last end
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    request_goodput: Optional[float]  # None: no --goodput given
    output_throughput: float
    total_token_throughput: float
    peak_output_throughput: float  # max over 1 s bins
    peak_concurrent_requests: int
    mean_ttft_ms: float
    median_ttft_ms: float
    p99_ttft_ms: float
    mean_tpot_ms: float
    median_tpot_ms: float
    p99_tpot_ms: float
    mean_itl_ms: float
    median_itl_ms: float
    p99_itl_ms: float
    mean_e2el_ms: float
    median_e2el_ms: float
    p99_e2el_ms: float


def compute_summary(records: Sequence[RequestRecord], duration: float,
                    slo: Optional[GoodputSLO] = None) -> BenchSummary:
    """Summarize a run; only successful requests count towards tokens and latencies."""
    if duration <= 0:
        raise ValueError(f"duration must be > 0 s, got {duration}.")
    ok = [r for r in records if r.success]
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    ttfts = _stats_ms([r.ttft for r in ok])
    tpots = _stats_ms([r.tpot for r in ok if r.tpot is not None])
    itls = _stats_ms([gap for r in ok for gap in r.itls])
    e2els = _stats_ms([r.e2el for r in ok])
    start = min((r.send_time for r in records), default=0.0)
    timeline = output_throughput_timeline(ok, start)
    goodput = None if slo is None else sum(slo.is_met(r) for r in ok) / duration
    return BenchSummary(
        completed=len(ok),
        failed=len(records) - len(ok),
        duration=duration,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        request_throughput=len(ok) / duration,
        request_goodput=goodput,
        output_throughput=output_tokens / duration,
        total_token_throughput=(input_tokens + output_tokens) / duration,
        peak_output_throughput=max(timeline, default=0.0),
        peak_concurrent_requests=peak_concurrency(records),
        mean_ttft_ms=ttfts[0], median_ttft_ms=ttfts[1], p99_ttft_ms=ttfts[2],
        mean_tpot_ms=tpots[0], median_tpot_ms=tpots[1], p99_tpot_ms=tpots[2],
        mean_itl_ms=itls[0], median_itl_ms=itls[1], p99_itl_ms=itls[2],
        mean_e2el_ms=e2els[0], median_e2el_ms=e2els[1], p99_e2el_ms=e2els[2],
    )


def output_throughput_timeline(records: Sequence[RequestRecord], start: float,
                               bin_s: float = 1.0) -> list[float]:
    """Output tokens/s in consecutive `bin_s` bins from `start`.

    A request's output tokens are spread evenly over its text chunks, since a chunk may carry
    several tokens when the server reports more completion tokens than it sent chunks.
    """
    times = [t for r in records for t in r.chunk_times]
    weights = [r.output_tokens / len(r.chunk_times) for r in records for _ in r.chunk_times]
    if not times:
        return []
    # bins: [num_bins] indexed by floor((t - start) / bin_s)
    idx = np.floor((np.asarray(times) - start) / bin_s).astype(np.int64).clip(min=0)
    tokens = np.bincount(idx, weights=np.asarray(weights))
    return [float(x) for x in tokens / bin_s]


def peak_concurrency(records: Sequence[RequestRecord]) -> int:
    """Most requests in flight at once, each in flight over [send_time, end_time)."""
    # An end sorts before a send at the same instant: back-to-back requests do not overlap.
    events = sorted([(r.send_time, 1) for r in records] + [(r.end_time, -1) for r in records])
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def _stats_ms(values_s: Sequence[float]) -> tuple[float, float, float]:
    """(mean, median, p99) in ms; zeros when there is nothing to measure, as vLLM reports."""
    if not values_s:
        return 0.0, 0.0, 0.0
    ms = 1000 * np.asarray(values_s, dtype=np.float64)
    return float(ms.mean()), float(np.median(ms)), float(np.percentile(ms, 99))


def format_table(summary: BenchSummary, max_concurrency: Optional[int] = None) -> str:
    """The result table in `vllm bench serve`'s layout."""
    s = summary
    lines = ["{:=^50}".format(" Serving Benchmark Result ")]

    def row(label: str, value: object) -> None:
        fmt = "{:<40} {:<10.2f}" if isinstance(value, float) else "{:<40} {:<10}"
        lines.append(fmt.format(label, value))

    row("Successful requests:", s.completed)
    row("Failed requests:", s.failed)
    if max_concurrency is not None:
        row("Maximum request concurrency:", max_concurrency)
    row("Benchmark duration (s):", s.duration)
    row("Total input tokens:", s.total_input_tokens)
    row("Total generated tokens:", s.total_output_tokens)
    row("Request throughput (req/s):", s.request_throughput)
    if s.request_goodput is not None:
        row("Request goodput (req/s):", s.request_goodput)
    row("Output token throughput (tok/s):", s.output_throughput)
    row("Peak output token throughput (tok/s):", s.peak_output_throughput)
    row("Peak concurrent requests:", s.peak_concurrent_requests)
    row("Total token throughput (tok/s):", s.total_token_throughput)
    for key, name, header in (("ttft", "TTFT", "Time to First Token"),
                              ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
                              ("itl", "ITL", "Inter-token Latency"),
                              ("e2el", "E2EL", "End-to-end Latency")):
        lines.append("{:-^50}".format(header))
        for stat in ("mean", "median", "p99"):
            label = "P99" if stat == "p99" else stat.capitalize()
            row(f"{label} {name} (ms):", getattr(s, f"{stat}_{key}_ms"))
    lines.append("=" * 50)
    return "\n".join(lines)
