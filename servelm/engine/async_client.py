"""AsyncEngineClient: the API process's half of the engine.

It tokenizes (InputProcessor), owns the OutputProcessor (detokenizing, stop strings, n > 1),
and talks to the EngineCore process over two ZeroMQ sockets (see core_proc). One asyncio task
reads the output socket and hands cumulative RequestOutputs to per-request queues; a request
whose consumer goes away (client disconnect, cancellation) is aborted in the core, so its KV
blocks are freed at the next step. If the core process dies, every in-flight request and every
later one fails with EngineDeadError instead of hanging.
"""
from __future__ import annotations

import asyncio
import collections
import copy
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Optional, Protocol, Union

import zmq
import zmq.asyncio

from servelm.config import EngineConfig
from servelm.core.step import SchedulerStats
from servelm.engine import core_proc as cp
from servelm.engine.core_launcher import PROCESS_NAME, CoreLauncher
from servelm.engine.core import EngineRequest
from servelm.engine.engine import InputProcessor, PromptType
from servelm.engine.output_processor import OutputProcessor
from servelm.outputs import RequestOutput
from servelm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_HEALTH_POLL_S = 0.2  # only where the event loop cannot watch the process's sentinel fd
_LAST_WORDS_S = 0.5  # after the core exits, how long its last messages may take to arrive
_SHUTDOWN_GRACE_S = 5.0
# texts longer than this (characters) are encoded on the big lane (about 30 ms of encoding)
BIG_TEXT_CHARS = 1 << 15


class EngineDeadError(RuntimeError):
    """The engine core process has exited; no request can be served."""


class ShuttingDownError(RuntimeError):
    """The server is shutting down: requests still running at the end of its grace period
    end with this (HTTP 503), as do requests that arrive during it."""


class RequestError(ValueError):
    """The engine core refused one request for its input (e.g. a grammar that does not compile
    in time): the client's fault, an HTTP 400."""


@dataclass(frozen=True)
class ProcessedPrompt:
    """A tokenized, validated prompt with its final sampling params (max_tokens resolved)."""

    text: Optional[str]
    token_ids: list[int]
    params: SamplingParams


class OutputListener(Protocol):
    """Sees every batch of outputs (for metrics); must not block."""

    def on_outputs(self, outputs: list[RequestOutput], now: float) -> None: ...

    def on_abort(self, request_id: str, num_children: int) -> None: ...


class AsyncEngineClient:
    """Create with ``await AsyncEngineClient.start(config)``; stop with ``await shutdown()``."""

    def __init__(self, config: EngineConfig, tokenizer: Any, proc: Any, tmpdir: str,
                 in_sock: zmq.Socket, out_sock: zmq.asyncio.Socket, contexts: tuple,
                 listener: Optional[OutputListener]) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.inputs = InputProcessor(config, tokenizer)
        self.outputs = OutputProcessor(tokenizer)
        self.listener = listener
        self._proc = proc
        self._tmpdir = tmpdir
        self._in = in_sock  # sync PUSH with no high-water mark: sends never block the loop
        self._out = out_sock  # asyncio PULL
        self._contexts = contexts
        self._queues: dict[str, asyncio.Queue] = {}
        self._stats_waiters: collections.deque[asyncio.Future] = collections.deque()
        self._last_stats: Optional[SchedulerStats] = None
        self._telemetry_waiters: collections.deque[asyncio.Future] = collections.deque()
        # tokenizing is off the event loop, on two lanes of one thread each: texts over
        # BIG_TEXT_CHARS go to a lane of their own with its own copy of the tokenizer, so a
        # long prompt or /tokenize text (seconds of encoding, which releases the GIL) never
        # queues short requests behind it
        self._tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="servelm-tokenize")
        self._big_pool = ThreadPoolExecutor(1, thread_name_prefix="servelm-tokenize-big")
        self._big_tokenizer: Any = None  # the big lane's copy (made there, on first use)
        self.dead_error: Optional[EngineDeadError] = None
        # called (on the event loop) once the core process died unasked, after every request
        # in flight got the error: the server restarts the core or exits
        self.on_dead: Optional[Callable[[EngineDeadError], None]] = None
        self._exited: asyncio.Future = asyncio.get_running_loop().create_future()
        self._reader: Optional[asyncio.Task] = None
        self._tasks: list[asyncio.Future] = []  # the watchdog (and a liveness poller if needed)
        self._closed = False

    # ---- lifecycle ----------------------------------------------------------------------
    @classmethod
    async def start(cls, config: EngineConfig, tokenizer: Any = None,
                    listener: Optional[OutputListener] = None,
                    startup_timeout_s: float = 1800.0,
                    launcher: Optional[CoreLauncher] = None) -> "AsyncEngineClient":
        """Starts an engine core process (``launcher``'s pre-started one, if it has one left)
        and waits until it is ready."""
        tmpdir = tempfile.mkdtemp(prefix="servelm-")
        in_addr, out_addr = f"ipc://{tmpdir}/input", f"ipc://{tmpdir}/output"
        sync_ctx, async_ctx = zmq.Context(), zmq.asyncio.Context()
        in_sock = sync_ctx.socket(zmq.PUSH)
        in_sock.setsockopt(zmq.SNDHWM, 0)
        in_sock.bind(in_addr)
        out_sock = async_ctx.socket(zmq.PULL)
        out_sock.setsockopt(zmq.RCVHWM, 0)
        out_sock.bind(out_addr)
        args = (config, in_addr, out_addr, logging.getLogger().getEffectiveLevel(), os.getpid())
        proc = launcher.launch(args) if launcher is not None else None
        if proc is None:
            proc = multiprocessing.get_context("spawn").Process(
                target=cp.run_engine_core, name=PROCESS_NAME, daemon=True, args=args)
            proc.start()
        if config.device == "cpu":  # the core takes the first CPUs, this process the rest
            from servelm.cpu.threads import configure_api
            configure_api(config.threads, config.cpus)
        client = cls(config, None, proc, tmpdir, in_sock, out_sock, (sync_ctx, async_ctx), listener)
        client._watch_process()
        try:
            if tokenizer is None and not config.skip_tokenizer_init:
                from servelm.loader import load_tokenizer
                mc = config.model
                tokenizer = await asyncio.get_running_loop().run_in_executor(
                    client._tokenize_pool, load_tokenizer,
                    mc.model, mc.tokenizer, mc.load_format)
            client.tokenizer = tokenizer
            client.inputs = InputProcessor(config, tokenizer)
            client.outputs = OutputProcessor(tokenizer)
            await asyncio.wait_for(client._wait_ready(), startup_timeout_s)
        except BaseException:
            await client.shutdown()
            raise
        client._reader = asyncio.create_task(client._read_outputs(), name="servelm-output-reader")
        client._tasks.append(asyncio.create_task(client._watchdog(), name="servelm-watchdog"))
        return client

    async def _wait_ready(self) -> None:
        while True:
            recv = asyncio.ensure_future(self._out.recv())
            await asyncio.wait({recv, self._exited}, return_when=asyncio.FIRST_COMPLETED)
            if not recv.done():  # the core exited; its last words may still be on the way
                await asyncio.wait({recv}, timeout=_LAST_WORDS_S)
            if not recv.done():
                recv.cancel()
                raise RuntimeError("the engine core process exited during startup (exit code "
                                   f"{self._proc.exitcode}); see its log above.")
            kind, payload = cp.unpack(recv.result())
            if kind == cp.READY:
                logger.info("engine core ready (pid %s, %s KV blocks)", payload.get("pid"),
                            payload.get("num_blocks"))
                if isinstance(payload.get("num_blocks"), int):
                    self.inputs.kv_capacity_tokens = (payload["num_blocks"]
                                                      * self.config.cache.block_size)
                return
            if kind == cp.ERROR:
                raise RuntimeError(f"the engine core failed to start: {payload}")

    def _watch_process(self) -> None:
        """Resolves ``_exited`` the moment the core process ends (its sentinel fd closes)."""
        loop = asyncio.get_running_loop()

        def on_exit() -> None:
            loop.remove_reader(self._proc.sentinel)
            if not self._exited.done():
                self._exited.set_result(None)

        try:
            loop.add_reader(self._proc.sentinel, on_exit)
        except NotImplementedError:  # an event loop without fd readers: poll instead
            async def poll() -> None:
                while self._proc.is_alive():
                    await asyncio.sleep(_HEALTH_POLL_S)
                on_exit()
            self._tasks.append(asyncio.ensure_future(poll()))

    async def _watchdog(self) -> None:
        await self._exited
        await asyncio.sleep(_LAST_WORDS_S)  # let the reader take outputs and an error message
        if self._reader is not None:
            self._reader.cancel()
        code = self._proc.exitcode
        how = (f"killed by signal {-code}" if code is not None and code < 0
               else f"exit code {code}")
        err = self.dead_error or EngineDeadError(f"the engine core process died ({how}).")
        logger.error("engine core (pid %s) died (%s): %s; %d request(s) in flight failed",
                     self._proc.pid, how, err, len(self._queues))
        self._fail_all(err)
        if self.on_dead is not None:
            self.on_dead(err)

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in [self._reader, *self._tasks]:
            if task is not None:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        self._fail_all(self.dead_error or EngineDeadError("the server is shutting down."))
        if self._proc.is_alive():
            self._send(cp.SHUTDOWN)
            deadline = time.monotonic() + _SHUTDOWN_GRACE_S
            while self._proc.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self._proc.is_alive():
                self._proc.kill()
        self._proc.join(timeout=_SHUTDOWN_GRACE_S)
        if not self._exited.done():
            try:
                asyncio.get_running_loop().remove_reader(self._proc.sentinel)
            except (NotImplementedError, ValueError, OSError):
                pass
        self._in.close(linger=0)
        self._out.close(linger=0)
        for ctx in self._contexts:
            ctx.term()
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        self._big_pool.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    async def restart(self, listener: Optional[OutputListener]) -> "AsyncEngineClient":
        """A new core with this one's configuration and tokenizer; the caller shuts this one
        down."""
        return await AsyncEngineClient.start(self.config, tokenizer=self.tokenizer,
                                             listener=listener)

    # ---- health -------------------------------------------------------------------------
    @property
    def core_pid(self) -> Optional[int]:
        return self._proc.pid

    @property
    def is_healthy(self) -> bool:
        return self.dead_error is None and not self._closed and self._proc.is_alive()

    def check_health(self) -> None:
        if self.dead_error is not None:
            raise self.dead_error
        if self._closed:
            raise EngineDeadError("the engine is shut down.")
        if not self._proc.is_alive():
            raise EngineDeadError(f"the engine core process exited (code {self._proc.exitcode}).")

    # ---- requests -----------------------------------------------------------------------
    def process_input(self, prompt: PromptType, params: SamplingParams,
                      add_special_tokens: bool = True, tokenizer: Any = None) -> ProcessedPrompt:
        """Tokenize and validate; raises ValueError for anything a user got wrong.
        ``tokenizer``: another copy to encode with (the big lane's)."""
        texts = [prompt] if isinstance(prompt, str) else []
        if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
            texts.append(prompt["prompt"])
        for s in texts + list(params.stop):
            _check_utf8(s)
        text, ids, params = self.inputs.process(prompt, params, add_special_tokens, tokenizer)
        return ProcessedPrompt(text, ids, params)

    async def process_input_async(self, prompt: PromptType, params: SamplingParams,
                                  add_special_tokens: bool = True) -> ProcessedPrompt:
        text = prompt.get("prompt") if isinstance(prompt, dict) else prompt
        if isinstance(text, str) and len(text) > BIG_TEXT_CHARS:
            return await self._on_big_lane(
                lambda tok: self.process_input(prompt, params, add_special_tokens, tok))
        return await asyncio.get_running_loop().run_in_executor(
            self._tokenize_pool, self.process_input, prompt, params, add_special_tokens)

    async def encode_async(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The text's token ids (/tokenize: no length bound), on the lane its length picks."""
        if len(text) > BIG_TEXT_CHARS:
            return await self._on_big_lane(
                lambda tok: tok.encode(text, add_special_tokens=add_special_tokens))
        return await self.run_in_tokenizer_thread(
            lambda: self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    async def _on_big_lane(self, fn: Callable[[Any], Any]) -> Any:
        def run() -> Any:
            if self._big_tokenizer is None:  # its own copy: the Rust tokenizer is shared
                self._big_tokenizer = copy.deepcopy(self.tokenizer)  # state, not re-entrant
            try:
                return fn(self._big_tokenizer)
            finally:  # a long text's encoding took hundreds of MB, which malloc would keep
                cp.release_free_memory()
        return await asyncio.get_running_loop().run_in_executor(self._big_pool, run)

    async def run_in_tokenizer_thread(self, fn: Any, *args: Any) -> Any:
        """Runs fn(*args) on the tokenizer's thread (chat templates, /tokenize, /detokenize)."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, fn, *args)

    async def generate(self, request_id: str, prompt: Union[PromptType, ProcessedPrompt],
                       params: Optional[SamplingParams] = None, *, add_special_tokens: bool = True,
                       priority: int = 0, ttft_slo_ms: Optional[float] = None,
                       tpot_slo_ms: Optional[float] = None,
                       lora_request: Any = None) -> AsyncIterator[RequestOutput]:
        """Yields cumulative RequestOutputs (the latest state; intermediate ones may be skipped
        when the consumer is slower than the engine), the last with ``finished=True``.
        Closing or cancelling the iterator before then aborts the request."""
        self.check_health()
        self.inputs.check_priority(priority)
        self.inputs.check_slo(ttft_slo_ms, tpot_slo_ms)
        self.inputs.check_lora(lora_request)
        if not isinstance(prompt, ProcessedPrompt):
            prompt = self.process_input(prompt, params or SamplingParams(), add_special_tokens)
        p = prompt.params
        arrival = time.time()
        child_ids = self.outputs.add_request(request_id, prompt.text, prompt.token_ids, p, arrival)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        finished = False
        try:
            for i, cid in enumerate(child_ids):
                req = EngineRequest(cid, prompt.token_ids, p.child(i) if p.n > 1 else p, arrival,
                                    request_id if p.n > 1 else None, priority, ttft_slo_ms,
                                    tpot_slo_ms, lora_request)
                if not self._send(cp.ADD, cp.encode_request(req)):
                    raise EngineDeadError("the engine core is not reachable.")
            while True:
                item = await queue.get()
                while not queue.empty():  # outputs are cumulative: only the newest matters
                    newer = queue.get_nowait()
                    item = item if isinstance(item, BaseException) else newer
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._abort(request_id)

    def end_requests(self, err: BaseException) -> int:
        """End every request in flight with ``err`` (their generators raise it; leaving, they
        abort their sequences in the core); how many there were."""
        for q in self._queues.values():
            q.put_nowait(err)
        return len(self._queues)

    def num_sequences_in_flight(self) -> int:
        """Sequences added and not finished (running or waiting in the core)."""
        return len(self.outputs.child_to_parent)

    async def abort(self, request_id: str) -> None:
        self._abort(request_id)

    async def get_stats(self, timeout_s: float = 5.0) -> SchedulerStats:
        """The core's scheduler stats; the last known ones if the core cannot answer."""
        if self.is_healthy:
            fut = asyncio.get_running_loop().create_future()
            self._stats_waiters.append(fut)
            if self._send(cp.STATS):
                try:
                    self._last_stats = await asyncio.wait_for(fut, timeout_s)
                except (asyncio.TimeoutError, EngineDeadError):
                    pass
        if self._last_stats is None:
            return SchedulerStats(0, 0, 0.0, 0, 0, 0)
        return self._last_stats

    async def get_telemetry(self, since_step: int = -1, timeout_s: float = 5.0) -> dict:
        """The core's telemetry snapshot (Scheduler.telemetry_snapshot): the steps after
        ``since_step`` and request timelines. Unlike stats, a stale copy would be wrong (it
        depends on since_step), so this raises: EngineDeadError if the core is gone,
        TimeoutError if it does not answer within ``timeout_s`` (the core reads messages
        between steps), RuntimeError if the snapshot failed in the core."""
        self.check_health()
        fut = asyncio.get_running_loop().create_future()
        self._telemetry_waiters.append(fut)
        if not self._send(cp.TELEMETRY, since_step):
            self._telemetry_waiters.remove(fut)
            raise EngineDeadError("the engine core is not reachable.")
        try:
            snap = await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(f"the engine core did not answer within {timeout_s:g} s.") from None
        if "error" in snap:
            raise RuntimeError(f"the engine core's telemetry failed: {snap['error']}")
        return snap

    # ---- internals ----------------------------------------------------------------------
    def _send(self, kind: str, payload: Any = None) -> bool:
        """Non-blocking; False if the core is gone (a PUSH with no peer refuses at once)."""
        if self._closed and kind != cp.SHUTDOWN:
            return False
        try:
            self._in.send(cp.pack(kind, payload), zmq.NOBLOCK)
            return True
        except zmq.ZMQError:
            return False

    def _abort(self, request_id: str) -> None:
        children = self.outputs.abort_request(request_id)
        if children:
            self._send(cp.ABORT, children)
            self._notify("on_abort", request_id, len(children))

    async def _read_outputs(self) -> None:
        try:
            while True:
                kind, payload = cp.unpack(await self._out.recv())
                if kind == cp.OUTPUTS:
                    self._dispatch([cp.decode_output(x) for x in payload])
                elif kind == cp.STATS:
                    self._answer_stats(cp.decode_stats(payload))
                elif kind == cp.TELEMETRY:
                    _resolve_oldest(self._telemetry_waiters, payload)
                elif kind == cp.REQUEST_ERROR:
                    self._request_error(*payload)
                elif kind == cp.ERROR:
                    raise EngineDeadError(f"the engine core failed: {payload}")
        except asyncio.CancelledError:
            raise
        except Exception as e:
            err = e if isinstance(e, EngineDeadError) else EngineDeadError(
                f"the engine output reader failed: {type(e).__name__}: {e}")
            logger.error("%s", err)
            self._fail_all(err)

    def _dispatch(self, core_outputs: list) -> None:
        outs, stopped = self.outputs.process(core_outputs)
        if stopped:
            self._send(cp.STOP, stopped)
        if outs:
            self._notify("on_outputs", outs, time.time())
        for ro in outs:
            q = self._queues.get(ro.request_id)
            if q is not None:
                q.put_nowait(ro)

    def _notify(self, method: str, *args: Any) -> None:
        """Tells the listener; its failure (a metrics bug) must not take serving down."""
        if self.listener is not None:
            try:
                getattr(self.listener, method)(*args)
            except Exception:
                logger.exception("output listener %s failed", method)

    def _answer_stats(self, stats: SchedulerStats) -> None:
        # replies come in request order; a waiter that timed out still owns its (late) reply
        if self._stats_waiters:
            fut = self._stats_waiters.popleft()
            if not fut.done():
                fut.set_result(stats)

    def _request_error(self, child_id: str, message: str) -> None:
        parent = self.outputs.child_to_parent.get(child_id, child_id)
        q = self._queues.get(parent)
        if q is not None:
            q.put_nowait(RequestError(message))

    def _fail_all(self, err: EngineDeadError) -> None:
        if self.dead_error is None and not self._closed:
            self.dead_error = err
        for q in self._queues.values():
            q.put_nowait(err)
        for waiters in (self._stats_waiters, self._telemetry_waiters):
            while waiters:
                fut = waiters.popleft()
                if not fut.done():
                    fut.set_exception(err)


def _resolve_oldest(waiters: collections.deque, value: Any) -> None:
    # replies come in request order; a waiter that timed out still owns its (late) reply
    if waiters:
        fut = waiters.popleft()
        if not fut.done():
            fut.set_result(value)


def _check_utf8(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the text has an invalid character at position {e.start} (a lone "
                         "UTF-16 surrogate): send valid Unicode.") from None
