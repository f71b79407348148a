"""The read-only parts of the API that clients and tools rely on besides generation: model
cards (``GET /v1/models``, ``GET /v1/models/{id}``), vLLM's ``GET /tokenizer_info`` (what
lm-eval's remote tokenizer reads), request-body schemas in ``/openapi.json`` (the handlers
read raw JSON, so FastAPI cannot see them) and a ``/docs`` page with no external assets.
"""
from __future__ import annotations

from importlib import resources
from typing import Any, Callable, Optional

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from pydantic import BaseModel

from servelm.server.protocol import (APIError, ChatCompletionRequest, CompletionRequest,
                                     DetokenizeRequest, LoadLoRAAdapterRequest, TokenizeRequest,
                                     UnloadLoRAAdapterRequest, bad_request)
from servelm.server.serving import dumps

# the POST routes and the model each one parses its body with
REQUEST_BODIES: tuple[tuple[str, type[BaseModel]], ...] = (
    ("/v1/completions", CompletionRequest), ("/v1/chat/completions", ChatCompletionRequest),
    ("/tokenize", TokenizeRequest), ("/detokenize", DetokenizeRequest),
    ("/v1/load_lora_adapter", LoadLoRAAdapterRequest),
    ("/v1/unload_lora_adapter", UnloadLoRAAdapterRequest))
# tokenizer settings that are paths on this machine (vLLM drops the first two only)
_PATH_KEYS = ("vocab_file", "merges_file", "tokenizer_file", "name_or_path",
              "special_tokens_map_file", "is_local", "local_files_only")
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
# the page runs its inline script and talks to this server only
_DOCS_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                 "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                                            "style-src 'unsafe-inline'; connect-src 'self'; "
                                            "frame-ancestors 'none'; base-uri 'none'"}


def model_card(name: str, root: str, created: int, max_model_len: int,
               parent: Optional[str] = None) -> dict:
    """One entry of /v1/models. ``root`` is the served name the aliases share, never the
    checkpoint's path on this machine; ``parent`` a LoRA adapter's base model."""
    return {"id": name, "object": "model", "created": created, "owned_by": "servelm",
            "root": root, "parent": parent, "max_model_len": max_model_len}


def tokenizer_info(tokenizer: Any, max_model_len: int) -> dict:
    """vLLM's /tokenizer_info: the tokenizer's settings (``init_kwargs``) with tokens as plain
    strings, ``tokenizer_class``, the chat template in use, the special tokens, and
    ``model_max_length`` capped at the server's context (the longest prompt + output it
    takes). Paths on this machine are left out."""
    info = {k: _plain(v) for k, v in (getattr(tokenizer, "init_kwargs", None) or {}).items()
            if k not in _PATH_KEYS}
    for name in _SPECIAL_TOKENS:
        info[name] = _plain(getattr(tokenizer, name, None))
    info["tokenizer_class"] = type(tokenizer).__name__
    info.pop("chat_template", None)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        info["chat_template"] = template
    own = info.get("model_max_length")
    info["model_max_length"] = (min(own, max_model_len) if isinstance(own, int) and own > 0
                                else max_model_len)
    return info


def _plain(obj: Any) -> Any:
    """JSON-able: AddedToken -> its text, int keys -> strings, anything else odd -> str."""
    if hasattr(obj, "content") and isinstance(obj.content, str):
        return obj.content
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def add_surface_routes(app: FastAPI, v1: APIRouter, created: int,
                       served_names: tuple[str, ...], check_api_key: Any = None) -> None:
    """Registers /v1/models/{id} on ``v1`` (before the app includes it), /tokenizer_info and
    /docs on ``app``, and the OpenAPI generator that adds the request bodies."""

    @v1.get("/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> Response:
        if model_id not in served_names:
            raise APIError(404, f"The model `{model_id}` does not exist; this server serves "
                                f"{list(served_names)}.", param="model",
                           code="model_not_found")
        s = request.app.state.serving
        return _json(model_card(model_id, served_names[0], created, s.max_model_len))

    @app.get("/tokenizer_info",
             dependencies=[Depends(check_api_key)] if check_api_key is not None else [])
    async def get_tokenizer_info(request: Request) -> Response:
        s = request.app.state.serving
        tok = s.client.tokenizer
        if tok is None:
            raise bad_request("this server has no tokenizer (--skip-tokenizer-init).")
        return _json(tokenizer_info(tok, s.max_model_len))

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        body = resources.files("servelm.server").joinpath("static", "docs.html").read_bytes()
        return Response(body, media_type="text/html; charset=utf-8", headers=_DOCS_HEADERS)

    app.openapi = _openapi_with_bodies(app, REQUEST_BODIES)  # type: ignore[method-assign]


def _openapi_with_bodies(app: FastAPI, bodies: tuple[tuple[str, type[BaseModel]], ...]
                         ) -> Callable[[], dict]:
    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                             description="OpenAI-compatible API of servelm.")
        add_request_bodies(schema, bodies)
        document_responses(schema)
        app.openapi_schema = schema
        return schema
    return openapi


def add_request_bodies(schema: dict, bodies: tuple[tuple[str, type[BaseModel]], ...]) -> None:
    """Gives each listed POST operation of ``schema`` its JSON body (the pydantic model's
    schema, shared definitions under components) and the error shape of its 4xx answers."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["ErrorResponse"] = _error_schema()
    error = {"content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    # FastAPI documents a 422 for path parameters; api.py answers validation errors with 400
    for ops in schema.get("paths", {}).values():
        for op in ops.values():
            if op.get("responses", {}).pop("422", None) is not None:
                op["responses"]["400"] = {"description": "invalid request", **error}
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path, model in bodies:
        op: Optional[dict] = schema.get("paths", {}).get(path, {}).get("post")
        if op is None:
            continue
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(js.pop("$defs", {}))
        components[model.__name__] = js
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        op.setdefault("responses", {}).update(
            {"400": {"description": "invalid request", **error},
             "404": {"description": "unknown model", **error}})


# statuses any route may answer with an error body (API key, unknown route or model, engine
# down or shutting down), and those of routes that take a body (bad, too large, not JSON,
# queue full)
_ANY_ERRORS = {"401": "missing or wrong API key", "404": "not found",
               "503": "engine not running, or the server is shutting down"}
_BODY_ERRORS = {"400": "invalid request", "413": "body too large",
                "415": "body not sent as application/json", "429": "queue full"}
# routes whose 200 is not JSON
_NOT_JSON = {"/metrics": {"text/plain": {"schema": {"type": "string"}}}, "/health": None}


def document_responses(schema: dict) -> None:
    """Every status the server answers with, on every operation (so a schema-driven client
    or fuzzer finds none undocumented), and the real content types of /metrics and /health."""
    error = {"content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            extra = dict(_ANY_ERRORS)
            if method == "post":
                extra.update(_BODY_ERRORS)
            for status, what in extra.items():
                responses.setdefault(status, {"description": what, **error})
            if path in _NOT_JSON and "200" in responses:
                content = _NOT_JSON[path]
                responses["200"] = ({"description": "OK", "content": content} if content
                                    else {"description": "OK (no body)"})


def _error_schema() -> dict:
    """OpenAI's error shape, as protocol.APIError.body() writes it."""
    nullable = {"type": ["string", "null"]}
    return {"type": "object", "required": ["error"], "title": "ErrorResponse",
            "properties": {"error": {
                "type": "object", "required": ["message", "type", "param", "code"],
                "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                               "param": nullable, "code": nullable}}}}


def _json(body: Any) -> Response:
    return Response(dumps(body), media_type="application/json")
