"""The ``mp`` executor: the model's ranks as processes of one host. Rank 0 (the driver) runs in
this process; ranks 1.. are spawned worker processes (executor/mp_worker.py), each with its own
ModelRunner on its shard, joined by one process group (NCCL on GPUs, rank r on cuda:r; gloo on
the CPU). Every call the Executor contract makes is sent to every worker first and then run by
the driver, so the collectives inside meet; only the driver's output is reported (every rank
holds the same logits, and random draws are rank 0's, broadcast by the runner).

Workers are fresh interpreters (``python -m servelm.executor.mp_worker``) that connect back
to a listener here; calls and replies are pickled over those connections.

Failures: a worker's exception comes back over its connection and is raised here with its traceback;
a worker that dies is noticed by its process sentinel (or by the collective the driver waits in,
which gloo fails when a peer's connection drops, and which times out otherwise): the engine then
stops with the error instead of waiting. Workers exit when the driver's process does."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Listener
from typing import Any, Optional

from servelm.config import EngineConfig
from servelm.executor.driver import STARTUP_TIMEOUT_S, DriverExecutor, WorkerError
from servelm.executor.mp_worker import release_graphs

logger = logging.getLogger(__name__)



@dataclass
class _Worker:
    rank: int
    proc: subprocess.Popen
    conn: Any  # a multiprocessing.connection.Connection to it (None before it connected)

    def alive(self) -> bool:
        return self.proc.poll() is None


def _accept(listener: Any, procs: dict, timeout_s: float) -> dict:
    """rank -> connection, once every worker process connected (each sends its rank first);
    a worker that exits first, or the timeout, raises."""
    conns: dict = {}
    errors: list = []

    def accept_all() -> None:
        try:
            while len(conns) < len(procs):
                c = listener.accept()
                conns[c.recv()] = c
        except (OSError, EOFError) as e:  # the listener closed: startup failed or timed out
            errors.append(e)

    t = threading.Thread(target=accept_all, daemon=True)
    t.start()
    t0 = time.monotonic()
    while t.is_alive():
        t.join(0.05)
        for r, p in procs.items():
            if r not in conns and p.poll() is not None:
                raise WorkerError(f"worker rank {r} exited with code {p.returncode} before "
                                  "connecting; see its log above")
        if time.monotonic() - t0 > timeout_s:
            raise WorkerError(f"workers did not connect in {timeout_s:.0f} s")
    if errors:
        raise WorkerError(f"accepting workers failed: {errors[0]}")
    return conns


def _stop_workers(workers: list, groups: tuple = ()) -> None:
    """Ask each worker to stop, then kill what is left after 10 s (one stuck in a collective
    with a rank that is gone); then end the driver's own communicators (``groups``)."""
    for w in workers:
        try:
            if w.conn is not None:
                w.conn.send(None)
        except (OSError, BrokenPipeError):
            pass
    from servelm.distributed.init import close_group
    for g in groups:  # while the workers close theirs
        close_group(g)
    deadline = time.monotonic() + 10
    for w in workers:
        try:
            w.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait(5)
        if w.conn is not None:
            w.conn.close()


class MultiprocExecutor(DriverExecutor):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        from servelm.distributed.init import free_port, make_store
        ws = config.parallel.world_size
        host, port = "127.0.0.1", free_port()
        self.workers: list[_Worker] = []
        self._closed = False
        procs: dict = {}
        store = make_store(host, port, ws, 0)  # before the workers connect to it
        authkey = os.urandom(16)
        listener = Listener((host, 0), authkey=authkey)
        try:
            env = dict(os.environ, SERVELM_WORKER_ADDR=f"{host}:{listener.address[1]}",
                       SERVELM_WORKER_AUTHKEY=authkey.hex())
            for rank in range(1, ws):
                procs[rank] = subprocess.Popen(
                    [sys.executable, "-m", "servelm.executor.mp_worker"],
                    env=dict(env, SERVELM_WORKER_RANK=str(rank)))
            conns = _accept(listener, procs, STARTUP_TIMEOUT_S)
            self.workers = [_Worker(r, procs[r], conns[r]) for r in sorted(procs)]
            # an executor dropped without shutdown() (an offline LLM going away, or the
            # interpreter exiting) stops them too; the driver's group joins the list below
            self._groups: list = []
            self._stop = weakref.finalize(self, _stop_workers, self.workers, self._groups)
            level = logging.getLogger().getEffectiveLevel()
            for w in self.workers:
                w.conn.send((config, host, port, level))
            for w in self.workers:  # every rank reached the store: the rendezvous cannot stall
                self._expect(w, "joined", STARTUP_TIMEOUT_S)
            self._start_driver(config, store, self._groups)
            self._store = store  # the workers' store lives as long as this executor
            for w in self.workers:
                self._expect(w, "ready", STARTUP_TIMEOUT_S)
            threading.Thread(target=self._monitor, name="servelm-worker-monitor",
                             daemon=True).start()
        except BaseException:
            if self.workers:
                self._stop()
            else:
                _stop_workers([_Worker(r, p, None) for r, p in procs.items()])
            self._closed = True
            raise
        finally:
            listener.close()

    def shutdown(self) -> None:
        if not self._closed:
            if getattr(self, "_thread", None) is not None:
                self._thread.shutdown(wait=False, cancel_futures=True)
            release_graphs(getattr(self, "runner", None))
        self._closed = True
        if self.workers:
            self._stop()  # once: a weakref.finalize

    def _monitor(self) -> None:
        """A worker that dies while the engine is idle is reported through on_failure."""
        while not self._closed:
            for w in self.workers:
                if not w.alive() and not self._closed:
                    if self.on_failure is not None:
                        self.on_failure(f"worker rank {w.rank} died (exit code "
                                        f"{w.proc.returncode})")
                    return
            time.sleep(0.5)

    # ---- messaging ---------------------------------------------------------------------
    def _send_all(self, method: str, args: tuple = (), reply: bool = True) -> None:
        for w in self.workers:
            try:
                w.conn.send((method, args, reply))
            except (OSError, BrokenPipeError) as e:
                raise WorkerError(f"worker rank {w.rank} is gone "
                                  f"(exit code {w.proc.returncode})") from e

    def _send(self, method: str, args: tuple, reply: bool) -> None:
        self._send_all(method, args, reply)

    def _replies(self, handle: None) -> list:
        return [self._expect(w, "ok", None) for w in self.workers]

    def _check(self, cause: Optional[BaseException] = None) -> None:
        if cause is None:
            self._check_workers()
        else:
            self._raise_worker_failure(cause)

    def _expect(self, w: _Worker, kind: str, timeout_s: float | None) -> Any:
        """The worker's next message, which must be ``kind``; its error or its death raise."""
        t0 = time.monotonic()
        while not w.conn.poll(0.05):
            if not w.alive() and not w.conn.poll(0):
                raise WorkerError(f"worker rank {w.rank} died (exit code {w.proc.returncode}) "
                                  f"before answering {kind!r}")
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                raise WorkerError(f"worker rank {w.rank} did not answer {kind!r} in "
                                  f"{timeout_s:.0f} s")
        try:
            got, payload = w.conn.recv()
        except (EOFError, OSError) as e:  # closed, or reset by a killed process's socket
            try:
                w.proc.wait(1)  # its exit code, when it is exiting
            except subprocess.TimeoutExpired:
                pass
            raise WorkerError(f"worker rank {w.rank} closed its connection (exit code "
                              f"{w.proc.returncode})") from e
        if got == "error":
            raise WorkerError(f"worker rank {w.rank} failed: {payload}")
        if got != kind:
            raise WorkerError(f"worker rank {w.rank} answered {got!r}, expected {kind!r}")
        return payload

    def _check_workers(self) -> None:
        """Between steps: a worker that reported an error or died stops the engine."""
        for w in self.workers:
            if w.conn.poll(0):
                self._expect(w, "ok", 0)  # an unsolicited message is an error report
            elif not w.alive():
                raise WorkerError(f"worker rank {w.rank} died (exit code {w.proc.returncode})")

    def _raise_worker_failure(self, cause: BaseException) -> None:
        """The driver's collective failed: if a worker's error explains it, raise that."""
        deadline = time.monotonic() + 2.0  # the worker's report may be on its way
        while time.monotonic() < deadline:
            for w in self.workers:
                if w.conn.poll(0) or not w.alive():
                    try:
                        self._check_workers()
                    except WorkerError as e:
                        raise e from cause
            time.sleep(0.05)
