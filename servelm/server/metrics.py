"""Prometheus metrics with vLLM's names under the ``servelm:`` prefix, in a per-app registry.

Request-level counters and latency histograms are fed by the engine client's output listener
(every step's RequestOutputs); the scheduler gauges and counters come from the core's
SchedulerStats, fetched when /metrics is scraped.
"""
from __future__ import annotations

import time
from typing import Iterator, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, Metric,
                                    SummaryMetricFamily)
from prometheus_client.registry import Collector

from servelm.core.step import SchedulerStats
from servelm.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class _SchedulerCollector(Collector):
    """Exposes the latest SchedulerStats the API process has seen."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.stats = SchedulerStats(0, 0, 0.0, 0, 0, 0)

    def collect(self) -> Iterator[Metric]:
        s, label = self.stats, [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"servelm:{name}", doc, labels=["model_name"])
            g.add_metric(label, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(f"servelm:{name}", doc, labels=["model_name"])
            c.add_metric(label, value)
            return c

        yield gauge("num_requests_running", "Sequences in the running batch.", s.num_running)
        yield gauge("num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting)
        yield gauge("num_requests_swapped", "Sequences swapped out to host memory.",
                    s.num_swapped)
        yield gauge("kv_cache_usage_perc", "KV cache usage (fraction of blocks in use, 0-1).",
                    s.kv_cache_usage)
        yield counter("num_preemptions", "Preemptions (by recompute or swap).", s.num_preemptions)
        yield counter("prefix_cache_queries", "Prefix cache queries, in tokens.",
                      s.prefix_cache_queries)
        yield counter("prefix_cache_hits", "Prefix cache hits, in tokens.", s.prefix_cache_hits)
        yield counter("spec_decode_num_drafts", "Speculative verifications (a request's drafts "
                      "checked in one step).", s.spec_num_drafts)
        yield counter("spec_decode_num_draft_tokens", "Draft tokens verified.",
                      s.spec_num_draft_tokens)
        yield counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                      s.spec_num_accepted_tokens)
        per_pos = CounterMetricFamily("servelm:spec_decode_num_accepted_tokens_per_pos",
                                      "Draft tokens accepted, by position in the draft.",
                                      labels=["model_name", "position"])
        for pos, n in enumerate(s.spec_accepted_per_pos):
            per_pos.add_metric([self.model_name, str(pos)], n)
        yield per_pos
        exits = CounterMetricFamily("servelm:early_exit_tokens",
                                    "Tokens that exited early, by the layers they ran.",
                                    labels=["model_name", "layer"])
        for layer, n in sorted(s.early_exit_tokens.items()):
            exits.add_metric([self.model_name, str(layer)], n)
        yield exits
        yield counter("cascade_requests", "Requests a cascade answered (servelm serve "
                      "--cascade).", s.cascade_requests)
        yield counter("cascade_escalations", "Of those, the ones escalated from the small "
                      "model to the large.", s.cascade_escalations)
        if s.max_lora:  # vLLM's lora_requests_info: the adapters in labels, the value a time
            info = GaugeMetricFamily("servelm:lora_requests_info", "LoRA adapters of the "
                                     "running and waiting requests (comma-separated), and the "
                                     "adapter slots.", labels=["max_lora", "running_lora_adapters",
                                                               "waiting_lora_adapters"])
            info.add_metric([str(s.max_lora), ",".join(s.running_lora_adapters),
                             ",".join(s.waiting_lora_adapters)], time.time())
            yield info
        if s.cascade_latency:
            lat = SummaryMetricFamily("servelm:cascade_request_latency_seconds",
                                      "A cascade's requests from arrival to the end of the "
                                      "answer, by the model that answered.",
                                      labels=["model_name", "path"])
            for path, (count, total) in sorted(s.cascade_latency.items()):
                lat.add_metric([self.model_name, path], count_value=count, sum_value=total)
            yield lat


class ServerMetrics:
    """One per app. Implements the engine client's OutputListener."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self.model_name = model_name
        self.prompt_tokens = Counter("servelm:prompt_tokens", "Prefill tokens processed.",
                                     labels, registry=r).labels(model_name)
        self.generation_tokens = Counter("servelm:generation_tokens", "Generated tokens.",
                                         labels, registry=r).labels(model_name)
        self.request_success = Counter("servelm:request_success", "Finished requests.",
                                       labels + ["finished_reason"], registry=r)
        self.ttft = Histogram("servelm:time_to_first_token_seconds", "Time to first token.",
                              labels, buckets=_TTFT_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("servelm:inter_token_latency_seconds", "Time between tokens.",
                             labels, buckets=_ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("servelm:e2e_request_latency_seconds", "Arrival to finish.",
                             labels, buckets=_E2E_BUCKETS, registry=r).labels(model_name)
        for reason in ("stop", "length", "abort"):  # present from the start, like vLLM
            self.request_success.labels(model_name, reason)
        self._scheduler = _SchedulerCollector(model_name)
        r.register(self._scheduler)
        self._last_token_time: dict[str, float] = {}  # request id -> time of its last tokens

    # ---- OutputListener -----------------------------------------------------------------
    def on_outputs(self, outputs: list[RequestOutput], now: float) -> None:
        for ro in outputs:
            new = sum(ro.new_token_counts)
            if new:
                self.generation_tokens.inc(new)
                last = self._last_token_time.get(ro.request_id)
                if last is None:
                    self.ttft.observe(max(0.0, now - ro.metrics.arrival_time))
                    self.prompt_tokens.inc(len(ro.prompt_token_ids))
                else:
                    self.itl.observe(max(0.0, now - last))
                self._last_token_time[ro.request_id] = now
            if ro.finished:
                self._last_token_time.pop(ro.request_id, None)
                self.e2e.observe(max(0.0, now - ro.metrics.arrival_time))
                for c in ro.outputs:
                    self.request_success.labels(self.model_name, c.finish_reason or "abort").inc()

    def on_abort(self, request_id: str, num_children: int) -> None:
        self._last_token_time.pop(request_id, None)
        self.request_success.labels(self.model_name, "abort").inc(num_children)

    # ---- exposition ---------------------------------------------------------------------
    def render(self, stats: Optional[SchedulerStats]) -> bytes:
        if stats is not None:
            self._scheduler.stats = stats
        return generate_latest(self.registry)
