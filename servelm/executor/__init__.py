"""Executors, chosen by ``distributed_executor_backend`` from a registry."""
from __future__ import annotations

from types import MappingProxyType

from servelm.executor.abstract import Executor, StepFuture
from servelm.registry import check_name, load_class

EXECUTORS = MappingProxyType({
    "uni": "servelm.executor.uniproc:UniProcExecutor",
    "mp": "servelm.executor.multiproc:MultiprocExecutor",
    "ray": "servelm.executor.ray_executor:RayExecutor",
})


def check_executor_backend(name: str) -> str:
    return check_name(EXECUTORS, name, "distributed_executor_backend")


def get_executor_class(name: str) -> type[Executor]:
    return load_class(EXECUTORS, name, "distributed_executor_backend")


__all__ = ["EXECUTORS", "Executor", "StepFuture", "check_executor_backend", "get_executor_class"]
