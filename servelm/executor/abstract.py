"""The Executor contract: where and how the model runs (this process, worker processes, Ray).

EngineCore holds an Executor, never a ModelRunner. ``execute(sched, non_block=True)`` returns a
future of the step's ModelRunnerOutput instead of the output, so the caller can schedule the next
step while this one runs (asynchronous scheduling) or keep several micro-batches in flight
(pipeline parallelism): one mechanism for both.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Optional, Protocol, Union

from servelm.config import EngineConfig
from servelm.core.step import ModelRunnerOutput, SchedulerOutput


class StepFuture(Protocol):
    """A step in flight (concurrent.futures.Future has this shape too)."""

    def done(self) -> bool: ...

    def result(self) -> ModelRunnerOutput:
        """Wait for this step (only) and return its output."""

    # optional: ``flush()`` launches what the step deferred (its sampling, waiting for grammar
    # masks filled in another process) once the caller's other host work is done; result()
    # flushes too


class Executor(ABC):
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        # set by the owner: called (from another thread, with the reason) when the executor's
        # workers fail while nothing is being executed, so an idle engine stops too
        self.on_failure: Optional[Callable[[str], None]] = None

    @abstractmethod
    def determine_num_blocks(self) -> int:
        """KV blocks that fit on every worker (the smallest of them)."""

    @abstractmethod
    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate the KV cache (and capture CUDA graphs) on every worker."""

    @abstractmethod
    def execute(self, sched: SchedulerOutput,
                non_block: bool = False) -> Union[ModelRunnerOutput, StepFuture]:
        """Run one step. Steps run in submission order; a non-blocking call returns once the
        step is launched, with a future of its output."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop workers and free their resources; safe to call twice."""

    def use_idle_time(self) -> bool:
        """Called while no step runs or waits: do a little deferred start-up work (one CUDA
        graph capture). True while more remains."""
        return False
