"""The mask process: grammars compiled, and a batch's matchers kept and their bitmasks filled,
in a process of its own, so that this work runs beside the engine's own host work (scheduling,
input building, output processing) instead of after it.

At 256 constrained rows a step's grammar work (accepting last step's tokens, filling 256 mask
rows) took 3-4 ms of the engine thread on the H200's host, where the plain step is already
host-bound; threads did not help (the calls release the GIL, but the Python between them and
the engine's own contend for it). Here the engine thread only sends the step's operations and
later reads the masks from shared memory.

Two pipes to the process: compiles (the GrammarManager's, answered as they finish, by a reader
thread here) and steps (the processor's: operations and a fill request, one reply per step).
A compiled grammar stays in the process under an id; the engine side holds a ``RemoteGrammar``
handle, and once no handle is left the id is released (with the next step's message).
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import mmap
import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Any, Optional, Sequence

import numpy as np

from servelm.structured_output.backend import CompiledGrammar
from servelm.structured_output.params import StructuredOutputsParams


class RemoteGrammar(CompiledGrammar):
    """A grammar compiled in the mask process: its matchers live there (the processor sends
    this handle's id); nothing here builds a matcher."""

    def __init__(self, service: "MaskService", gid: int) -> None:
        self.service = service
        self.gid = gid

    def matcher(self, max_rollback_tokens: int) -> Any:
        raise RuntimeError("a grammar of the mask process has its matchers there")

    def __del__(self) -> None:
        self.service.release(self.gid)


class MaskService:
    """The engine side of the mask process."""

    def __init__(self, backend_name: str, backend_state: Any, words: int,
                 stop: np.ndarray) -> None:
        # a fresh interpreter running this module: not a fork (the engine has threads and
        # maybe CUDA), and not multiprocessing's spawn, which re-imports the user's main
        # module (a script without a __main__ guard would start again)
        ours = [socket.socketpair() for _ in range(2)]
        fds = [theirs.fileno() for _, theirs in ours]
        import servelm
        root = os.path.dirname(os.path.dirname(os.path.abspath(servelm.__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "servelm.structured_output.service", *map(str, fds)],
            pass_fds=fds, env=env, stdin=subprocess.DEVNULL)
        self._compile_conn, self._step_conn = (Connection(mine.detach()) for mine, _ in ours)
        for _, theirs in ours:
            theirs.close()
        self._step_conn.send((backend_name, backend_state, words, stop))
        self.words = words
        self._lock = threading.Lock()  # compile sends (manager threads)
        self._futures: dict[int, cf.Future] = {}
        self._next_gid = 0
        self._released: collections.deque[int] = collections.deque()
        # the masks: [rows, W] int32 in memory shared with the process (a memfd, mapped on
        # both sides; replaced when a step needs more rows)
        self._memory: Optional[mmap.mmap] = None
        self._rows = 0
        self._waiting = False  # a step's reply is due
        self._closed = False
        # the last step: seconds the process worked on it, and this side waited for it
        self.busy_s = self.wait_s = 0.0
        # the reader holds no reference to this object: once it is dropped, its connections
        # close, the process sees the end of its input and exits, and so does the reader
        threading.Thread(target=_read_compiles, daemon=True, name="grammar-compile-replies",
                         args=(self._compile_conn, self._lock, self._futures,
                               weakref.ref(self))).start()

    # ---- compiles (manager threads) ------------------------------------------------------
    def compile(self, params: StructuredOutputsParams) -> RemoteGrammar:
        """Compiled there (waits: a GrammarManager thread calls it, as a backend's compile);
        ValueError with the reason if it does not compile."""
        return self.compile_async(params).result()

    def compile_async(self, params: StructuredOutputsParams) -> cf.Future:
        fut: cf.Future = cf.Future()
        with self._lock:
            gid = self._next_gid
            self._next_gid += 1
            self._futures[gid] = fut
            self._compile_conn.send(("compile", gid, params.to_dict()))
        return fut

    def release(self, gid: int) -> None:
        # sent with the next step (any thread may call this, even the GC), where the process
        # forgets it after that step's operations: an "add" of it queued before goes first
        self._released.append(gid)

    def _take_released(self) -> list[int]:
        out = []
        while self._released:
            out.append(self._released.popleft())
        return out

    # ---- steps (the runner's thread) -----------------------------------------------------
    def submit(self, ops: Sequence[tuple], rows: Sequence[int],
               drafts: dict[int, Sequence[int]]) -> None:
        """Run ``ops`` there, then fill a mask row per batch row in ``rows`` (after its
        drafts); the masks are read with ``result()``."""
        if self._waiting:
            raise RuntimeError("the last mask request was not collected")
        fd = None
        if len(rows) > self._rows:
            fd = self._grow(len(rows))
        self._step_conn.send((ops, list(rows), drafts, None if fd is None else self._rows,
                              self._take_released()))
        if fd is not None:  # the new memory's descriptor, right behind the message
            reduction.send_handle(self._step_conn, fd, self.proc.pid)
            os.close(fd)
        self._waiting = True

    def result(self, num_rows: int) -> np.ndarray:
        """[num_rows, W] int32: the masks of the last submit (a view of shared memory, valid
        until the next submit)."""
        self._waiting = False
        t0 = time.perf_counter()
        try:
            err, self.busy_s = self._step_conn.recv()
        except (EOFError, OSError):
            raise RuntimeError("the grammar mask process exited") from None
        self.wait_s = time.perf_counter() - t0
        if err is not None:
            raise RuntimeError(f"the grammar mask process failed: {err}")
        return self._view()[:num_rows]

    def _view(self) -> np.ndarray:
        return np.ndarray((self._rows, self.words), dtype=np.int32, buffer=self._memory)

    def _grow(self, rows: int) -> int:
        """New shared memory for at least ``rows`` rows; its descriptor (to send)."""
        rows = max(rows, 2 * self._rows, 64)
        size = rows * self.words * 4
        fd = os.memfd_create("servelm-grammar-masks")
        os.ftruncate(fd, size)
        self._memory = mmap.mmap(fd, size)  # the old one unmaps once no view is left
        self._rows = rows
        return fd

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for conn in (self._step_conn, self._compile_conn):
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for conn in (self._step_conn, self._compile_conn):
            conn.close()
        if self._memory is not None:
            self._memory.close()
            self._memory = None


def _read_compiles(conn: Connection, lock: threading.Lock, futures: dict[int, cf.Future],
                   service: "weakref.ref[MaskService]") -> None:
    """The compile replies: (grammar id, error or None), as the compiles finish."""
    while True:
        try:
            gid, err = conn.recv()
        except (EOFError, OSError):
            break
        with lock:
            fut = futures.pop(gid, None)
        svc = service()
        if fut is None or svc is None:
            continue
        if err is None:
            fut.set_result(RemoteGrammar(svc, gid))
        else:
            fut.set_exception(ValueError(err))
        del svc
    with lock:  # the process is gone: nothing waiting may hang
        futs = list(futures.values())
        futures.clear()
    for f in futs:
        f.set_exception(RuntimeError("the grammar mask process exited"))


# ---- the process -------------------------------------------------------------------------
def serve(compile_conn: Connection, step_conn: Connection) -> None:
    import torch

    from servelm.structured_output.backend import backend_class
    from servelm.structured_output.rows import MatcherRows

    backend_name, backend_state, words, stop = step_conn.recv()
    backend = backend_class(backend_name).from_state(backend_state)
    grammars: dict[int, CompiledGrammar] = {}
    lock = threading.Lock()  # grammars, and replies on compile_conn
    pool = cf.ThreadPoolExecutor(2, thread_name_prefix="grammar")

    def forget(gids: Sequence[int]) -> None:
        with lock:
            for g in gids:
                grammars.pop(g, None)  # matchers made from it keep what they need

    def compile_one(gid: int, params: StructuredOutputsParams) -> None:
        try:
            g, err = backend.compile(params), None
        except ValueError as e:
            g, err = None, str(e)
        except Exception as e:  # noqa: BLE001 - reported to the request, never lost
            g, err = None, f"structured outputs failed: {type(e).__name__}: {e}"
        with lock:
            if g is not None:
                grammars[gid] = g
            compile_conn.send((gid, err))

    def compiles() -> None:
        while True:
            try:
                msg = compile_conn.recv()
            except (EOFError, OSError):
                return
            if msg is None:
                return
            _, gid, params = msg
            pool.submit(compile_one, gid, StructuredOutputsParams.from_dict(params))

    threading.Thread(target=compiles, daemon=True).start()
    rows = MatcherRows(words, stop, resolve=lambda gid: grammars[gid])
    bitmask = None  # [cap, W] int32 over the engine's shared memory (xgrammar fills tensors)
    while True:
        try:
            msg = step_conn.recv()
            ops, fill_rows, drafts, cap, released = msg or (None,) * 5
            if cap is not None:  # new memory: its descriptor follows
                fd = reduction.recv_handle(step_conn)
                bitmask = torch.frombuffer(mmap.mmap(fd, cap * words * 4),
                                           dtype=torch.int32).view(cap, words)
                os.close(fd)
        except (EOFError, OSError):
            break
        if msg is None:
            break
        t0 = time.perf_counter()
        try:
            with lock:
                rows.run(ops)
            forget(released)
            if fill_rows:
                rows.fill(fill_rows, drafts, bitmask)
            step_conn.send((None, time.perf_counter() - t0))
        except Exception as e:  # noqa: BLE001 - the engine raises it in its step
            step_conn.send((f"{type(e).__name__}: {e}", 0.0))
    pool.shutdown(wait=False, cancel_futures=True)


if __name__ == "__main__":  # python -m servelm.structured_output.service COMPILE_FD STEP_FD
    serve(*(Connection(int(fd)) for fd in sys.argv[1:3]))
