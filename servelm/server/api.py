"""The FastAPI app: routes, body parsing with limits, API keys, errors in OpenAI's shape.

``build_app(engine_config, server_config)`` starts the engine core process in the app's
lifespan and stops it on shutdown; all state hangs off the app (no module-level state).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Optional, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from servelm import __version__
from servelm.config import EngineConfig
from servelm.engine.async_client import (AsyncEngineClient, EngineDeadError, RequestError,
                                        ShuttingDownError)
from servelm.engine.core_launcher import CoreLauncher
from servelm.engine.core_proc import release_free_memory
from servelm.engine.dp_client import start_client
from servelm.server.dashboard import add_dashboard
from servelm.server.json_body import (BodyShape, BodyShapeError, StringScan, loads_in_slices,
                                      reject_constant, shape_for)
from servelm.server.metrics import CONTENT_TYPE, ServerMetrics
from servelm.server.protocol import (APIError, ChatCompletionRequest, CompletionRequest,
                                     DetokenizeRequest, LoadLoRAAdapterRequest, TokenizeRequest,
                                     UnloadLoRAAdapterRequest, bad_request, validation_error)
from servelm.server.request_fields import refuse_unsupported
from servelm.server.recovery import EngineRecovery
from servelm.server.serve_settings import set_chat_template
from servelm.server.serving import OpenAIServing, ServerConfig, dumps
from servelm.server.serving_chat import create_chat_completion, render_chat
from servelm.server.serving_completion import create_completion
from servelm.server.surface import add_surface_routes, model_card

logger = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)


def json_response(body: Any, status: int = 200,
                  headers: Optional[dict[str, str]] = None) -> Response:
    return Response(dumps(body), status_code=status, media_type="application/json",
                    headers=headers)


class SSEResponse(StreamingResponse):
    """Closes its iterator however the stream ends (disconnect, cancellation), so the request
    is aborted in the engine at once rather than when the generator is garbage-collected."""

    media_type = "text/event-stream"

    async def stream_response(self, send: Any) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


# ---- request bodies ------------------------------------------------------------------------
_BIG_BODY = 1 << 20  # bytes of JSON parsed in slices (json_body.py) rather than at once
_TRIM_AFTER_S = 2.0


# JSON spells a character in at most 12 bytes (a surrogate pair of \uXXXX escapes), and no
# string under this is refused unparsed (a grammar or a schema may be long where the model's
# context is short)
_JSON_BYTES_PER_CHAR = 12
_MIN_STRING_BOUND = 1 << 20


async def read_json(request: Request, limit: int,
                    max_text_chars: Optional[Callable[[], int]] = None,
                    shape: Optional[BodyShape] = None) -> dict:
    """The body as a JSON object: 415 unless declared as JSON (a browser page cannot then post
    cross-site without a CORS preflight), 413 past ``limit`` bytes (declared or streamed), 400
    if it is not strict JSON (NaN/Infinity refused) or not an object. ``max_text_chars``: the
    most characters a prompt can have; a big body holding a string that must be longer is
    refused (400) before it is parsed, which would hold the event loop's GIL for tens of ms.
    A body over 1 MiB is parsed in slices, and refused past ``shape`` (json_body.py)."""
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype != "application/json":
        raise APIError(415, f"the request body must be JSON, sent with 'Content-Type: "
                            f"application/json' (got {ctype or 'no Content-Type'!r}).",
                       code="unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body ({declared} bytes) exceeds the limit of {limit} "
                            "bytes.", code="request_too_large")
    # chunks joined once at the end (a growing bytearray re-copies itself as it doubles; one
    # sized from Content-Length would commit memory before any byte arrives)
    chunks, n = [], 0
    # past 1 MiB the strings are measured as the body arrives: one longer than any prompt is
    # refused at once, before the rest is read (uvicorn drops what the client still sends)
    scan: Optional[StringScan] = None
    bound = 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise APIError(413, f"the request body exceeds the limit of {limit} bytes.",
                           code="request_too_large")
        chunks.append(chunk)
        if max_text_chars is None or n <= _BIG_BODY:
            continue
        if scan is None:
            scan, bound = StringScan(), max(_JSON_BYTES_PER_CHAR * max_text_chars(),
                                            _MIN_STRING_BOUND)
            for c in chunks:
                scan.feed(c)
        else:
            scan.feed(chunk)
        if not scan.gave_up and scan.longest > bound:
            del chunks
            asyncio.get_running_loop().call_later(_TRIM_AFTER_S, release_free_memory)
            raise bad_request(
                f"the request body holds a string of over {scan.longest} bytes: longer than "
                f"any prompt the model's context can hold (at most {max_text_chars()} "
                "characters); shorten the prompt.")
    buf = b"".join(chunks)
    del chunks
    # (strip() would copy a big body; an all-whitespace big one fails to parse instead)
    if len(buf) < 4096 and not buf.strip():
        raise bad_request("the request body is empty: send a JSON object.")
    try:
        if len(buf) > _BIG_BODY:  # in slices: other requests keep moving, and bounded
            # once the request is done with it, its memory goes back to the OS (malloc keeps
            # freed heap pages otherwise: +30 to +60 MB of RSS after a 10 MB body)
            asyncio.get_running_loop().call_later(_TRIM_AFTER_S, release_free_memory)
            obj = await loads_in_slices(buf, shape or BodyShape())
        else:
            obj = json.loads(buf, parse_constant=reject_constant)
    except BodyShapeError as e:
        raise bad_request(str(e), e.param) from None
    except (ValueError, RecursionError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(obj).__name__}.")
    return obj


async def parse(request: Request, model: type[M], limit: int,
                max_text_chars: Optional[Callable[[], int]] = None,
                shape: Optional[BodyShape] = None) -> M:
    obj = await read_json(request, limit, max_text_chars, shape)
    refuse_unsupported(model, obj)  # fields that would change the meaning: 400, not ignored
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from None


async def cancel_on_disconnect(request: Request, coro: Any) -> Any:
    """Runs ``coro``; if the client disconnects first, cancels it (aborting its requests)."""
    task = asyncio.ensure_future(coro)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        return Response(status_code=499)  # nobody is listening
    return task.result()


def _respond(result: Any) -> Response:
    """A handler's result: a response already, a JSON body, or an SSE stream of strings (with
    headers of its own: a (stream, headers) pair)."""
    if isinstance(result, Response):
        return result
    if isinstance(result, dict):
        return json_response(result)
    stream, headers = result if isinstance(result, tuple) else (result, {})
    return SSEResponse(stream, headers={"Cache-Control": "no-cache", **headers})


# ---- the app -------------------------------------------------------------------------------
def build_app(engine_config: EngineConfig, server_config: ServerConfig,
              client: Optional[AsyncEngineClient] = None,
              cascade: Optional[tuple[EngineConfig, Any]] = None,
              launcher: Optional[CoreLauncher] = None) -> FastAPI:
    """The app; it starts its own engine client unless one is given (then the caller owns it).
    ``cascade``: (the small model's engine config, a cascade.CascadeConfig): the app serves a
    cascade of it and ``engine_config``'s model (the large one). ``launcher``: a core process
    pre-started for the first engine core this app starts (core_launcher.py)."""
    metrics = ServerMetrics(server_config.served_model_names[0])
    limit = server_config.max_body_bytes
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if client is None and cascade is not None:
            from servelm.cascade.client import CascadeClient
            # both cores start at once (each loads its own model)
            started = await asyncio.gather(
                start_client(cascade[0], listener=metrics, launcher=launcher),
                start_client(engine_config, listener=metrics), return_exceptions=True)
            failed = [r for r in started if isinstance(r, BaseException)]
            if failed:
                await asyncio.gather(*(r.shutdown() for r in started
                                       if not isinstance(r, BaseException)))
                raise failed[0]
            c = CascadeClient(started[0], started[1], cascade[1])
        else:
            c = client or await start_client(engine_config, listener=metrics,
                                             launcher=launcher)
        set_chat_template(c.tokenizer, server_config.chat_template)  # --chat-template
        app.state.serving = OpenAIServing(c, server_config)
        for name, path in server_config.lora_modules:  # --lora-modules: refused ones stop the start
            try:
                await app.state.serving.load_lora(name, path)
            except APIError as e:
                raise ValueError(f"--lora-modules {name}={path}: {e.message}") from None
        inputs = getattr(c, "inputs", None)
        if inputs is not None and getattr(inputs, "tokenizer", None) is not None:
            # the longest vocabulary string, which refusing a huge body needs: read now, not
            # on the event loop when the first one arrives (a 256k vocabulary takes a while)
            await asyncio.to_thread(inputs.max_text_chars)
        if client is None:  # cores this app started: it restarts them, or exits, if one dies
            EngineRecovery(app, engine_config, metrics,
                           server_config.on_engine_failure).attach(c)
        logger.warning("servelm: ready, serving %s", ", ".join(server_config.served_model_names))
        try:
            yield
        finally:
            if client is None:
                await app.state.serving.client.shutdown()  # the current one (restarts)

    # FastAPI's own /docs and /redoc load their scripts from a CDN: surface.py serves /docs
    app = FastAPI(title="servelm", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None)
    _add_error_handlers(app)

    def serving(request: Request) -> OpenAIServing:
        return request.app.state.serving

    def _text_bound(request: Request) -> Optional[Callable[[], int]]:
        """The longest prompt text the engine could take (characters), for refusing a huge
        body before it is parsed; None without a tokenizer."""
        inputs = getattr(serving(request).client, "inputs", None)
        if inputs is None or getattr(inputs, "tokenizer", None) is None:
            return None
        return inputs.max_text_chars

    def _shape(request: Request) -> BodyShape:
        return shape_for(serving(request).max_model_len,
                         server_config.max_sequences_per_request, engine_config.model.vocab_size)

    async def check_api_key(request: Request) -> None:
        key = server_config.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 key.encode()):
            raise APIError(401, "invalid or missing API key: send the header "
                                "'Authorization: Bearer <key>'.", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])
    add_dashboard(app, check_api_key)  # /dashboard: the page is open, its data needs the key
    add_surface_routes(app, v1, created, server_config.served_model_names, check_api_key)

    @app.get("/health")
    async def health(request: Request) -> Response:
        if serving(request).client.is_healthy:
            return Response(status_code=200)
        return json_response(APIError(503, "the engine is not running.",
                                      type="service_unavailable").body(), 503)

    # with --api-key every route needs it except /health and the static pages (/docs,
    # /dashboard and its assets, /openapi.json: no data); --metrics-without-api-key leaves
    # /metrics to a scraper that cannot send headers
    keyed = [Depends(check_api_key)]

    @app.get("/version", dependencies=keyed)
    async def version() -> Response:
        return json_response({"version": __version__})

    @app.get("/metrics", dependencies=[] if server_config.metrics_without_api_key else keyed)
    async def prometheus(request: Request) -> Response:
        stats = await serving(request).client.get_stats()
        return Response(metrics.render(stats), media_type=CONTENT_TYPE)

    @v1.get("/models")
    async def models(request: Request) -> Response:
        s = serving(request)
        names = server_config.served_model_names
        data = [model_card(name, names[0], created, s.max_model_len) for name in names]
        data += [model_card(name, name, created, s.max_model_len, parent=names[0])
                 for name in s.loras]
        return json_response({"object": "list", "data": data})

    @v1.post("/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        req = await parse(request, LoadLoRAAdapterRequest, limit)
        await serving(request).load_lora(req.lora_name, req.lora_path)
        return Response(f"Success: LoRA adapter '{req.lora_name}' added successfully.",
                        media_type="text/plain")

    @v1.post("/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        req = await parse(request, UnloadLoRAAdapterRequest, limit)
        serving(request).unload_lora(req.lora_name, req.lora_int_id)
        return Response(f"Success: LoRA adapter '{req.lora_name}' removed successfully.",
                        media_type="text/plain")

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        req = await parse(request, CompletionRequest, limit, _text_bound(request),
                          _shape(request))
        return _respond(await cancel_on_disconnect(request, create_completion(serving(request),
                                                                              req)))

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await parse(request, ChatCompletionRequest, limit, _text_bound(request),
                          _shape(request))
        return _respond(await cancel_on_disconnect(request, create_chat_completion(
            serving(request), req)))

    @app.post("/tokenize", dependencies=keyed)
    async def tokenize(request: Request) -> Response:
        # (no text bound: /tokenize counts the tokens of texts of any length)
        req = await parse(request, TokenizeRequest, limit, shape=_shape(request))
        s = serving(request)
        s.check_model(req.model)
        tok = s.client.tokenizer
        if tok is None:
            raise bad_request("this server has no tokenizer (--skip-tokenizer-init).")
        if req.messages is not None:
            text = await s.client.run_in_tokenizer_thread(
                render_chat, tok, req.messages, req.add_generation_prompt is not False,
                bool(req.continue_final_message), req.chat_template_kwargs)
            special = bool(req.add_special_tokens)
        elif req.prompt is not None:
            text, special = req.prompt, req.add_special_tokens is not False
        else:
            raise bad_request("send either 'prompt' or 'messages'.", "prompt")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise bad_request("the prompt has a lone UTF-16 surrogate: send valid Unicode.",
                              "prompt") from None
        ids = await s.client.encode_async(text, special)
        strs = tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return json_response({"count": len(ids), "max_model_len": s.max_model_len,
                              "tokens": ids, "token_strs": strs})

    @app.post("/detokenize", dependencies=keyed)
    async def detokenize(request: Request) -> Response:
        req = await parse(request, DetokenizeRequest, limit)
        s = serving(request)
        s.check_model(req.model)
        tok, vocab = s.client.tokenizer, engine_config.model.vocab_size
        if tok is None:
            raise bad_request("this server has no tokenizer (--skip-tokenizer-init).")
        if any(not 0 <= t < vocab for t in req.tokens):
            raise bad_request(f"tokens must be token ids in [0, {vocab}).", "tokens")
        text = await s.client.run_in_tokenizer_thread(lambda: tok.decode(req.tokens))
        return json_response({"prompt": text})

    app.include_router(v1)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> Response:
        return json_response(e.body(), e.status, e.headers)

    @app.exception_handler(RequestError)
    async def request_error(_: Request, e: RequestError) -> Response:
        return json_response(APIError(400, str(e)).body(), 400)

    @app.exception_handler(ShuttingDownError)
    async def shutting_down(_: Request, e: ShuttingDownError) -> Response:
        return json_response(APIError(503, str(e), type="service_unavailable",
                                      code="server_shutting_down").body(), 503,
                             {"Retry-After": "5", "Connection": "close"})

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, e: EngineDeadError) -> Response:
        return json_response(APIError(503, str(e), type="service_unavailable",
                                      code="engine_dead").body(), 503)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> Response:
        err = validation_error(list(e.errors()))
        return json_response(err.body(), err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> Response:
        # a 405 keeps Starlette's Allow header (the methods the route takes)
        return json_response(APIError(e.status_code, str(e.detail),
                                      code=None if e.status_code != 404 else "not_found").body(),
                             e.status_code, getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal(_: Request, e: Exception) -> Response:
        logger.exception("internal error")
        return json_response(APIError(500, f"internal server error: {type(e).__name__}",
                                      type="server_error").body(), 500)
