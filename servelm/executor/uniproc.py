"""The model runner in this process. Non-blocking steps run on one worker thread, in order:
the GIL is released while the device works and while the host waits for it, so the caller
can build the next step meanwhile."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional, Union

from servelm.config import EngineConfig
from servelm.core.step import ModelRunnerOutput, SchedulerOutput
from servelm.executor.abstract import Executor
from servelm.worker.memory import determine_num_blocks
from servelm.worker.model_runner import ModelRunner


class UniProcExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.runner = ModelRunner(config)
        self._thread: Optional[ThreadPoolExecutor] = None  # made on the first non-blocking step

    def determine_num_blocks(self) -> int:
        return determine_num_blocks(self.runner)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.runner.initialize_kv_cache(num_blocks)

    def execute(self, sched: SchedulerOutput,
                non_block: bool = False) -> Union[ModelRunnerOutput, "Future[ModelRunnerOutput]"]:
        if not non_block:
            if self._thread is not None:  # keep submission order with steps still in flight
                return self._thread.submit(self.runner.execute, sched).result()
            return self.runner.execute(sched)
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="servelm-step")
        return self._thread.submit(self.runner.execute, sched)

    def shutdown(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None
