"""Token-budget scheduler.

There is no prefill phase and decode phase: each request has ``num_tokens - num_computed_tokens``
tokens still to compute, and every step hands out at most ``max_num_batched_tokens`` of them,
running requests first (oldest first), then waiting ones in FCFS order. One rule covers continuous
batching, chunked prefill, prefix-cache hits and preemption by recompute.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Optional

from servelm.config import CacheConfig, SchedulerConfig
from servelm.core.kv_cache import KVCacheManager
from servelm.core.request import Request, RequestStatus
from servelm.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the runner has not seen (or sees again after preemption): full state."""

    req_id: str
    token_ids: list[int]  # prompt + outputs so far
    num_prompt_tokens: int
    params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    """A request the runner already holds: only what changed."""

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    new_reqs: list[NewRequestData]
    cached_reqs: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]  # req id -> tokens to compute this step, batch order
    total_num_scheduled_tokens: int
    finished_req_ids: set[str]  # runner drops their state
    preempted_req_ids: set[str] = field(default_factory=set)


@dataclass
class EngineCoreOutput:
    """One request's news from one step."""

    req_id: str
    new_token_ids: list[int]
    finish_reason: Optional[str] = None
    stop_reason: int | str | None = None
    new_logprobs: Optional[list[dict[int, tuple[float, int]]]] = None  # per token: id -> (lp, rank)
    prompt_logprobs: Optional[list[Optional[dict[int, tuple[float, int]]]]] = None
    num_cached_tokens: int = 0


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int


class Scheduler:
    def __init__(self, sched: SchedulerConfig, cache: CacheConfig, num_blocks: int) -> None:
        self.config = sched
        self.kv = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.finished_ids: set[str] = set()  # finished since the last schedule(): tell the runner
        self.ignored: list[Request] = []  # requests that can never fit, reported at next update
        self.num_preemptions = 0
        # req id -> prompt-logprob rows computed so far, reported once the prompt is done
        self._prompt_logprobs: dict[str, list] = {}

    # ---- requests in and out -------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def finish_requests(self, req_ids: Iterable[str], status: RequestStatus) -> None:
        """Abort or stop (stop string) requests: frees their blocks at once."""
        for rid in req_ids:
            req = self.requests.pop(rid, None)
            if req is None or req.is_finished:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            req.status = status
            self._free(req)

    def _free(self, req: Request) -> None:
        self.kv.free(req)
        self.finished_ids.add(req.request_id)
        self._prompt_logprobs.pop(req.request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running or self.ignored)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(len(self.running), len(self.waiting), self.kv.usage,
                              self.num_preemptions, self.kv.stats.queries, self.kv.stats.hits)

    # ---- one step ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        preempted: set[str] = set()

        # 1. Running requests, oldest first; preempt the newest when blocks run out.
        bs, caching = self.kv.block_size, self.kv.enable_caching
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            computed = req.num_computed_tokens
            n = min(len(req.all_token_ids) - computed, budget)
            # common decode step: room left in the last block and no block fills up
            if (computed + n <= len(req.block_ids) * bs
                    and (not caching or (computed + n) // bs == computed // bs)):
                new_blocks = []
            else:
                new_blocks = self.kv.allocate_slots(req, n)
            while new_blocks is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted.add(victim.request_id)
                if victim is req:
                    break
                new_blocks = self.kv.allocate_slots(req, n)
            if new_blocks is None:
                break  # req itself was preempted
            num_scheduled[req.request_id] = n
            budget -= n
            cached_reqs.append(CachedRequestData(req.request_id, new_blocks,
                                                 req.num_computed_tokens))
            i += 1

        # 2. Waiting requests, FCFS, unless this step already had to preempt.
        while (self.waiting and budget > 0 and not preempted
               and len(self.running) < self.config.max_num_seqs):
            req = self.waiting[0]
            if not self.kv.can_ever_fit(req.num_tokens + 1):
                self.waiting.popleft()
                self._ignore(req, f"the sequence ({req.num_tokens} tokens) does not fit in the KV "
                                  f"cache ({self.kv.num_blocks * self.kv.block_size} tokens)")
                continue
            computed = self.kv.get_computed_blocks(req) if req.num_computed_tokens == 0 else []
            num_computed = req.num_computed_tokens + len(computed) * self.kv.block_size
            n = req.num_tokens - num_computed
            if n > budget and not self.config.enable_chunked_prefill:
                break
            n = min(n, budget)
            if self.kv.allocate_slots(req, n, computed) is None:
                break
            self.waiting.popleft()
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = len(computed) * self.kv.block_size
                if self.kv.enable_caching and req.params.prompt_logprobs is None:
                    self.kv.record_lookup(req.num_tokens, req.num_cached_tokens)
            req.num_computed_tokens = num_computed
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            num_scheduled[req.request_id] = n
            budget -= n
            new_reqs.append(self._new_req_data(req))

        out = SchedulerOutput(new_reqs, cached_reqs, num_scheduled,
                              sum(num_scheduled.values()), self.finished_ids, preempted)
        self.finished_ids = set()
        return out

    def _new_req_data(self, req: Request) -> NewRequestData:
        return NewRequestData(req.request_id, list(req.all_token_ids), req.num_prompt_tokens,
                              req.params, list(req.block_ids), req.num_computed_tokens)

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._prompt_logprobs.pop(req.request_id, None)
        self.waiting.appendleft(req)

    def _ignore(self, req: Request, reason: str) -> None:
        req.status = RequestStatus.FINISHED_IGNORED
        req.stop_reason = reason
        self.requests.pop(req.request_id, None)
        if req in self.running:
            self.running.remove(req)
        self._free(req)
        self.ignored.append(req)

    def update(self, sched: SchedulerOutput, sampled: dict[str, list[int]],
               logprobs: dict[str, list[dict[int, tuple[float, int]]]],
               prompt_logprobs: dict[str, list]) -> list[EngineCoreOutput]:
        """Advance computed counts, append sampled tokens, check stops, free finished."""
        outputs: list[EngineCoreOutput] = []
        for req in self.ignored:
            outputs.append(EngineCoreOutput(req.request_id, [], req.status.finish_reason,
                                            req.stop_reason, num_cached_tokens=0))
        self.ignored = []
        # hot loop (once per running request per step): locals, no per-request list removal
        requests, running_status = self.requests, RequestStatus.RUNNING
        max_len = self.config.max_model_len
        finished = False
        for rid, n in sched.num_scheduled_tokens.items():
            req = requests.get(rid)
            if req is None or req.status != running_status:
                continue  # aborted or preempted since scheduling
            req.num_computed_tokens += n
            if prompt_logprobs and rid in prompt_logprobs:
                self._prompt_logprobs.setdefault(rid, []).extend(prompt_logprobs[rid])
            new_tokens = sampled.get(rid)
            if not new_tokens:
                continue  # a chunk of a prompt: nothing to report yet
            appended = []
            for t in new_tokens:
                req.all_token_ids.append(t)
                appended.append(t)
                if req.check_stop(max_len):
                    break
            out = EngineCoreOutput(rid, appended, None, None, logprobs.get(rid) if logprobs else None,
                                   num_cached_tokens=max(req.num_cached_tokens, 0))
            if req.params.prompt_logprobs is not None and req.num_output_tokens == len(appended):
                out.prompt_logprobs = [None] + self._prompt_logprobs.pop(rid, [])
            if req.status != running_status:
                out.finish_reason, out.stop_reason = req.status.finish_reason, req.stop_reason
                requests.pop(rid, None)
                self._free(req)
                finished = True
            outputs.append(out)
        if finished:
            self.running = [r for r in self.running if r.status == running_status]
        return outputs
