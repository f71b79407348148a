"""The Executor contract for rank 0 (the driver) in this process and ranks 1.. elsewhere: the
``mp`` executor's worker processes or the ``ray`` executor's actors. Every call goes to the
other ranks first, then runs on the driver, so the collectives inside meet; only the driver's
output is reported. Subclasses provide the transport: ``_send``, ``_replies`` and ``_check``."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Union

from servelm.config import EngineConfig
from servelm.core.step import ModelRunnerOutput, SchedulerOutput
from servelm.executor.abstract import Executor, StepFuture
from servelm.executor.mp_worker import RankCalls, rank_config
from servelm.worker.step_profiler import step_range

STARTUP_TIMEOUT_S = 600  # a worker's model load may take as long as the driver's


class WorkerError(RuntimeError):
    """A worker rank raised or died."""


class DriverExecutor(Executor):
    runner: Any  # rank 0's ModelRunner
    _calls: RankCalls
    _thread: Optional[ThreadPoolExecutor] = None

    def _start_driver(self, config: EngineConfig, store: Any, groups: list) -> None:
        """Rank 0's groups (appended to ``groups``, for closing: before the runner is built,
        which may fail) and runner; the other ranks must be joining the store."""
        from servelm.distributed.init import make_groups
        from servelm.worker.model_runner import ModelRunner
        cfg, pc = rank_config(config, 0), config.parallel
        g = make_groups(store, 0, pc, cfg.device)
        groups.extend(g.distinct())
        self.runner = ModelRunner(cfg, g.tp, g.pp, g.world)
        self._calls = RankCalls(self.runner)  # the driver's steps bypass it (execute)
        # pipeline stages: the driver's (last) stage runs its steps on a thread of its own, in
        # order, so the engine can launch the next batch while this one goes through the
        # stages (every runner call then goes through that thread)
        self._thread = (ThreadPoolExecutor(1, thread_name_prefix="servelm-last-stage")
                        if pc.pipeline_parallel_size > 1 else None)

    # ---- transport (subclasses) --------------------------------------------------------
    def _send(self, method: str, args: tuple, reply: bool) -> Any:
        """Send a call to every other rank; a handle for _replies when ``reply``."""
        raise NotImplementedError

    def _replies(self, handle: Any) -> list:
        """The other ranks' results of a call sent with reply=True, rank 1 first."""
        raise NotImplementedError

    def _check(self, cause: Optional[BaseException] = None) -> None:
        """Raise WorkerError if another rank failed; with ``cause`` (the driver's own error, a
        collective that a dead rank broke) wait briefly for that rank's report."""
        raise NotImplementedError

    # ---- the Executor contract ---------------------------------------------------------
    def determine_num_blocks(self) -> int:
        return min(self._call_all("determine_num_blocks"))

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._call_all("initialize_kv_cache", num_blocks)

    def execute(self, sched: SchedulerOutput,
                non_block: bool = False) -> Union[ModelRunnerOutput, StepFuture]:
        self._check()
        with step_range(self.runner.step_profiler, "servelm.send_step"):
            self._send("execute", (sched,), reply=False)
        if self._thread is not None:
            fut = self._thread.submit(self._run_step, sched)
            return fut if non_block else fut.result()
        try:
            pending = self.runner.execute_async(sched)
            return pending if non_block else pending.result()
        except Exception as e:
            self._check(cause=e)
            raise

    def use_idle_time(self) -> bool:
        return self._call_all("capture_pending_graph")[0]

    def _run_step(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        try:
            return self.runner.execute_async(sched).result()
        except Exception as e:
            self._check(cause=e)
            raise

    def _call_all(self, method: str, *args: Any) -> list:
        """Run ``method`` on every rank at once; the ranks' results, rank 0 first."""
        self._check()
        handle = self._send(method, args, reply=True)
        try:
            own = (self._calls.call(method, args) if self._thread is None else
                   self._thread.submit(self._calls.call, method, args).result())
        except Exception as e:
            self._check(cause=e)
            raise
        return [own] + self._replies(handle)
