"""EngineCore: the scheduler and an executor; one step = schedule, execute, update."""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from servelm.config import EngineConfig
from servelm.core.request import Request, RequestStatus
from servelm.core.scheduler import Scheduler
from servelm.core.step import EngineCoreOutput, SchedulerOutput, SchedulerStats
from servelm.executor import get_executor_class
from servelm.executor.abstract import StepFuture
from servelm.lora.request import LoRARequest
from servelm.sampling_params import SamplingParams
from servelm.structured_output import StructuredOutputsConfig
from servelm.structured_output.manager import GrammarManager

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineRequest:
    """What a client hands the core: one sequence to generate (n > 1 arrives as n of these)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    parent_id: Optional[str] = None
    priority: int = 0
    ttft_slo_ms: Optional[float] = None  # latency objectives (see core/slo.py)
    tpot_slo_ms: Optional[float] = None
    lora_request: Optional[LoRARequest] = None  # the adapter it runs with (None: the base)


class EngineCore:
    def __init__(self, config: EngineConfig, tokenizer: Any = None) -> None:
        """tokenizer: the client's, when in the same process (structured outputs read its
        vocabulary; else they load it on first use)."""
        self.config = config
        if config.parallel.data_parallel_size > 1:
            raise ValueError(f"data_parallel_size={config.parallel.data_parallel_size}: replicas "
                             "run under `servelm serve` (an engine core each behind one API "
                             "server); offline, start one LLM per replica.")
        t0 = time.perf_counter()
        self.executor = get_executor_class(config.parallel.distributed_executor_backend)(config)
        try:
            num_blocks = self.executor.determine_num_blocks()
            self.executor.initialize_kv_cache(num_blocks)
        except BaseException:
            self.executor.shutdown()
            raise
        self.scheduler = Scheduler(config.scheduler, config.cache, num_blocks,
                                   config.num_swap_blocks)
        # structured outputs: requests wait there until their grammar is compiled
        so = config.structured_outputs or StructuredOutputsConfig()
        mask_process = so.mask_process
        if mask_process == "auto":  # the masks beside the host's step work: pays on CUDA
            mask_process = (config.device.startswith("cuda")
                            and config.parallel.distributed_executor_backend == "uni")
        self.grammars = GrammarManager(so, config.model, tokenizer, mask_process=mask_process)
        # (request id, message) of requests that failed before running (a grammar that did
        # not compile): the client reports them as errors (HTTP 400)
        self.request_errors: list[tuple[str, str]] = []
        # asynchronous scheduling: the step launched last, whose output is not applied yet
        self._in_flight: Optional[tuple[SchedulerOutput, StepFuture]] = None
        # pipeline parallelism: the steps in flight, oldest first
        self._pipeline: collections.deque[tuple[SchedulerOutput, StepFuture]] = collections.deque()
        self._drafting = False  # the last landed step proposed drafts: land before scheduling
        logger.info("engine ready in %.1fs: %d KV blocks of %d tokens", time.perf_counter() - t0,
                    num_blocks, config.cache.block_size)
        kv_tokens = num_blocks * config.cache.block_size
        if config.model.max_model_len > kv_tokens:
            logger.warning("max_model_len (%d) exceeds the KV cache (%d tokens): longer prompts "
                           "are refused, and sequences past it cannot run; lower "
                           "max_model_len or give the KV cache more memory.",
                           config.model.max_model_len, kv_tokens)

    def add_request(self, r: EngineRequest) -> None:
        req = Request(r.request_id, r.prompt_token_ids, r.params, r.arrival_time,
                      self.config.model.eos_token_ids, r.parent_id, r.priority,
                      r.ttft_slo_ms, r.tpot_slo_ms, r.lora_request)
        if r.params.structured_outputs is not None:
            self.grammars.add(req)  # joins the scheduler once its grammar is compiled
        else:
            self.scheduler.add_request(req)

    def abort_requests(self, req_ids: Iterable[str]) -> None:
        req_ids = [r for r in req_ids if not self.grammars.drop(r)]
        self.scheduler.finish_requests(req_ids, RequestStatus.FINISHED_ABORTED)

    def stop_requests(self, req_ids: Iterable[str]) -> None:
        """Finish requests that the client found a stop string in."""
        req_ids = [r for r in req_ids if not self.grammars.drop(r)]
        self.scheduler.finish_requests(req_ids, RequestStatus.FINISHED_STOPPED)

    def _admit_compiled(self) -> None:
        """Requests whose grammar is ready join the scheduler; failed ones are reported. With
        nothing else to run, wait a little for a grammar rather than spin."""
        if not self.grammars.pending:
            return
        if (not self.scheduler.has_unfinished_requests() and self._in_flight is None
                and not self._pipeline):
            self.grammars.wait(0.005)
        ready, failed = self.grammars.collect()
        for req in ready:
            self.scheduler.add_request(req)
        self.request_errors += [(req.request_id, msg) for req, msg in failed]

    def take_request_errors(self) -> list[tuple[str, str]]:
        errors, self.request_errors = self.request_errors, []
        return errors

    def step(self) -> list[EngineCoreOutput]:
        self._admit_compiled()
        if self.config.scheduler.pipeline_depth > 1:
            return self._step_pipelined()
        if not self.config.scheduler.async_scheduling:
            sched = self.scheduler.schedule()
            return self.scheduler.update(sched, self.executor.execute(sched))
        return self._step_overlapped()

    def _step_overlapped(self) -> list[EngineCoreOutput]:
        """Asynchronous scheduling: schedule and launch step N+1, then wait for step N's tokens
        and apply them, so the device runs N+1 while the host finishes N. With speculative
        decoding each step is applied before the next is scheduled: drafts are its input."""
        outputs: list[EngineCoreOutput] = []
        prev, self._in_flight = self._in_flight, None
        # land first when the next schedule needs that step's result: it verified drafts (its
        # computed count rolls back only then) or may propose them (the next step's input: the
        # step before it drafted, so this one likely did; else its drafts would come late)
        if prev is not None and (prev[0].scheduled_spec_decode_tokens or self._drafting):
            outputs += self._land(*prev)
            prev = None
        sched = self.scheduler.schedule()
        if sched.total_num_scheduled_tokens or sched.finished_req_ids or sched.preempted_req_ids:
            self._in_flight = (sched, self.executor.execute(sched, non_block=True))
        if prev is not None:
            outputs += self._land(*prev)
        if self._in_flight is not None:
            # a step whose sampling waited for masks filled elsewhere (StepFuture.flush):
            # launched now, after this landing's host work
            flush = getattr(self._in_flight[1], "flush", None)
            if flush is not None:
                flush()
        return outputs

    def _step_pipelined(self) -> list[EngineCoreOutput]:
        """Pipeline parallelism: launch a step of the requests not in flight, and land the
        oldest step once pipeline_depth are in flight (or nothing new could start), so each
        stage works on one batch while the next stage works on the batch before."""
        outputs: list[EngineCoreOutput] = []
        sched = self.scheduler.schedule()
        launched = bool(sched.total_num_scheduled_tokens or sched.finished_req_ids
                        or sched.preempted_req_ids)
        if launched:
            self._pipeline.append((sched, self.executor.execute(sched, non_block=True)))
        if self._pipeline and (not launched or len(self._pipeline) >= self.config.scheduler.pipeline_depth):
            outputs += self._land(*self._pipeline.popleft())
        return outputs

    def _land(self, sched: SchedulerOutput, fut: StepFuture) -> list[EngineCoreOutput]:
        out = fut.result()
        # per step: a proposer that stops drafting (large batches) lets steps overlap again; on
        # the way back, the first step's drafts come a step late and are dropped (update)
        self._drafting = out.drafting or bool(out.draft_token_ids)
        return self.scheduler.update(sched, out)

    def use_idle_time(self) -> bool:
        """Deferred start-up work while nothing runs (see Executor.use_idle_time)."""
        if self.has_unfinished_requests():
            return False
        if self.executor.use_idle_time():
            return True
        self.grammars.warm_up()  # in the background: nothing more to do here
        return False

    def has_unfinished_requests(self) -> bool:
        return (self._in_flight is not None or bool(self._pipeline)
                or self.scheduler.has_unfinished_requests() or bool(self.grammars.pending))

    def stats(self) -> SchedulerStats:
        st = self.scheduler.stats()
        st.num_waiting += len(self.grammars.pending)
        return st

    def telemetry(self, since_step: int = -1) -> dict:
        return self.scheduler.telemetry_snapshot(since_step)

    def shutdown(self) -> None:
        self.grammars.shutdown()
        self.executor.shutdown()
