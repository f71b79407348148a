"""Compiling the model's Triton kernels at start-up in worker processes, while the weights load.

A cold Triton compile took 0.1-1.7 s per binary (GEMV configs for sm_90, on the 2-core CPU
machine) and a model needs a few dozen binaries. Compiling holds the GIL most of the time: there,
16 GEMV compiles took 7.3 s in one thread and 12.3 s in two, but 5.8 s in two processes against
9.9 s in one (interpreter start included). So the runner records the compile jobs
(kernel_jobs.py), keeps those missing from the on-disk Triton cache, and starts worker processes
(`python -m servelm.worker.kernel_warmup`) that compile them into that cache from Triton's
serialized specializations for the GPU's target, with no GPU memory or CUDA context
(`triton.compile` with an explicit target, and the launcher stub). The runner's own first
launches then load them from the cache. On a first start (no recorded list on disk) the workers
start before the recording and import Triton and torch while it runs (`WarmupWorkers`; Llama-3-8B
on an H200 with empty caches: 15.0 -> 11.1 s to the first token).

`KernelWarmup.wait()` returns once the required jobs are done (compiling unclaimed ones in the
runner's process meanwhile); the workers go on with the optional ones and end at the runner's
exit. Nothing depends on them: a kernel they did not compile is compiled on first use.

The cache is persistent: TRITON_CACHE_DIR, else ~/.cache/servelm/triton (under $XDG_CACHE_HOME
if set). SERVELM_WARMUP_WORKERS=0: no workers (the runner compiles the required jobs itself);
N: that many. SERVELM_KERNEL_WARMUP=0 (read by the runner): no recording, compile on first use.
"""
from __future__ import annotations

import atexit
import importlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from servelm.worker.kernel_jobs import Job

logger = logging.getLogger(__name__)

MAX_WORKERS = 8
WAIT_TIMEOUT_S = 300.0
_POLL_S = 0.02


def default_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "servelm", "triton")


def configure_compile_cache() -> str:
    """The Triton cache of this process and its workers: TRITON_CACHE_DIR if set, else servelm's
    persistent default, put in the environment (Triton reads it at each compile). Returns it."""
    os.environ.setdefault("TRITON_CACHE_DIR", default_cache_dir())
    return os.environ["TRITON_CACHE_DIR"]


# ---- one job: Triton's own preload path, for an explicit target ------------------------------
def _source(job: Sequence, target: Any) -> tuple[Any, Any, Any]:
    """(ASTSource, backend, parsed options) of a job, as `JITFunction.preload` rebuilds them
    from the specialization data its compile hook serialized."""
    import triton.language as tl
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import convert_to_tuple_if_list

    module, name, spec = job[0], job[1], json.loads(job[2])
    fn = getattr(importlib.import_module(module), name)
    constexprs = {
        tuple(k): (tl.dtype(v) if tl.dtype.is_dtype(v) else
                   tl.constexpr(v["constexpr"]) if isinstance(v, dict) and "constexpr" in v else v)
        for k, v in zip(spec["constant_keys"], spec["constant_vals"])}
    attrs = dict(zip(map(tuple, spec["attrs_keys"]), spec["attrs_vals"]))
    signature = {k: convert_to_tuple_if_list(v) for k, v in spec["signature"].items()}
    backend = make_backend(target)
    options = backend.parse_options(
        {k: tuple(v) if isinstance(v, list) else v for k, v in spec["options"].items()})
    return ASTSource(fn, signature, constexprs, attrs), backend, options


def is_cached(job: Sequence, target: Any) -> bool:
    """Whether the job's binary is in the Triton cache (the lookup `triton.compile` makes)."""
    import hashlib

    # the names triton.compile itself uses
    from triton.compiler.compiler import (get_cache_invalidating_env_vars, get_cache_key,
                                          get_cache_manager)

    src, backend, options = _source(job, target)
    key = get_cache_key(src, backend, options, env_vars=get_cache_invalidating_env_vars())
    manager = get_cache_manager(hashlib.sha256(key.encode("utf-8")).hexdigest())
    name = f"{src.name[:150]}.json"
    return (manager.get_group(name) or {}).get(name) is not None


def compile_job(job: Sequence, target: Any) -> None:
    """Compiles one job into the Triton cache, with its launcher stub on CUDA."""
    import triton

    src, _, options = _source(job, target)
    kernel = triton.compile(src, target=target, options=options.__dict__)
    if target.backend == "cuda":  # the C launcher stub, else built (gcc) at first launch
        try:
            from triton.backends.nvidia.driver import CudaLauncher
            CudaLauncher(src, kernel.metadata)
        except Exception as e:  # e.g. no libcuda here: the runner builds it at first launch
            logger.debug("launcher of %s.%s not built: %s", job[0], job[1], e)


def target_to_json(target: Any) -> list:
    return [target.backend, target.arch, target.warp_size]


def target_from_json(t: Sequence) -> Any:
    from triton.backends.compiler import GPUTarget
    return GPUTarget(t[0], t[1], t[2])


# ---- the pool ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class WarmupReport:
    """jobs: recorded; cached: already in the cache (not compiled again); done/failed: compiled by
    the warm-up when the runner went on; seconds: from recording to then."""

    jobs: int = 0
    required: int = 0
    cached: int = 0
    done: int = 0
    failed: int = 0
    workers: int = 0
    seconds: float = 0.0
    record_seconds: float = 0.0
    first_error: str = ""


class WarmupWorkers:
    """Worker processes started before their jobs are known: they import Triton and torch (a
    few seconds each) while the runner records the jobs, then wait for ``spec.json`` in
    ``dir``, which ``KernelWarmup`` writes. Stopped by ``stop`` (or by the runner's exit)."""

    def __init__(self, num_workers: int) -> None:
        self.dir = tempfile.mkdtemp(prefix="servelm-warmup-")
        spec = os.path.join(self.dir, "spec.json")
        pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
               "PYTHONPATH": os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH")) if p)}
        self.logs = [open(os.path.join(self.dir, f"worker{i}.log"), "w") for i in range(num_workers)]
        # own session: ending a worker also ends the compilers (ptxas, gcc) it runs
        self.procs = [subprocess.Popen(
            [sys.executable, "-m", "servelm.worker.kernel_warmup", spec], env=env,
            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True) for log in self.logs]
        atexit.register(self.stop)

    def stop(self) -> None:
        """Ends the workers (and the compilers they run) and removes the job directory."""
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)  # the worker's own session (see __init__)
                except ProcessLookupError:
                    pass
            p.wait()
        for log in self.logs:
            log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def default_num_workers() -> int:
    env = os.environ.get("SERVELM_WARMUP_WORKERS")
    return int(env) if env else min(MAX_WORKERS, max(1, (os.cpu_count() or 2) - 1))


class KernelWarmup:
    """Workers compiling `jobs` (none cached) for `target`; see the module docstring.
    ``workers``: ones already started (``WarmupWorkers``), given the jobs here; else
    ``num_workers`` are started."""

    def __init__(self, jobs: list[Job], target: Any, num_workers: int, t0: float,
                 num_cached: int, record_seconds: float,
                 workers: Optional[WarmupWorkers] = None) -> None:
        self.jobs, self.target, self.t0 = jobs, target, t0
        self.num_cached, self.record_seconds = num_cached, record_seconds
        self.workers: Optional[WarmupWorkers] = None
        self.dir = ""
        if not jobs:  # everything is cached
            if workers is not None:
                workers.stop()
            return
        if workers is None and num_workers:
            workers = WarmupWorkers(num_workers)
        self.workers = workers  # (None: the runner compiles them all in wait())
        self.dir = workers.dir if workers else tempfile.mkdtemp(prefix="servelm-warmup-")
        spec = os.path.join(self.dir, "spec.json")
        with open(spec + ".tmp", "w") as f:
            json.dump({"jobs": jobs, "target": target_to_json(target), "parent": os.getpid()}, f)
        os.replace(spec + ".tmp", spec)  # appears whole to the waiting workers

    @property
    def procs(self) -> list[subprocess.Popen]:
        return self.workers.procs if self.workers else []

    def status(self, i: int) -> Optional[str]:
        """"done", "failed", or None (not yet compiled)."""
        for status in ("done", "failed"):
            if os.path.exists(os.path.join(self.dir, f"{i}.{status}")):
                return status
        return None

    def wait(self, timeout: float = WAIT_TIMEOUT_S) -> WarmupReport:
        """Blocks until every required job is done or failed (compiling unclaimed ones here)."""
        required = [i for i, j in enumerate(self.jobs) if j[3]]
        deadline = time.perf_counter() + timeout
        while any(self.status(i) is None for i in required) and time.perf_counter() < deadline:
            i = next((i for i in required if _claim(self.dir, i)), None)
            if i is not None:
                _run_job(self.dir, i, self.jobs[i], self.target)
            elif all(p.poll() is not None for p in self.procs):
                break  # a worker died holding a job: that kernel compiles on first use
            else:
                time.sleep(_POLL_S)  # the rest are being compiled by the workers
        statuses = [self.status(i) for i in range(len(self.jobs))]
        report = WarmupReport(len(self.jobs) + self.num_cached, len(required), self.num_cached,
                              statuses.count("done"), statuses.count("failed"), len(self.procs),
                              time.perf_counter() - self.t0, self.record_seconds,
                              self._first_error(statuses))
        if report.failed or any(statuses[i] is None for i in required):
            logger.warning("kernel warm-up: %d of %d required kernels compiled, %d failed (they "
                           "compile on first use). First error: %s",
                           sum(statuses[i] == "done" for i in required), len(required),
                           report.failed,
                           report.first_error or "none (a worker ended early, or timed out)")
        logger.info("kernel warm-up: %d kernels, %d cached, %d compiled by %d workers in %.1fs",
                    report.jobs, report.cached, report.done, report.workers, report.seconds)
        return report

    def stop(self) -> None:
        """Ends the workers (and the compilers they run) and removes the job directory."""
        if self.workers is not None:
            self.workers.stop()
        elif self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _first_error(self, statuses: list[Optional[str]]) -> str:
        for i, st in enumerate(statuses):
            if st == "failed":
                with open(os.path.join(self.dir, f"{i}.failed")) as f:
                    return f"{self.jobs[i][0]}.{self.jobs[i][1]}: {f.read().strip()[-800:]}"
        return ""


def start_kernel_warmup(jobs: list[Job], t0: float, record_seconds: float = 0.0,
                        num_workers: Optional[int] = None,
                        workers: Optional[WarmupWorkers] = None) -> KernelWarmup:
    """Starts compiling the `jobs` missing from the cache, for the current CUDA device's target,
    on ``workers`` (started while the jobs were recorded) or on new ones. Workers compile only
    two or more (one compiles in `wait()` as fast)."""
    from triton.runtime import driver

    configure_compile_cache()
    target = driver.active.get_current_target()
    missing = [j for j in jobs if not is_cached(j, target)]
    if num_workers is None:
        num_workers = len(workers.procs) if workers is not None else default_num_workers()
    num_workers = min(num_workers, len(missing)) if len(missing) >= 2 else 0
    if workers is not None and not num_workers:
        workers.stop()
        workers = None
    logger.info("kernel warm-up: %d kernels recorded in %.2fs, %d not in the cache %s",
                len(jobs), record_seconds, len(missing), os.environ["TRITON_CACHE_DIR"])
    return KernelWarmup(missing, target, num_workers, t0, len(jobs) - len(missing), record_seconds,
                        workers)


# ---- the worker process ------------------------------------------------------------------------
def _claim(directory: str, i: int) -> bool:
    """Takes job i: exactly one process creates its claim file."""
    try:
        os.close(os.open(os.path.join(directory, f"{i}.claim"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except (FileExistsError, FileNotFoundError):  # taken, or the warm-up is over
        return False


def _run_job(directory: str, i: int, job: Sequence, target: Any) -> None:
    try:
        compile_job(job, target)
        status, text = "done", ""
    except Exception:  # reported by the runner; the kernel compiles on first use there
        status, text = "failed", traceback.format_exc()
    tmp = os.path.join(directory, f"{i}.{status}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(directory, f"{i}.{status}"))  # appears complete
    except OSError:  # the warm-up is over and its directory gone
        pass


def worker_main(spec_path: str) -> None:
    """Compiles the spec's jobs that no other process has claimed, required ones first; stops
    when the runner's process is gone (a spawned engine process ends without atexit hooks).
    Started before the spec exists (WarmupWorkers), it imports what compiling needs, then
    waits for it."""
    import triton.compiler  # noqa: F401  (with torch: the seconds a worker start takes)
    import triton.language  # noqa: F401
    parent = os.getppid()
    while not os.path.exists(spec_path):
        if os.getppid() != parent or not os.path.isdir(os.path.dirname(spec_path)):
            return  # the runner is gone, or stopped the warm-up before giving jobs
        time.sleep(_POLL_S)
    with open(spec_path) as f:
        spec = json.load(f)
    directory, target = os.path.dirname(spec_path), target_from_json(spec["target"])
    for i, job in enumerate(spec["jobs"]):
        if os.getppid() != spec["parent"]:
            shutil.rmtree(directory, ignore_errors=True)  # nobody else will
            return
        if _claim(directory, i):
            _run_job(directory, i, job, target)


if __name__ == "__main__":
    worker_main(sys.argv[1])
