"""The model runner in this process. A non-blocking step is launched on the device and handed
back as a PendingOutput (the runner never waits for the device in between), so the caller can
schedule and launch the next step while this one runs."""
from __future__ import annotations

from typing import Union

from servelm.config import EngineConfig
from servelm.core.step import ModelRunnerOutput, SchedulerOutput
from servelm.executor.abstract import Executor, StepFuture
from servelm.worker.memory import determine_num_blocks
from servelm.worker.model_runner import ModelRunner


class UniProcExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.runner = ModelRunner(config)

    def determine_num_blocks(self) -> int:
        return determine_num_blocks(self.runner)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.runner.initialize_kv_cache(num_blocks)

    def execute(self, sched: SchedulerOutput,
                non_block: bool = False) -> Union[ModelRunnerOutput, StepFuture]:
        pending = self.runner.execute_async(sched)
        return pending if non_block else pending.result()

    def use_idle_time(self) -> bool:
        return self.runner.capture_pending_graph()

    def shutdown(self) -> None:
        pass  # nothing outside this process to stop
