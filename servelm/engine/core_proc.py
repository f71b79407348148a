"""The EngineCore in its own process, and the messages that cross the process boundary.

Two ZeroMQ PUSH/PULL sockets on ipc:// paths: the client binds both, the core connects.
Every message is msgpack of ``[kind, payload]``; dataclasses travel as plain lists in field
order (no pickle: the core never runs code a message carries).

  client -> core: ["add", EngineRequest], ["abort", [ids]], ["stop", [ids]], ["stats", None],
                  ["telemetry", since_step], ["shutdown", None]
  core -> client: ["ready", {"num_blocks"}], ["outputs", [EngineCoreOutput]],
                  ["stats", SchedulerStats], ["telemetry", dict (Scheduler.telemetry_snapshot, or
                  {"error": message})], ["request_error", [req_id, message]],
                  ["error", message]  (the core is about to exit)
"""
from __future__ import annotations

import ctypes
import dataclasses
import logging
import multiprocessing
import os
import signal
import sys
import traceback
from typing import Any, Optional

import msgpack
import zmq

from servelm.config import EngineConfig
from servelm.core.step import EngineCoreOutput, SchedulerStats
from servelm.engine.core import EngineCore, EngineRequest
from servelm.lora.request import LoRARequest
from servelm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

ADD, ABORT, STOP, STATS, SHUTDOWN = "add", "abort", "stop", "stats", "shutdown"
TELEMETRY = "telemetry"
READY, OUTPUTS, REQUEST_ERROR, ERROR = "ready", "outputs", "request_error", "error"

# output_kind only matters to the client's OutputProcessor; the core never sees it
_PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams) if f.name != "output_kind")
_OUTPUT_FIELDS = tuple(f.name for f in dataclasses.fields(EngineCoreOutput))
_STATS_FIELDS = tuple(f.name for f in dataclasses.fields(SchedulerStats))
_IDLE_POLL_MS = 1000  # while idle, how often the core checks that its parent is alive


# ---- encoding ------------------------------------------------------------------------------
def pack(kind: str, payload: Any = None) -> bytes:
    return msgpack.packb([kind, payload], use_bin_type=True)


def unpack(data: bytes) -> tuple[str, Any]:
    # int map keys: logprob dicts are keyed by token id
    kind, payload = msgpack.unpackb(data, raw=False, strict_map_key=False)
    return kind, payload


def encode_request(r: EngineRequest) -> list:
    params = [getattr(r.params, f) for f in _PARAM_FIELDS]
    so = r.params.structured_outputs
    if so is not None:  # a frozen dataclass: travels as its field dict
        params[_PARAM_FIELDS.index("structured_outputs")] = so.to_dict()
    return [r.request_id, r.prompt_token_ids, params, r.arrival_time, r.parent_id, r.priority,
            r.ttft_slo_ms, r.tpot_slo_ms,
            None if r.lora_request is None else r.lora_request.to_list()]


def decode_request(x: list) -> EngineRequest:
    rid, ids, params, arrival, parent, priority, ttft_slo, tpot_slo, lora = x
    return EngineRequest(rid, ids, SamplingParams(**dict(zip(_PARAM_FIELDS, params))), arrival,
                         parent, priority, ttft_slo, tpot_slo, LoRARequest.from_list(lora))


def encode_output(o: EngineCoreOutput) -> list:
    # logprob dicts {id: (lp, rank)} become maps of 2-lists; the output processor only indexes them
    return [getattr(o, f) for f in _OUTPUT_FIELDS]


def decode_output(x: list) -> EngineCoreOutput:
    return EngineCoreOutput(*x)


def encode_stats(s: SchedulerStats) -> list:
    return [getattr(s, f) for f in _STATS_FIELDS]


def decode_stats(x: list) -> SchedulerStats:
    return SchedulerStats(*x)


# ---- the process ---------------------------------------------------------------------------
class EngineCoreProc:
    """Busy loop: drain inputs, step while there is work, block on the input socket when idle."""

    def __init__(self, core: EngineCore, inp: Any, out: Any, parent_pid: int) -> None:
        self.core = core
        self.inp = inp  # zmq PULL
        self.out = out  # zmq PUSH
        # the API process, as it said (not getppid() now: it may have died during start-up,
        # and an orphan's parent is init)
        self.parent_pid = parent_pid
        self.running = True
        self.executor_failure: Optional[str] = None  # set by the executor's monitor thread
        core.executor.on_failure = self._on_executor_failure

    def _on_executor_failure(self, reason: str) -> None:
        self.executor_failure = reason

    def run(self) -> None:
        idle_work = True  # deferred start-up work (graph captures) left for idle moments
        was_busy = False
        while self.running:
            busy = self.core.has_unfinished_requests()
            if was_busy and not busy:
                release_free_memory()  # idle again: heap pages freed by the steps go back
            was_busy = busy
            if not busy and idle_work:
                idle_work = self.core.use_idle_time()
                busy = idle_work  # do not block while there is more: poll and come back
            self._drain_inputs(block=not busy)
            if self.running and self.core.has_unfinished_requests():
                outputs = self.core.step()
                if outputs:
                    self.out.send(pack(OUTPUTS, [encode_output(o) for o in outputs]))
                for rid, message in self.core.take_request_errors():
                    self.out.send(pack(REQUEST_ERROR, [rid, message]))

    def _drain_inputs(self, block: bool) -> None:
        while block and self.running:
            if self.inp.poll(_IDLE_POLL_MS):
                break
            if self.executor_failure is not None:  # reported by run_engine_core, then exit
                raise RuntimeError(f"model executor failed: {self.executor_failure}")
            if os.getppid() != self.parent_pid:  # the API process is gone: nobody to serve
                logger.warning("engine core: parent process exited, shutting down")
                self.running = False
                return
        while self.running:
            try:
                data = self.inp.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(*unpack(data))

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == ADD:
            try:
                self.core.add_request(decode_request(payload))
            except (ValueError, TypeError) as e:  # bad input must not stop the engine
                self.out.send(pack(REQUEST_ERROR, [payload[0], str(e)]))
        elif kind == ABORT:
            self.core.abort_requests(payload)
        elif kind == STOP:
            self.core.stop_requests(payload)
        elif kind == STATS:
            self.out.send(pack(STATS, encode_stats(self.core.stats())))
        elif kind == TELEMETRY:
            self.out.send(pack(TELEMETRY, self._telemetry(payload)))
        elif kind == SHUTDOWN:
            self.running = False
        else:
            logger.error("engine core: unknown message kind %r ignored", kind)

    def _telemetry(self, since_step: Any) -> dict:
        # the dashboard is a bystander: a bad value or a bug here must not stop serving, and
        # the client's waiter still gets its (error) reply in order
        try:
            if not isinstance(since_step, int) or isinstance(since_step, bool):
                raise TypeError(f"since_step must be an integer, got {since_step!r}")
            return self.core.telemetry(since_step)
        except Exception as e:
            logger.exception("engine core: telemetry snapshot failed")
            return {"error": f"{type(e).__name__}: {e}"}


def release_free_memory() -> None:
    """Hand free heap memory back to the OS (glibc's malloc_trim). Steps of varying batch
    shapes leave freed blocks in malloc's arenas, and without this the core's resident memory
    ratchets up under load (about +40% over 900 requests of a soak) though nothing leaks."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def run_engine_core(config: EngineConfig, input_addr: str, output_addr: str,
                    log_level: int = logging.WARNING, parent_pid: Optional[int] = None) -> None:
    """Entry point of the spawned core process; parent_pid: the API process's."""
    parent_pid = os.getppid() if parent_pid is None else parent_pid
    # oneDNN (bf16 matmuls on the CPU) caches a compiled kernel per GEMM shape, 1024 by
    # default: with batches of every size that is hundreds of MB that never come back (a soak:
    # +364 MB over 2,500 requests of a tiny model). 256 kernels cover the shapes in use; set
    # before the first matmul, as oneDNN reads it once.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")
    # Ctrl-C reaches the whole process group; the API process decides when the core stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s[core]: %(message)s")
    if config.device == "cpu":  # the first CPUs; the API process keeps to the others
        from servelm.cpu.threads import pin_engine_process
        pin_engine_process(config.threads, config.cpus)
    ctx = zmq.Context()
    inp, out = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    inp.connect(input_addr)
    out.connect(output_addr)
    code = 0
    core = None
    try:
        core = EngineCore(config)
        out.send(pack(READY, {"num_blocks": core.scheduler.kv.num_blocks, "pid": os.getpid()}))
        EngineCoreProc(core, inp, out, parent_pid).run()
    except BaseException as e:  # report why, then exit: the client fails in-flight requests
        logger.error("engine core failed: %s", traceback.format_exc())
        out.send(pack(ERROR, f"{type(e).__name__}: {e}"))
        code = 1
    finally:
        if core is not None:
            core.shutdown()
        inp.close(linger=0)
        out.close(linger=2000)
        ctx.term()
    if multiprocessing.parent_process() is not None:
        # a spawned core: leave without the interpreter's teardown of torch and the rest (about
        # 1 s on the 2-core machine, every stop and restart), which frees nothing the OS does
        # not; the executor's workers are stopped and the sockets closed above
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        raise SystemExit(code)
