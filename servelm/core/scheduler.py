"""Token-budget scheduler.

There is no prefill phase and decode phase: each request has ``num_tokens - num_computed_tokens``
tokens still to compute, and every step hands out at most ``max_num_batched_tokens`` of them,
running requests first (oldest first), then waiting ones in FCFS order. One rule covers continuous
batching, chunked prefill, prefix-cache hits and preemption by recompute.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from servelm.config import CacheConfig, SchedulerConfig
from servelm.core.kv_cache import KVCacheManager
from servelm.core.request import Request, RequestStatus
from servelm.core.request_queue import REQUEST_QUEUES, priority_key, worst_running
from servelm.core.step import (CachedRequestData, EngineCoreOutput, KVEviction,
                               ModelRunnerOutput, NewRequestData, SchedulerOutput,
                               SchedulerStats, TokenLogprobs)
from servelm.core.slo import (StepCostModel, prefill_token_limit, retry_after_s, tokens_within,
                              unattainable)
from servelm.core.telemetry import Telemetry


@dataclass
class SpecDecodeCounters:
    """Speculative decoding since start: verifications, draft tokens verified, of those
    accepted, and accepted ones by draft position (0 = first; a token tree's: by depth)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def count(self, num_drafts: int, num_accepted: int, num_positions: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        per_pos = self.accepted_per_pos
        per_pos.extend([0] * (num_positions - len(per_pos)))
        for i in range(num_accepted):
            per_pos[i] += 1


def _plain_greedy(req: Request) -> bool:
    """The request's next tokens are the argmax of the raw logits, with nothing reported but
    the tokens: no temperature, logprobs, penalties, logit bias, pending min_tokens, grammar or
    adapter (the tokens a multi-step schedule feeds back without the sampler)."""
    p = req.params
    return (p.greedy and p.logprobs is None and not p.logit_bias and not p.needs_penalties
            and p.min_tokens <= req.num_output_tokens and p.structured_outputs is None
            and req.lora_request is None)


def _lora_names(reqs: Iterable[Request], config: SchedulerConfig) -> list[str]:
    if not config.max_loras:  # (no adapters: no queue walk)
        return []
    return sorted({r.lora_request.lora_name for r in reqs if r.lora_request is not None})


class Scheduler:
    def __init__(self, sched: SchedulerConfig, cache: CacheConfig, num_blocks: int,
                 num_host_blocks: int = 0, clock: Callable[[], float] = time.time) -> None:
        self.config = sched
        self.clock = clock  # wall clock, as requests' arrival times (a fake one in simulations)
        self.telemetry = Telemetry()
        # (partial blocks are not cached under KV eviction: its scores would not follow)
        self.kv = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching,
                                 num_host_blocks if sched.preemption_mode == "swap" else 0,
                                 cache.sliding_window, cache_partial=cache.kv_eviction is None)
        self.requests: dict[str, Request] = {}
        # KV eviction (None: off): requests keep at most a budget of tokens' KV
        self.eviction = cache.kv_eviction
        self.policy = sched.policy
        self.waiting = REQUEST_QUEUES[sched.policy]()
        self.running: list[Request] = []
        self.swapped: list[Request] = []  # KV in host memory; resume before any waiting request
        self._swap_out: list[tuple[int, int]] = []  # this step's (GPU, host) copies
        self.finished_ids: set[str] = set()  # finished since the last schedule(): tell the runner
        self.ignored: list[Request] = []  # requests that can never fit, reported at next update
        self.num_preemptions = 0
        self.spec = SpecDecodeCounters()
        self.early_exit_tokens: dict[int, int] = {}  # layer count -> tokens exited after it
        # step cost, learnt from the time between steps (the slo policy's estimates): steps
        # launched and not yet timed, as (launch time, tokens)
        self.cost = StepCostModel()
        self._launched: list[tuple[float, int, int]] = []  # (time, tokens, passes)

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
            elif req.status == RequestStatus.SWAPPED:
                self.swapped.remove(req)
            else:
                self.waiting.remove(req)
            req.status = status
            self._finish(req)

    def _finish(self, req: Request) -> None:
        """A request's end, whatever ended it: free its blocks, keep its timeline."""
        req.finished_time = self.clock()
        self.telemetry.record_finished(req, shed=req.status == RequestStatus.FINISHED_SHED)
        self.kv.free(req)
        self.finished_ids.add(req.request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running or self.swapped or self.ignored)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(len(self.running), len(self.waiting), self.kv.usage,
                              self.num_preemptions, self.kv.stats.queries, self.kv.stats.hits,
                              len(self.swapped), self.spec.num_drafts,
                              self.spec.num_draft_tokens, self.spec.num_accepted_tokens,
                              list(self.spec.accepted_per_pos), dict(self.early_exit_tokens),
                              max_lora=self.config.max_loras,
                              running_lora_adapters=_lora_names(self.running, self.config),
                              waiting_lora_adapters=_lora_names(self.waiting, self.config))

    def telemetry_snapshot(self, since_step: int = -1) -> dict:
        """Recent steps and request timelines for the dashboard (see core/telemetry.py), with
        the totals of stats()."""
        live = [*self.running, *self.swapped, *self.waiting]
        snap = self.telemetry.snapshot(since_step, live)
        st = self.stats()
        snap.update(num_running=st.num_running, num_waiting=st.num_waiting,
                    num_swapped=st.num_swapped, kv_cache_usage=st.kv_cache_usage,
                    num_preemptions=st.num_preemptions,
                    prefix_cache_queries=st.prefix_cache_queries,
                    prefix_cache_hits=st.prefix_cache_hits, time=self.clock())
        a, b = self.cost.coefficients()  # what the slo policy and step-time caps estimate by
        snap["step_cost"] = {"base_ms": a * 1e3, "per_token_us": b * 1e6,
                             "recent_step_ms": self.cost.recent_step_s * 1e3,
                             "samples": self.cost.n, "outliers": self.cost.num_outliers}
        return snap

    # ---- one step ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        now = self.clock()
        self._time_steps(now)
        budget = self.config.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        preempted: set[str] = set()
        spec_tokens: dict[str, list[int]] = {}
        # priority policy: an urgent waiting request first takes slots and blocks from less
        # urgent running ones (they wait again, in their place)
        urgent_preempted = self._preempt_for_urgent() if self.policy == "priority" else set()

        # 1. Running requests, oldest first; preempt the newest when blocks run out. Tokens still
        # in flight (placeholders) count as known: their step runs before this one.
        bs, caching = self.kv.block_size, self.kv.enable_caching
        # prompt tokens this step may take: capped while some request decodes, so a long prompt
        # cannot stretch the step (and the decodes' inter-token latency)
        prefill_left = self._prefill_budget(now, budget)
        rho = None  # _draft_cost_ratio(), once per step that has drafts
        # pipeline stages: the running requests split into pipeline_depth batches that take
        # turns (a batch of all of them would leave the other stages nothing to do)
        depth = self.config.pipeline_depth
        seq_cap = -(-len(self.running) // depth) if depth > 1 else len(self.running)
        # num_scheduler_steps: this schedule's decodes run this many forward passes at once
        # (the runner feeds each greedy token back); their KV slots are reserved now
        steps = self._multi_steps()
        i = 0
        while i < len(self.running) and budget > 0 and len(num_scheduled) < seq_cap:
            req = self.running[i]
            if req.num_output_placeholders and depth > 1:
                i += 1  # its token is still going through the stages: another batch's turn
                continue
            computed = req.num_computed_tokens
            total = len(req.all_token_ids) + req.num_output_placeholders
            if req.num_output_placeholders and (
                    total >= self._length_cap(req) or (req.params.max_tokens is not None and
                                         total - req.num_prompt_tokens >= req.params.max_tokens)):
                i += 1  # its last token is in flight: nothing more to compute
                continue
            n = min(total - computed, budget)
            assert n >= 1, f"{req.request_id}: nothing to compute ({total} tokens, {computed} done)"
            evict = False
            if self.eviction is not None:
                evict, n = self._eviction_plan(req, n)
            if n > 1:  # a prompt chunk (or a recompute after preemption): prefill work
                n = min(n, prefill_left)
                if n <= 0:
                    i += 1
                    continue
                prefill_left -= n
            if req.spec_token_ids:  # proposed for this step only: used now or dropped
                # drafts follow the last landed token: stale if another is still in flight
                if rho is None:
                    rho = self._draft_cost_ratio()
                drafts = ([] if req.num_output_placeholders
                          else self._fit_drafts(req, budget - n, rho))
                req.spec_token_ids = []
                if drafts:
                    spec_tokens[req.request_id] = drafts
                    n += len(drafts)
            la = self._lookahead(computed + n) + steps - 1
            self.kv.free_outside_window(req)  # (sliding-window models only)
            eviction = self._evict(req) if evict else None
            held = computed - req.num_evicted  # tokens its cache holds
            # common decode step: room left in the last block and no block fills up
            if (held + n + la <= len(req.block_ids) * bs
                    and (not caching or req.num_evicted or (computed + n) // bs == computed // bs)):
                new_blocks = []
            else:
                new_blocks = self.kv.allocate_slots(req, n, (), la)
            while new_blocks is None:
                victim = self._victim(i)
                self._preempt(victim)
                preempted.add(victim.request_id)
                if victim is req:
                    break
                new_blocks = self.kv.allocate_slots(req, n, (), la)
            if new_blocks is None:
                spec_tokens.pop(req.request_id, None)
                break  # req itself was preempted
            num_scheduled[req.request_id] = n
            budget -= n
            cached_reqs.append(CachedRequestData(req.request_id, new_blocks,
                                                 req.num_computed_tokens, req.num_null_blocks,
                                                 req.num_evicted, eviction))
            req.num_computed_tokens += n + steps - 1  # (the positions of the steps' tokens)
            if req.num_computed_tokens >= total:  # samples this step
                req.num_output_placeholders += 1
            i += 1

        # 2. Swapped-out requests come back (their KV copied in) before waiting ones (under the
        # priority policy: before less urgent ones).
        swap_in: list[tuple[int, int]] = []
        # multi-LoRA: the distinct adapters running at once stay within max_loras (slots)
        loras = ({r.lora_request.lora_int_id for r in self.running if r.lora_request}
                 if self.config.max_loras else None)
        while (self._swapped_first() and budget > 0 and not preempted and not urgent_preempted
               and len(self.running) < self.config.max_num_seqs):
            req = self.swapped[0]
            if req.num_output_placeholders:
                break  # swapped while its last step was in flight: resume once it lands
            if not self._lora_fits(req, loras):
                break
            n = min(req.num_tokens - req.num_computed_tokens, budget, self._eviction_room(req))
            if n > 1:  # swapped in the middle of its prompt
                n = min(n, prefill_left)
                if n <= 0:
                    break
                prefill_left -= n
            la = self._lookahead(req.num_computed_tokens + n)
            if self.kv.swap_in_blocks_needed(req, n, la) > self.kv.pool.num_free_blocks:
                break
            swap_in += self.kv.swap_in(req)
            new_blocks = self.kv.allocate_slots(req, n, (), la)
            assert new_blocks is not None
            self.swapped.pop(0)
            self._lora_add(req, loras)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            num_scheduled[req.request_id] = n
            budget -= n
            new_reqs.append(self._new_req_data(req))
            req.num_computed_tokens += n
            if req.num_computed_tokens == req.num_tokens:  # samples this step
                req.num_output_placeholders += 1

        # 3. Waiting requests, FCFS, unless this step already had to preempt (or swapped-out
        # requests still wait for blocks).
        skipped: list[Request] = []  # their adapter would be one too many: they keep their place
        copies: list[tuple[int, int]] = []  # partial blocks taken copy-on-write
        while (self.waiting and budget > 0 and prefill_left > 0 and not preempted
               and not self._swapped_first() and len(self.running) < self.config.max_num_seqs):
            req = self.waiting.peek()
            if req.num_output_placeholders:
                break  # preempted while its last step was in flight: resume once it lands
            if not self._lora_fits(req, loras):
                skipped.append(self.waiting.popleft())
                continue
            if not self.kv.can_ever_fit(self._tokens_held(req) + 1
                                        + self._lookahead(req.num_tokens)):
                self.waiting.popleft()
                self._ignore(req, f"the sequence ({req.num_tokens} tokens) does not fit in the KV "
                                  f"cache ({self.kv.num_blocks * self.kv.block_size} tokens)")
                continue
            computed = self.kv.get_computed_blocks(req) if req.num_computed_tokens == 0 else []
            if self.eviction is not None:  # a hit of at most the budget
                computed = computed[:self._budget(req) // self.kv.block_size]
            partial = (self.kv.get_partial_hit(req, len(computed))
                       if req.num_computed_tokens == 0 else None)
            num_computed = (req.num_computed_tokens + len(computed) * self.kv.block_size
                            + (partial[1] if partial else 0))
            n = req.num_tokens - num_computed
            room = min(budget, prefill_left)
            if self.eviction is not None:  # (a recompute's tokens past the budget: later)
                room = min(room, self._budget(req) + self.kv.block_size - num_computed)
            if n > room and not self.config.enable_chunked_prefill and self.eviction is None:
                break
            n = min(n, room)
            if self.kv.allocate_slots(req, n, computed, self._lookahead(num_computed + n),
                                      partial) is None:
                break
            if partial:
                copies.append((partial[0], req.block_ids[len(computed)]))
            self.waiting.popleft()
            self._lora_add(req, loras)
            if req.first_scheduled_time is None:
                req.first_scheduled_time = self.clock()
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_computed - req.num_computed_tokens
                if self.kv.enable_caching and req.params.prompt_logprobs is None:
                    self.kv.record_lookup(req.num_tokens, req.num_cached_tokens)
            req.num_computed_tokens = num_computed
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            num_scheduled[req.request_id] = n
            budget -= n
            prefill_left -= n
            new_reqs.append(self._new_req_data(req))
            req.num_computed_tokens += n
            if req.num_computed_tokens == req.num_tokens:  # samples this step
                req.num_output_placeholders += 1

        for req in reversed(skipped):
            self.waiting.appendleft(req)
        # the adapters that kept requests waiting: workers read them ahead (no queue scan)
        prefetch = list({r.lora_request.lora_int_id: r.lora_request for r in skipped}.values())

        out = SchedulerOutput(new_reqs, cached_reqs, num_scheduled,
                              sum(num_scheduled.values()), self.finished_ids,
                              preempted | urgent_preempted, spec_tokens, self._swap_out,
                              swap_in, copies, prefetch, num_scheduler_steps=steps)
        self.finished_ids, self._swap_out = set(), []
        if num_scheduled:
            self._record_step(out, now)
            self._launched.append((now, out.total_num_scheduled_tokens, steps))
        return out

    def _time_steps(self, now: float) -> None:
        """Teach the cost model how long the last step took: the time between two schedule()
        calls of a busy engine. With asynchronous scheduling the wait in between is for the
        step before the last one (the last was launched just before that wait)."""
        lag = 2 if self.config.async_scheduling else 1
        if len(self._launched) >= lag:
            _, tokens, passes = self._launched[-lag]
            # (a multi-step schedule's passes: each one step of those tokens)
            self.cost.observe(tokens, (now - self._launched[-1][0]) / passes)
            del self._launched[:len(self._launched) - lag + 1]

    def _prefill_budget(self, now: float, budget: int) -> int:
        """Prompt tokens this step may take. While requests decode it is capped, so a long
        prompt cannot stretch the step (their inter-token latency): by a token count
        (max_prefill_tokens_while_decoding), by a step time (max_step_ms_while_decoding,
        through the step-cost model), and under the slo policy by the decodes' TPOT."""
        cfg = self.config
        cap, step_ms = cfg.max_prefill_tokens_while_decoding, cfg.max_step_ms_while_decoding
        if cap is None and step_ms is None and self.policy != "slo":
            return budget
        n_decoding, prefilling = 0, 0  # running requests' decodes and prompt tokens left
        for r in self.running:
            left = r.num_tokens + r.num_output_placeholders - r.num_computed_tokens
            if left <= 1:
                n_decoding += 1
            else:
                prefilling += left
        prefill_left = budget
        if n_decoding and cap is not None:
            prefill_left = min(prefill_left, cap)
        if n_decoding and step_ms is not None and self.cost.ready:
            # at least a block: prompts still move when decodes alone overrun the target
            fit = tokens_within(self.cost, step_ms / 1e3) - n_decoding
            prefill_left = min(prefill_left, max(fit, self.kv.block_size))
        if self.policy == "slo":
            prefill_left = self._slo_limits(now, prefill_left, n_decoding, prefilling)
        return prefill_left

    def _slo_limits(self, now: float, prefill_left: int, n_decoding: int,
                    prefilling: int) -> int:
        """The slo policy, each step: shed the waiting requests that can no longer meet their
        TTFT, and cap this step's prompt tokens so decodes keep their TPOT."""
        if not self.cost.ready:
            return prefill_left
        limit = prefill_token_limit(self.running, now, self.cost, n_decoding)
        if limit is not None:
            prefill_left = min(prefill_left, limit)
        per_step = max(1, min(prefill_left, self.config.max_num_batched_tokens - n_decoding))
        for req, wait_s in unattainable(list(self.waiting), now, self.cost, per_step, n_decoding,
                                        prefilling):
            self.waiting.remove(req)
            req.status = RequestStatus.FINISHED_SHED
            req.stop_reason = retry_after_s(wait_s)  # seconds: the HTTP Retry-After
            self.requests.pop(req.request_id, None)
            self._finish(req)
            self.ignored.append(req)  # reported at the next update
        return prefill_left

    def _record_step(self, out: SchedulerOutput, now: float) -> None:
        """The step's batch composition for the dashboard: a request computing exactly one
        token (plus drafts) decodes; more is prompt work (a chunk, or a recompute)."""
        spec = out.scheduled_spec_decode_tokens
        num_spec = sum(len(d) for d in spec.values()) if spec else 0
        num_decode = sum(1 for rid, n in out.num_scheduled_tokens.items()
                         if n - (len(spec[rid]) if rid in spec else 0) == 1)
        self.telemetry.record_step(now, out.total_num_scheduled_tokens - num_spec
                                   - num_decode, num_decode, num_spec, len(self.running),
                                   len(self.waiting), len(self.swapped), self.kv.usage)

    def _swapped_first(self) -> bool:
        """Whether the next swapped-out request resumes before the waiting queue's head: always
        (it ran already), except under the priority policy for a less urgent one, which would
        otherwise come straight back into the room just taken from it for an urgent request."""
        if not self.swapped:
            return False
        if self.policy != "priority" or not self.waiting:
            return True
        return priority_key(self.swapped[0]) <= priority_key(self.waiting.peek())

    def _victim(self, i: int) -> Request:
        """The running request to preempt when running[i] needs blocks: the newest (FCFS), or
        the least urgent (priority), among those not yet scheduled this step (i onwards)."""
        if self.policy != "priority":
            return self.running.pop()
        victim = max(self.running[i:], key=priority_key)
        self.running.remove(victim)
        return victim

    def _preempt_for_urgent(self) -> set[str]:
        """While the most urgent waiting request lacks a batch slot or the blocks of its first
        chunk, preempt running requests less urgent than it, least urgent first."""
        out: set[str] = set()
        if not self.waiting:
            return out
        head = self.waiting.peek()
        if head.num_output_placeholders or not self.kv.can_ever_fit(self._tokens_held(head) + 1):
            return out
        first_chunk = min(head.num_tokens - head.num_computed_tokens + 1,
                          self.config.max_num_batched_tokens)
        need = self.kv.blocks_needed(first_chunk)
        while (len(self.running) >= self.config.max_num_seqs
               or self.kv.pool.num_free_blocks < need):
            victim = worst_running(self.running, than=head)
            if victim is None:
                break
            self.running.remove(victim)
            self._preempt(victim)
            out.add(victim.request_id)
        return out

    # ---- KV eviction --------------------------------------------------------------------
    def _eviction_plan(self, req: Request, n: int) -> tuple[bool, int]:
        """Under KV eviction, before req computes n more tokens: whether its cache, which
        would then hold more than budget + a block, shrinks to the budget first; and n capped
        so that it stays within budget + a block."""
        budget, bs = self._budget(req), self.kv.block_size
        held = self.kv.cache_len(req)
        evict = held > budget and held + n > budget + bs
        return evict, min(n, budget + bs - (budget if evict else held))

    def _budget(self, req: Request) -> int:
        """req's KV budget: its own (kv_eviction_budget) or the engine's."""
        return req.params.kv_eviction_budget or self.eviction.budget

    def _evict(self, req: Request) -> Optional[KVEviction]:
        """Shrink req's cache to the budget now (the runner moves the survivors before this
        step's forward). None when the pool lacks blocks for copy-on-write copies of blocks
        other requests share: it then holds up to a block more for a step."""
        budget = self._budget(req)
        done = self.kv.evict(req, budget, self.eviction.fixed_blocks(self.kv.block_size))
        return KVEviction(done[0], budget, done[1]) if done else None

    def _eviction_room(self, req: Request) -> int:
        """Tokens req may compute before its next eviction (no bound without eviction; a
        swapped-in request evicts on its next step as a running one)."""
        if self.eviction is None:
            return 1 << 62
        return max(1, self._budget(req) + self.kv.block_size - self.kv.cache_len(req))

    def _tokens_held(self, req: Request) -> int:
        """The most tokens req's cache will hold at once."""
        if self.eviction is None:
            return req.num_tokens
        return min(req.num_tokens, self._budget(req) + self.kv.block_size)

    def _length_cap(self, req: Request) -> float:
        """The sequence length that ends req: max_model_len, except under KV eviction for a
        request with max_tokens (its cache holds a budget, not the sequence)."""
        if self.eviction is not None and req.params.max_tokens is not None:
            return math.inf
        return self.config.max_model_len

    def _multi_steps(self) -> int:
        """Forward passes this schedule covers (num_scheduler_steps, vLLM's multi-step
        scheduling): more than one only while every running request decodes plain greedy
        tokens and nothing else waits (no prompt to admit or finish, no swapped request, no
        drafts, no token in flight), at most the tokens each request may still generate, and
        only if the free blocks hold every extra position (a multi-step schedule never
        preempts)."""
        n = self.config.num_scheduler_steps
        if n <= 1 or self.waiting or self.swapped or not self.running or self.eviction is not None:
            return 1
        for req in self.running:
            total = len(req.all_token_ids)
            if (req.num_output_placeholders or req.spec_token_ids
                    or total - req.num_computed_tokens != 1 or not _plain_greedy(req)):
                return 1
            left = self._length_cap(req) - total
            if req.params.max_tokens is not None:
                left = min(left, req.params.max_tokens - (total - req.num_prompt_tokens))
            n = min(n, int(left))
            if n <= 1:
                return 1
        bs = self.kv.block_size
        need = sum(max(0, -(-(r.num_computed_tokens - r.num_evicted + n) // bs) - len(r.block_ids))
                   for r in self.running)
        return n if need <= self.kv.pool.num_free_blocks else 1

    def _lookahead(self, num_tokens: int) -> int:
        """Slots to reserve past a request's first num_tokens (a draft model writes their KV),
        never past max_model_len."""
        la = self.config.num_lookahead_tokens
        return max(0, min(la, self.config.max_model_len - num_tokens)) if la else 0

    def _fit_drafts(self, req: Request, budget: int, rho: float) -> list[int]:
        """The drafts to verify this step: within the token budget, never past what the
        request may still generate (all drafts accepted plus one more token must fit both
        max_model_len and max_tokens), and only those worth their verification: with
        per-draft acceptance a, the j-th draft yields a^j tokens for one more token of step
        work, and is kept while a^j >= rho, what a token of verification costs against a
        request's share of the step (``_draft_cost_ratio``). One is always kept, to notice a
        change of content."""
        room = self.config.max_model_len - req.num_tokens - 1
        if req.params.max_tokens is not None:
            room = min(room, req.params.max_tokens - req.num_output_tokens - 1)
        a = req.spec_acceptance
        if rho <= 0 or a >= 0.99 or self.config.draft_tree_depth:
            # (a tree's nodes: any prefix is a subtree whose depth is at most its size, so the
            # room bound above holds for it as well)
            worth = room
        elif a <= 0:
            worth = 1
        else:
            worth = 1 + int(math.log(rho) / math.log(a))
        k = min(len(req.spec_token_ids), budget, room, max(1, worth))
        return req.spec_token_ids[:k] if k > 0 else []

    def _draft_cost_ratio(self) -> float:
        """b * B / (a + b * B) from the step-cost model (a + b * tokens) at B running
        requests: the cost of one more token in a step against one request's share of it.
        Near 0 while decode steps are bound by reading the weights (drafts ride along nearly
        free), toward 1 once steps are compute-bound. 0 until the model has samples."""
        if not self.cost.ready:
            return 0.0
        a, b = self.cost.coefficients()
        B = max(1, len(self.running))
        return b * B / (a + b * B) if a + b * B > 0 else 0.0

    def _lora_fits(self, req: Request, loras: Optional[set[int]]) -> bool:
        """Whether req's adapter may run now: resident in the running set, or a slot left."""
        return (loras is None or req.lora_request is None
                or req.lora_request.lora_int_id in loras or len(loras) < self.config.max_loras)

    @staticmethod
    def _lora_add(req: Request, loras: Optional[set[int]]) -> None:
        if loras is not None and req.lora_request is not None:
            loras.add(req.lora_request.lora_int_id)

    def _new_req_data(self, req: Request) -> NewRequestData:
        # the Request's own list (no copy): the message covers its first num_tokens entries
        return NewRequestData(req.request_id, req.all_token_ids, req.num_tokens,
                              req.num_prompt_tokens, req.params, list(req.block_ids),
                              req.num_computed_tokens, req.grammar, req.num_evicted,
                              req.lora_request)

    def _preempt(self, req: Request) -> None:
        """Take req's blocks: swapped out to host memory (preemption_mode="swap", while there
        is room) or freed, its KV to be recomputed when it runs again."""
        req.spec_token_ids = []
        req.num_preemptions += 1
        self.num_preemptions += 1
        pairs = self.kv.swap_out(req) if self.kv.num_host_blocks else None
        if pairs is not None:
            self._swap_out += pairs
            req.status = RequestStatus.SWAPPED
            self.swapped.append(req)
            # resume order: as the waiting queue would order them (policy, then arrival)
            self.swapped.sort(key=priority_key if self.policy == "priority"
                              else (lambda r: r.arrival_time))
            return
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        self.waiting.appendleft(req)

    def _ignore(self, req: Request, reason: str) -> None:
        req.status = RequestStatus.FINISHED_IGNORED
        req.stop_reason = reason
        self.requests.pop(req.request_id, None)
        if req in self.running:
            self.running.remove(req)
        self._finish(req)
        self.ignored.append(req)

    def update(self, sched: SchedulerOutput, out: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Append a step's sampled tokens (and roll back rejected drafts), check stops, free
        finished requests, keep the drafts proposed for the next step. Computed counts moved
        at schedule time; with asynchronous scheduling a later step is already scheduled."""
        outputs: list[EngineCoreOutput] = []
        for req in self.ignored:
            outputs.append(EngineCoreOutput(req.request_id, [], req.status.finish_reason,
                                            req.stop_reason, num_cached_tokens=0))
        self.ignored = []
        # hot loop (once per running request per step): locals, no per-request list removal
        requests, running_status = self.requests, RequestStatus.RUNNING
        sampled, logprobs = out.sampled_token_ids, out.logprobs
        prompt_lps, drafts = out.prompt_logprobs_dict, out.draft_token_ids
        spec = sched.scheduled_spec_decode_tokens
        cache_blocks = self.kv.enable_caching
        for n, count in out.early_exit_tokens.items():
            self.early_exit_tokens[n] = self.early_exit_tokens.get(n, 0) + count
        finished = False
        for rid in sched.num_scheduled_tokens:
            req = requests.get(rid)
            if req is None:
                continue  # aborted or stopped since scheduling
            new_tokens = sampled.get(rid)
            if new_tokens:
                req.num_output_placeholders -= 1
            if req.status != running_status:
                if new_tokens and req.status in (RequestStatus.PREEMPTED, RequestStatus.SWAPPED):
                    outputs.append(self._land_preempted(
                        req, new_tokens, logprobs.get(rid) if logprobs else None))
                continue
            if sched.num_scheduler_steps > 1 and len(new_tokens or ()) < sched.num_scheduler_steps:
                # the runner ran fewer passes than scheduled (a step it could not repeat): the
                # positions it did not compute get computed from the next step on
                req.num_computed_tokens -= sched.num_scheduler_steps - len(new_tokens or ())
            if spec and rid in spec:
                # k drafts verified, len(new_tokens) - 1 of them accepted: the KV of the rejected
                # ones is stale and gets recomputed (overwritten) from the first rejected position
                num_accepted = len(new_tokens) - 1 if new_tokens else 0
                req.num_computed_tokens -= len(spec[rid]) - num_accepted
                k = len(spec[rid])
                depth = self.config.draft_tree_depth
                self.spec.count(k, num_accepted, min(k, depth) if depth else k)
                # recent acceptance (a moving average, quick to follow a change of content)
                req.spec_acceptance = (0.5 * req.spec_acceptance
                                       + 0.5 * num_accepted / len(spec[rid]))
            if drafts and rid in drafts:
                # proposed after these tokens: stale if a later step is already in flight
                req.spec_token_ids = [] if req.num_output_placeholders else drafts[rid]
            plp = prompt_lps.get(rid) if prompt_lps else None
            if not new_tokens:
                if plp is not None:  # a chunk of a prompt: only its prompt logprobs to report
                    outputs.append(EngineCoreOutput(rid, [], prompt_logprobs=plp[1],
                                                    prompt_logprobs_start=plp[0]))
                continue
            o = self._append(req, new_tokens, logprobs.get(rid) if logprobs else None)
            if plp is not None:
                o.prompt_logprobs, o.prompt_logprobs_start = plp[1], plp[0]
            if req.status != running_status:
                o.finish_reason, o.stop_reason = req.status.finish_reason, req.stop_reason
                requests.pop(rid, None)
                self._finish(req)
                finished = True
            elif cache_blocks and (req.num_output_placeholders or len(o.new_token_ids) > 1):
                # blocks these tokens filled whose KV was scheduled before the tokens were known
                self.kv.cache_new_full_blocks(req, len(o.new_token_ids))
            outputs.append(o)
        if finished:
            self.running = [r for r in self.running if r.status == running_status]
        if not self.running:
            self._launched.clear()  # idle next: the gap until the next step is no step's cost
        return outputs

    def _append(self, req: Request, new_tokens: list[int],
                lps: Optional[list[TokenLogprobs]]) -> EngineCoreOutput:
        """Append sampled tokens up to the first that stops the request; its news."""
        appended = []
        if req.first_token_time is None:
            req.first_token_time = self.clock()
        for t in new_tokens:
            req.all_token_ids.append(t)
            appended.append(t)
            if req.check_stop(self._length_cap(req)):
                break
        return EngineCoreOutput(req.request_id, appended, None, None,
                                lps[:len(appended)] if lps is not None else None,
                                num_cached_tokens=max(req.num_cached_tokens, 0))

    def _land_preempted(self, req: Request, new_tokens: list[int],
                        lps: Optional[list[TokenLogprobs]]) -> EngineCoreOutput:
        """The token of a step that was in flight when its request got preempted (asynchronous
        scheduling): kept, so the request resumes with it, or finishes on it."""
        o = self._append(req, new_tokens, lps)
        if req.is_finished:
            o.finish_reason, o.stop_reason = req.status.finish_reason, req.stop_reason
            if req in self.swapped:
                self.swapped.remove(req)
            else:
                self.waiting.remove(req)
            self.requests.pop(req.request_id, None)
            self._finish(req)
        return o
