"""How many threads the math runs on, and which CPUs the engine and the API process use.

``threads`` (llama.cpp's name; engine argument and ``--threads``) defaults to the CPUs this
process may use: its affinity mask, capped by a cgroup CPU quota (a container given 2.5 CPUs on
a 64-core host gets 3 threads, not 64, which would spin against each other). Where the engine's
threads leave CPUs over, the engine core is pinned to its first ``threads`` CPUs and the API
process to the rest, so serving does not fight itself; where they do not, neither is pinned."""
from __future__ import annotations

import math
import os
from typing import Optional


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity), in order."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def cpu_quota() -> Optional[float]:
    """The cgroup's CPU limit in CPUs (cpu.max of cgroup v2, cfs quota of v1), or None."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period = int(f.read())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def default_threads() -> int:
    n = len(usable_cpus())
    q = cpu_quota()
    return max(1, min(n, math.ceil(q)) if q is not None else n)


def resolve_threads(requested: Optional[int]) -> int:
    """The engine's thread count: ``requested`` checked against what this process may use, or
    the default."""
    if requested is None:
        return default_threads()
    cpus = usable_cpus()
    if not isinstance(requested, int) or requested < 1:
        raise ValueError(f"threads must be an integer >= 1, got {requested!r}.")
    if requested > len(cpus):
        q = cpu_quota()
        raise ValueError(f"threads={requested} is more than the {len(cpus)} CPUs this process may "
                         f"use (affinity {cpus}" + (f", cgroup quota {q:g} CPUs" if q else "")
                         + f"); pass threads <= {len(cpus)} (default {default_threads()}).")
    return requested


def engine_cpus(threads: int, cpus: list[int]) -> list[int]:
    """The CPUs the engine runs on: its first ``threads`` of ``cpus`` (the set the configuring
    process could use), or all of them where none would be left over."""
    return cpus[:threads] if threads < len(cpus) else cpus


def configure_engine(threads: int) -> None:
    """In the process that runs the model: PyTorch's (and the C kernels') thread count."""
    import torch
    if threads >= 1:  # 0: not configured (an EngineConfig built by hand): leave it
        torch.set_num_threads(threads)


def pin_engine_process(threads: int, cpus: tuple[int, ...]) -> None:
    """In the engine core process the server spawns (not an offline LLM's, which is the
    user's own): its CPUs, set rather than narrowed, so a core restarted by an API process that
    moved off the engine's CPUs gets them back."""
    if threads < 1 or not cpus:
        return
    try:
        os.sched_setaffinity(0, engine_cpus(threads, list(cpus)))
    except (AttributeError, OSError, ValueError):
        pass


def configure_api(threads: int, cpus: tuple[int, ...] = ()) -> None:
    """In the API process (it tokenizes and streams): off the engine's CPUs where others are
    left, and one PyTorch thread (it does no math)."""
    import torch
    if threads < 1:
        return
    cpus = list(cpus) or usable_cpus()
    if threads < len(cpus):
        try:
            os.sched_setaffinity(0, cpus[threads:])
        except (AttributeError, OSError, ValueError):
            pass
    torch.set_num_threads(1)
