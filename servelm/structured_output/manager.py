"""Grammar compilation off the step loop, for the engine core.

A request with structured outputs waits here (not in the scheduler) while its grammar compiles on
a worker thread (xgrammar releases the GIL, so the step loop keeps running), or in the mask
process (``mask_process``: service.py; the thread then waits for it); it joins the scheduler
once compiled, carrying the compiled grammar (or the mask process's handle) to the runner. Compiled grammars are
cached by their params, so a schema seen before costs a dictionary lookup. A grammar that fails
to compile, or is still compiling after ``compile_timeout_s``, fails its request with a message
(HTTP 400 at the server) and never holds up other requests.
"""
from __future__ import annotations

import concurrent.futures as cf
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

from servelm.structured_output.backend import GrammarBackend, backend_class
from servelm.structured_output.params import StructuredOutputsConfig, StructuredOutputsParams

# concurrent compiles: one pathological grammar cannot hold up all others
_COMPILE_THREADS = 2

@dataclass
class _Pending:
    req: Any  # core.request.Request
    future: cf.Future
    since: float  # time.monotonic() when it arrived

class GrammarManager:
    def __init__(self, config: StructuredOutputsConfig, model_config: Any,
                 tokenizer: Any = None, mask_process: bool = False) -> None:
        self.config = config
        self.mask_process = mask_process  # config.mask_process, resolved by the engine
        self.model_config = model_config  # tokenizer path and vocabulary size
        self._tokenizer = tokenizer  # else loaded on first use, on a worker thread
        self._pool: Optional[cf.ThreadPoolExecutor] = None
        self._backend: Optional[cf.Future] = None
        self._cache: OrderedDict[StructuredOutputsParams, cf.Future] = OrderedDict()
        self.pending: dict[str, _Pending] = {}  # request id -> waiting for its grammar

    def _make_backend(self) -> GrammarBackend:
        mc = self.model_config
        tok = self._tokenizer
        if tok is None:
            from servelm.loader import load_tokenizer
            tok = load_tokenizer(mc.model, mc.tokenizer, mc.load_format)
        vocab = mc.hf_config.vocab_size
        name = "xgrammar" if self.config.backend == "auto" else self.config.backend
        backend = backend_class(name)(tok, vocab, mc.eos_token_ids)
        if not self.mask_process:
            return backend
        from servelm.structured_output.rows import stop_row
        from servelm.structured_output.service import MaskService
        words = -(-vocab // 32)
        return MaskService(name, backend.state(), words,
                           stop_row(words, vocab, mc.eos_token_ids))

    def _start(self) -> cf.Future:
        if self._backend is None:
            self._pool = cf.ThreadPoolExecutor(_COMPILE_THREADS, thread_name_prefix="grammar")
            self._backend = self._pool.submit(self._make_backend)
        return self._backend

    def warm_up(self) -> None:
        """Build the backend (tokenizer, vocabulary tables) now, in the background: the first
        structured request then pays only its own compile."""
        self._start()

    def _compile(self, params: StructuredOutputsParams) -> cf.Future:
        fut = self._cache.get(params)
        if fut is not None:
            self._cache.move_to_end(params)
            return fut
        backend = self._start()
        fut = self._pool.submit(lambda: backend.result().compile(params))
        self._cache[params] = fut
        while len(self._cache) > self.config.max_cached_grammars:
            self._cache.popitem(last=False)
        return fut

    def add(self, req: Any) -> None:
        self.pending[req.request_id] = _Pending(req, self._compile(req.params.structured_outputs),
                                                time.monotonic())

    def drop(self, req_id: str) -> bool:
        """Forget a waiting request (aborted, stopped); whether it was here."""
        return self.pending.pop(req_id, None) is not None

    def collect(self) -> tuple[list[Any], list[tuple[Any, str]]]:
        """(requests whose grammar is ready, with ``req.grammar`` set; (request, error message)
        for those whose grammar failed or ran out of time)."""
        ready, failed = [], []
        if not self.pending:
            return ready, failed
        now = time.monotonic()
        for rid, p in list(self.pending.items()):
            if p.future.done():
                del self.pending[rid]
                err = p.future.exception()
                if err is None:
                    p.req.grammar = p.future.result()
                    ready.append(p.req)
                else:
                    failed.append((p.req, str(err) if isinstance(err, ValueError)
                                   else f"structured outputs failed: {type(err).__name__}: {err}"))
            elif now - p.since > self.config.compile_timeout_s:
                del self.pending[rid]
                failed.append((p.req, f"the structured-output {p.req.params.structured_outputs.kind}"
                               f" did not compile within {self.config.compile_timeout_s:g} s; "
                               "simplify it (e.g. smaller repetition counts)."))
        return ready, failed

    def wait(self, timeout_s: float) -> None:
        """Block until a waiting grammar is ready or timeout_s passes (nothing else to run)."""
        if self.pending:
            cf.wait([p.future for p in self.pending.values()], timeout_s,
                    return_when=cf.FIRST_COMPLETED)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        b = self._backend
        if b is not None and b.done() and b.exception() is None and hasattr(b.result(), "close"):
            b.result().close()  # the mask process
