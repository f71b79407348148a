"""EngineCore: the scheduler and an executor; one step = schedule, execute, update."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterable, Optional

from servelm.config import EngineConfig
from servelm.core.request import Request, RequestStatus
from servelm.core.scheduler import Scheduler
from servelm.core.step import EngineCoreOutput, SchedulerStats
from servelm.executor import get_executor_class
from servelm.sampling_params import SamplingParams

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


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        t0 = time.perf_counter()
        self.executor = get_executor_class(config.parallel.distributed_executor_backend)(config)
        try:
            num_blocks = self.executor.determine_num_blocks()
            self.executor.initialize_kv_cache(num_blocks)
        except BaseException:
            self.executor.shutdown()
            raise
        self.scheduler = Scheduler(config.scheduler, config.cache, num_blocks)
        logger.info("engine ready in %.1fs: %d KV blocks of %d tokens", time.perf_counter() - t0,
                    num_blocks, config.cache.block_size)

    def add_request(self, r: EngineRequest) -> None:
        req = Request(r.request_id, r.prompt_token_ids, r.params, r.arrival_time,
                      self.config.model.eos_token_ids, r.parent_id, r.priority)
        self.scheduler.add_request(req)

    def abort_requests(self, req_ids: Iterable[str]) -> None:
        self.scheduler.finish_requests(req_ids, RequestStatus.FINISHED_ABORTED)

    def stop_requests(self, req_ids: Iterable[str]) -> None:
        """Finish requests that the client found a stop string in."""
        self.scheduler.finish_requests(req_ids, RequestStatus.FINISHED_STOPPED)

    def step(self) -> list[EngineCoreOutput]:
        sched = self.scheduler.schedule()
        return self.scheduler.update(sched, self.executor.execute(sched))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def shutdown(self) -> None:
        self.executor.shutdown()
