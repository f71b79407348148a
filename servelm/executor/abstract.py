"""The Executor contract: where and how the model runs (this process, worker processes, Ray).

EngineCore holds an Executor, never a ModelRunner. ``execute(sched, non_block=True)`` returns a
future of the step's ModelRunnerOutput instead of the output, so the caller can schedule the next
step while this one runs (asynchronous scheduling) or keep several micro-batches in flight
(pipeline parallelism): one mechanism for both.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future
from typing import Union

from servelm.config import EngineConfig
from servelm.core.step import ModelRunnerOutput, SchedulerOutput


class Executor(ABC):
    def __init__(self, config: EngineConfig) -> None:
        self.config = config

    @abstractmethod
    def determine_num_blocks(self) -> int:
        """KV blocks that fit on every worker (the smallest of them)."""

    @abstractmethod
    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate the KV cache (and capture CUDA graphs) on every worker."""

    @abstractmethod
    def execute(self, sched: SchedulerOutput,
                non_block: bool = False) -> Union[ModelRunnerOutput, "Future[ModelRunnerOutput]"]:
        """Run one step. Steps run in submission order; a non-blocking call returns at once."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop workers and free their resources; safe to call twice."""
