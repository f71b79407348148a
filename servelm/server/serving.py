"""What the completion and chat endpoints share: the server's limits, sampling params from a
request, prompt checks, several generators merged into one stream, streamed text deltas, logprob
formats and SSE framing."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional, TypeVar

from servelm.engine.async_client import (AsyncEngineClient, EngineDeadError, ProcessedPrompt,
                                        ShuttingDownError)
from servelm.lora.request import LoRARequest
from servelm.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from servelm.sampling_params import SamplingParams
from servelm.server.protocol import APIError, SamplingRequest, bad_request
from servelm.server.serve_settings import with_defaults
from servelm.server.structured import structured_outputs_of

T = TypeVar("T")
_MIN_LOGPROB = -9999.0  # JSON has no -inf: impossible tokens report this, as in vLLM


# bounds of run-time adapter loading (names are model names in every request and listing)
MAX_LORA_NAME = 256
MAX_LORA_PATH = 4096
MAX_LORAS_REGISTERED = 4096


@dataclass(frozen=True)
class ServerConfig:
    served_model_names: tuple[str, ...]
    api_key: Optional[str] = None
    metrics_without_api_key: bool = False  # /metrics open to scrapers even with an api key
    max_body_bytes: int = 32 << 20
    max_n: int = 128
    max_prompts: int = 1024  # prompts in one /v1/completions request
    default_ttft_slo_ms: Optional[float] = None  # for requests that set no ttft_slo_ms
    default_tpot_slo_ms: Optional[float] = None
    chat_template: Optional[str] = None  # --chat-template's text: replaces the tokenizer's
    # (request field, value) pairs of --generation-config, for fields a request leaves unset
    default_sampling_params: tuple[tuple[str, Any], ...] = ()
    enable_auto_tool_choice: bool = False
    tool_call_parser: Optional[str] = None
    # bounds on one request's work and on the queue (--max-... flags); over them: 400 / 429
    max_sequences_per_request: int = 1024  # prompts x n (x best_of)
    max_stop_sequences: int = 64
    max_stop_length: int = 1024  # characters per stop string
    max_waiting_requests: int = 4096  # sequences queued beyond the running batch
    on_engine_failure: str = "restart"  # or "exit" (server/recovery.py)
    cascade: bool = False  # the client is a cascade (servelm/cascade/client.py)
    # --lora-modules: (name, adapter directory) served from the start (--enable-lora)
    lora_modules: tuple[tuple[str, str], ...] = ()


class OpenAIServing:
    """State shared by the endpoint handlers of one app: the engine client and the limits."""

    def __init__(self, client: AsyncEngineClient, config: ServerConfig) -> None:
        self.client = client
        self.config = config
        self.shutting_down = False  # SIGTERM: new requests get a 503 (server/shutdown.py)
        # LoRA adapters served now, by name; each load gets a new id (so new weights under an
        # old name never meet KV cached under the old ones)
        self.loras: dict[str, LoRARequest] = {}
        self._lora_ids = itertools.count(1)

    @property
    def model_name(self) -> str:
        return self.config.served_model_names[0]

    @property
    def max_model_len(self) -> int:
        return self.client.config.model.max_model_len

    @property
    def kv_eviction(self) -> bool:
        return self.client.config.cache.kv_eviction is not None

    def check_model(self, name: Optional[str]) -> Optional[LoRARequest]:
        """The adapter a request's ``model`` names (None: the base model); 404 for a name
        this server does not serve."""
        if name is None or name in self.config.served_model_names:
            return None
        lora = self.loras.get(name)
        if lora is None:
            raise APIError(404, f"The model `{name}` does not exist; this server serves "
                                f"{[*self.config.served_model_names, *self.loras]}.",
                           param="model", code="model_not_found")
        return lora

    async def load_lora(self, name: str, path: str) -> LoRARequest:
        """Serve the adapter at ``path`` as model ``name`` (checked against the base model
        first: a bad one is a 400 and changes nothing)."""
        if self.client.config.lora is None:
            raise bad_request("this server does not serve LoRA adapters: start it with "
                              "--enable-lora.", "lora_name")
        if not name or not path:
            raise bad_request("lora_name and lora_path must be non-empty.",
                              "lora_name" if not name else "lora_path")
        for field, value, most in (("lora_name", name, MAX_LORA_NAME),
                                   ("lora_path", path, MAX_LORA_PATH)):
            if len(value) > most:
                raise bad_request(f"{field} must be at most {most} characters.", field)
        if len(self.loras) >= MAX_LORAS_REGISTERED:
            raise bad_request(f"this server already serves {len(self.loras)} adapters, the "
                              "most it registers; unload one first.", "lora_name")
        if name in self.config.served_model_names or name in self.loras:
            raise bad_request(f"The lora adapter '{name}' has already been loaded.", "lora_name")
        lora = LoRARequest(name, next(self._lora_ids), path)
        try:
            await self.client.run_in_tokenizer_thread(self.client.inputs.check_lora, lora)
        except ValueError as e:
            raise bad_request(str(e), "lora_path") from None
        if name in self.loras:  # loaded by a concurrent request meanwhile
            raise bad_request(f"The lora adapter '{name}' has already been loaded.", "lora_name")
        self.loras[name] = lora
        return lora

    def unload_lora(self, name: str, lora_int_id: Optional[int] = None) -> None:
        """Stop serving adapter ``name``: new requests for it are 404s; those running finish
        with it."""
        lora = self.loras.get(name)
        if lora is None or (lora_int_id is not None and lora_int_id != lora.lora_int_id):
            raise APIError(404, f"The lora adapter '{name}' cannot be found.",
                           param="lora_name", code="not_found")
        del self.loras[name]

    def sampling_params(self, req: SamplingRequest, max_tokens: Optional[int],
                        logprobs: Optional[int],
                        prompt_logprobs: Optional[int] = None) -> SamplingParams:
        req, max_tokens = with_defaults(req, max_tokens, self.config.default_sampling_params)
        try:
            self.client.inputs.check_priority(req.priority or 0)
        except ValueError as e:
            raise bad_request(str(e), "priority") from None
        so = req.stream_options
        if so is not None and so.continuous_usage_stats and not so.include_usage:
            raise bad_request("stream_options.continuous_usage_stats needs include_usage: "
                              "set both.", "stream_options.continuous_usage_stats")
        n = 1 if req.n is None else req.n
        if n > self.config.max_n:
            raise bad_request(f"n must be <= {self.config.max_n}, got {n}.", "n")
        kw: dict[str, Any] = dict(
            n=n, max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            seed=req.seed, stop=req.stop or [], stop_token_ids=req.stop_token_ids or [],
            logit_bias=req.logit_bias or None,  # string keys: SamplingParams converts them
            ignore_eos=bool(req.ignore_eos), min_tokens=req.min_tokens or 0,
            include_stop_str_in_output=bool(req.include_stop_str_in_output),
            skip_special_tokens=req.skip_special_tokens is not False,
            structured_outputs=structured_outputs_of(req),
            kv_eviction_budget=req.kv_eviction_budget)
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                     "frequency_penalty", "repetition_penalty"):
            if getattr(req, name) is not None:
                kw[name] = getattr(req, name)
        try:
            return SamplingParams(**kw)
        except ValueError as e:
            raise bad_request(str(e), _param_of(str(e))) from None

    def slo(self, req: SamplingRequest) -> dict[str, Optional[float]]:
        """The request's latency objectives (server defaults where unset), as generate()'s
        keyword arguments."""
        out = {"ttft_slo_ms": req.ttft_slo_ms if req.ttft_slo_ms is not None
               else self.config.default_ttft_slo_ms,
               "tpot_slo_ms": req.tpot_slo_ms if req.tpot_slo_ms is not None
               else self.config.default_tpot_slo_ms}
        try:
            self.client.inputs.check_slo(**out)
        except ValueError as e:
            raise bad_request(str(e), str(e).split(" ", 1)[0]) from None
        return out

    @property
    def may_shed(self) -> bool:
        return self.client.config.scheduler.policy == "slo"

    def wait_first(self, params: SamplingParams, slo: dict) -> bool:
        """Whether a stream waits for its first output before answering: the engine may still
        refuse the request then (a shed request is a 503, a grammar that does not compile a
        400), which must not come after a 200 has gone out; a cascade names the model that
        answers in a header, known with the first output."""
        return ((self.may_shed and slo["ttft_slo_ms"] is not None)
                or params.structured_outputs is not None or self.config.cascade)

    def check_limits(self, params: SamplingParams, num_prompts: int,
                     samples_per_prompt: Optional[int] = None) -> None:
        """The request's work against the server's bounds (400s), and the queue (429)."""
        c = self.config
        seqs = num_prompts * (samples_per_prompt or params.n)
        if seqs > c.max_sequences_per_request:
            raise bad_request(f"this request asks for {seqs} sequences (prompts x n); the limit "
                              f"is {c.max_sequences_per_request} (--max-sequences-per-request).",
                              "n")
        if len(params.stop) > c.max_stop_sequences:
            raise bad_request(f"at most {c.max_stop_sequences} stop sequences, got "
                              f"{len(params.stop)}.", "stop")
        if any(len(s) > c.max_stop_length for s in params.stop):
            raise bad_request(f"stop sequences must be at most {c.max_stop_length} characters.",
                              "stop")
        if len(params.stop_token_ids) > c.max_stop_sequences * 16:
            raise bad_request(f"at most {c.max_stop_sequences * 16} stop_token_ids, got "
                              f"{len(params.stop_token_ids)}.", "stop_token_ids")
        # sequences in flight beyond what one step runs are waiting: bounded, so a burst gets
        # a 429 to retry rather than an unbounded queue
        capacity = self.client.config.scheduler.max_num_seqs + c.max_waiting_requests
        if seqs > capacity:  # more than an empty queue takes: retrying cannot help
            raise bad_request(f"this request asks for {seqs} sequences; this server runs and "
                              f"queues at most {capacity} at a time.", "n")
        in_flight = self.client.num_sequences_in_flight()
        if seqs > capacity - in_flight:
            raise APIError(429, f"the server's queue is full ({in_flight} sequences in flight, "
                                f"--max-waiting-requests {c.max_waiting_requests}); retry "
                                "shortly.", type="rate_limit_exceeded", code="queue_full",
                           headers={"Retry-After": "1"})

    async def prepare(self, prompts: list[Any], params: SamplingParams,
                      add_special_tokens: bool, samples_per_prompt: Optional[int] = None
                      ) -> list[ProcessedPrompt]:
        """Tokenizes and checks every prompt before anything is generated (errors are 400s)."""
        if self.shutting_down:
            raise ShuttingDownError("the server is shutting down; retry on another replica or "
                                    "once it is back.")
        self.client.check_health()
        self.check_limits(params, len(prompts), samples_per_prompt)
        if self.config.cascade and (params.n > 1 or (samples_per_prompt or 1) > 1):
            raise bad_request("a cascade answers with one completion per prompt: n must be 1 "
                              "(and best_of unset).", "n")
        out = []
        for p in prompts:
            try:
                pp = await self.client.process_input_async(p, params, add_special_tokens)
            except ValueError as e:
                raise bad_request(str(e), _param_of(str(e))) from None
            n_prompt, n_out = len(pp.token_ids), pp.params.max_tokens or 0
            # (under KV eviction a request keeps a budget of KV: it may generate past it)
            if n_prompt + n_out > self.max_model_len and not self.kv_eviction:
                raise bad_request(
                    f"This model's maximum context length is {self.max_model_len} tokens. "
                    f"However, you requested {n_prompt + n_out} tokens ({n_prompt} in the "
                    f"prompt, {n_out} in the completion). Please reduce the length of the "
                    "prompt or max_tokens.", "max_tokens")
            out.append(pp)
        return out


_PARAM_NAMES = frozenset(f.name for f in dataclasses.fields(SamplingParams)) | {"prompt"}


def _param_of(message: str) -> Optional[str]:
    """The field a ValueError is about: SamplingParams and InputProcessor messages start with
    its name ('top_p must be ...', 'prompt token ids must be ...')."""
    if message.startswith("the prompt"):
        return "prompt"
    head = message.split(" ", 1)[0]
    return head if head in _PARAM_NAMES else None


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


# ---- requests the slo policy sheds -----------------------------------------------------------
SHED = "slo_unattainable"


def check_shed(ro: RequestOutput) -> None:
    """A 503 with Retry-After if the slo scheduling policy shed this request (it can no
    longer meet its time-to-first-token objective; the engine says when to retry)."""
    for out in ro.outputs:
        if out.finish_reason == SHED:
            retry = out.stop_reason if isinstance(out.stop_reason, int) else 1
            raise APIError(503, "The server cannot meet this request's time-to-first-token "
                                f"objective (ttft_slo_ms) under its current load; retry in "
                                f"{retry} s.", type="service_unavailable", code=SHED,
                           headers={"Retry-After": str(retry)})


async def first_outputs(gens: list[AsyncIterator[RequestOutput]],
                        seen: Optional[list] = None) -> list[AsyncIterator[RequestOutput]]:
    """Waits for every generator's first output, so a stream that the slo policy sheds
    answers 503 before any response header goes out. Returns generators that replay it (and
    appends the first outputs to ``seen``: what the response headers may say)."""
    firsts = await asyncio.gather(*(g.__anext__() for g in gens), return_exceptions=True)
    if seen is not None:
        seen.extend(f for f in firsts if isinstance(f, RequestOutput))
    try:
        for f in firsts:
            if isinstance(f, BaseException) and not isinstance(f, StopAsyncIteration):
                raise f
            if isinstance(f, RequestOutput):
                check_shed(f)
    except BaseException:
        for g in gens:
            await g.aclose()
        raise
    return [_replay(f, g) for f, g in zip(firsts, gens)]


async def _replay(first: Any, gen: AsyncIterator[T]) -> AsyncIterator[T]:
    try:
        if not isinstance(first, StopAsyncIteration):
            yield first
            async for item in gen:
                yield item
    finally:
        await gen.aclose()


# ---- running several generators ------------------------------------------------------------
async def merge_generators(gens: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of all generators as (index, item), in arrival order. Closing this iterator
    cancels the rest, which aborts their requests."""
    if len(gens) == 1:
        async with contextlib.aclosing(gens[0]) as g:
            async for item in g:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def drain(i: int, g: AsyncIterator[T]) -> None:
        try:
            async with contextlib.aclosing(g):
                async for item in g:
                    queue.put_nowait((i, item))
            queue.put_nowait((i, done))
        except Exception as e:
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(drain(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


# ---- streamed text ---------------------------------------------------------------------------
@dataclass
class ChoiceCursor:
    """How much of one output a stream has sent."""

    text: int = 0
    tokens: int = 0
    finished: bool = False
    started: bool = False  # a first chunk (role / echoed prompt) went out

    def advance(self, out: CompletionOutput, holdback: int) -> tuple[str, int, int]:
        """(new text, first new token, end token). While unfinished, the last ``holdback``
        characters wait: they may be the start of a stop string, which is never sent."""
        end = len(out.text) if out.finish_reason is not None else len(out.text) - holdback
        end = max(end, self.text)
        text, self.text = out.text[self.text:end], end
        t0, self.tokens = self.tokens, len(out.token_ids)
        if out.finish_reason is not None:
            self.finished = True
        return text, t0, self.tokens


def stop_holdback(params: SamplingParams) -> int:
    if not params.stop or params.include_stop_str_in_output:
        return 0
    return max(len(s) for s in params.stop) - 1


# ---- logprobs ----------------------------------------------------------------------------------
def clamp_logprob(x: float) -> float:
    return x if math.isfinite(x) and x > _MIN_LOGPROB else _MIN_LOGPROB


def _top(pos: PositionLogprobs, n: int) -> list[tuple[int, Logprob]]:
    ranked = sorted(pos.items(), key=lambda kv: (kv[1].rank or 0))
    return [(tid, lp) for tid, lp in ranked if lp.rank is not None and lp.rank <= n][:n]


def completion_logprobs(token_ids: list[int], positions: list[Optional[PositionLogprobs]], n: int,
                        offset: int, decode: Any) -> dict:
    """The legacy /v1/completions shape: tokens, token_logprobs, top_logprobs, text_offset.
    A position of None (the first prompt token) has no logprob."""
    tokens, lps, tops, offsets = [], [], [], []
    for tid, pos in zip(token_ids, positions):
        entry = pos.get(tid) if pos else None
        s = entry.decoded_token if entry is not None else None
        s = s if s is not None else decode(tid)
        tokens.append(s)
        offsets.append(offset)
        offset += len(s)
        if pos is None or entry is None:
            lps.append(None)
            tops.append(None)
            continue
        lps.append(clamp_logprob(entry.logprob))
        # keyed by text: where tokens decode alike (byte pieces as "\ufffd"), the best one's
        # logprob stands for the text (ranked best first; a later one does not overwrite it)
        top: dict[str, float] = {}
        for t, lp in _top(pos, n):
            top.setdefault(lp.decoded_token if lp.decoded_token is not None else decode(t),
                           clamp_logprob(lp.logprob))
        top.setdefault(s, clamp_logprob(entry.logprob))  # the sampled token, as vLLM does
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def prompt_logprobs_json(token_ids: list[int], positions: list[Optional[PositionLogprobs]],
                         n: int, decode: Any) -> list[Optional[dict]]:
    """vLLM's ``prompt_logprobs`` shape: per prompt position None (the first) or {token id:
    {logprob, rank, decoded_token}} for the prompt's own token and the ``n`` most likely."""
    out: list[Optional[dict]] = []
    for tid, pos in zip(token_ids, positions):
        if pos is None:
            out.append(None)
            continue
        keep = dict(_top(pos, n))
        if tid in pos:
            keep[tid] = pos[tid]
        out.append({str(t): {"logprob": clamp_logprob(lp.logprob), "rank": lp.rank,
                             "decoded_token": lp.decoded_token if lp.decoded_token is not None
                             else decode(t)} for t, lp in keep.items()})
    return out


def chat_logprobs(token_ids: list[int], positions: list[PositionLogprobs], n: int,
                  decode: Any) -> list[dict]:
    """The /v1/chat/completions ``logprobs.content`` list."""
    def item(tid: int, lp: Logprob) -> dict:
        s = lp.decoded_token if lp.decoded_token is not None else decode(tid)
        return {"token": s, "logprob": clamp_logprob(lp.logprob),
                "bytes": list(s.encode("utf-8", "replace"))}

    content = []
    for tid, pos in zip(token_ids, positions):
        entry = pos.get(tid) or Logprob(float("-inf"))
        top = [item(t, lp) for t, lp in _top(pos, n)]
        content.append({**item(tid, entry), "top_logprobs": top})
    return content


def cascade_tokens(ro: RequestOutput) -> tuple[int, int]:
    """(prompt, completion) tokens a cascade's small model spent on a request the large model
    answered (usage counts both models' work); (0, 0) otherwise."""
    c = ro.cascade
    return (c.small_prompt_tokens, c.small_completion_tokens) if c is not None else (0, 0)


def cascade_header(outputs: list[Any]) -> dict[str, str]:
    """The response header naming the model of a cascade that answered each prompt (in order),
    when these outputs come from one; none otherwise."""
    models = [ro.cascade.model for ro in outputs if ro is not None and ro.cascade is not None]
    return {"x-servelm-cascade-model": ",".join(models)} if models else {}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


# ---- JSON and SSE ------------------------------------------------------------------------------
def dumps(obj: Any) -> str:
    """Compact JSON; text that cannot be UTF-8 (a lone surrogate echoed from input) is escaped."""
    s = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False)


def sse(obj: Any) -> str:
    return f"data: {dumps(obj)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def stream_error(e: Exception) -> str:
    """An error after a stream has started: an error event, as vLLM sends it."""
    if isinstance(e, APIError):
        err = e
    elif isinstance(e, EngineDeadError):
        err = APIError(503, str(e), type="service_unavailable", code="engine_dead")
    elif isinstance(e, ShuttingDownError):
        err = APIError(503, str(e), type="service_unavailable", code="server_shutting_down")
    elif isinstance(e, ValueError):
        err = APIError(400, str(e))
    else:
        err = APIError(500, f"internal error: {type(e).__name__}", type="server_error")
    return sse(err.body())
