"""`servelm serve [MODEL]`: the OpenAI-compatible server (uvicorn + FastAPI).

Every engine flag of EngineArgs is accepted, plus the server's own; ``--config x.yaml`` gives
any of them as YAML keys (``max-model-len`` or ``max_model_len``), and flags given on the
command line win over the file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from typing import Any, Optional

SERVE_HELP = "start the OpenAI-compatible API server"


class _NoDefaults:
    """Adds arguments to a parser with default=SUPPRESS: flags left out of the command line
    stay absent from the namespace, so they can be told from explicit ones."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser

    def add_argument(self, *args: Any, **kw: Any) -> argparse.Action:
        return self.parser.add_argument(*args, **{**kw, "default": argparse.SUPPRESS})


def _add_serve_args(p: Any) -> None:
    from servelm.config import EngineArgs
    from servelm.server.tool_parsers import TOOL_PARSERS
    EngineArgs.add_cli_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health and "
                        "the static pages (default: $SERVELM_API_KEY if set)")
    p.add_argument("--max-sequences-per-request", type=int, default=1024,
                   help="sequences one request may ask for: prompts x n (x best_of); 400 above")
    p.add_argument("--max-stop-sequences", type=int, default=64,
                   help="stop strings per request (and 16x as many stop_token_ids); 400 above")
    p.add_argument("--max-stop-length", type=int, default=1024,
                   help="characters per stop string; 400 above")
    p.add_argument("--max-waiting-requests", type=int, default=4096,
                   help="sequences queued beyond the running batch; 429 with Retry-After above")
    p.add_argument("--on-engine-failure", default="restart", choices=["restart", "exit"],
                   help="when the engine core process dies (requests in flight fail with 503): "
                        "restart it (more than 3 deaths in 10 minutes: exit), or exit with "
                        "status 1 for a supervisor to restart the server")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds requests in flight get to finish on SIGTERM / Ctrl-C; those "
                        "still running then end with a 503 (streams: an error event, [DONE])")
    p.add_argument("--metrics-without-api-key", action="store_true", default=False,
                   help="leave /metrics open (for a Prometheus scraper) when --api-key is set")
    p.add_argument("--default-ttft-slo-ms", type=float, default=None,
                   help="time-to-first-token objective of requests that set no ttft_slo_ms "
                        "(the slo scheduling policy orders and sheds by it)")
    p.add_argument("--default-tpot-slo-ms", type=float, default=None,
                   help="time-per-output-token objective of requests that set no tpot_slo_ms")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) the API answers to (default: the model argument)")
    p.add_argument("--cascade", nargs=2, metavar=("SMALL", "LARGE"), default=None,
                   help="serve a cascade: every request answered by SMALL first, and again by "
                        "LARGE when SMALL's answer is unsure (give no model argument); "
                        "both models take the engine flags, share LARGE's tokenizer, and on a "
                        "GPU split --gpu-memory-utilization in halves")
    p.add_argument("--cascade-threshold", type=float, default=None,
                   help="SMALL's answer stands when its confidence is at least this "
                        "(default 0.5)")
    p.add_argument("--cascade-criterion", default=None, choices=["mean_prob", "min_prob"],
                   help="the confidence: the geometric mean of SMALL's sampled tokens' "
                        "probabilities, or the least of them")
    p.add_argument("--cascade-name", default=None,
                   help="the name the cascade is served under (/v1/models; default cascade)")
    p.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                   help="LoRA adapters (PEFT directories) served from the start as models "
                        "NAME (with --enable-lora); also as JSON: "
                        "'{\"name\": NAME, \"path\": PATH}'")
    p.add_argument("--max-request-bytes", type=int, default=32 << 20,
                   help="largest request body accepted (413 above)")
    p.add_argument("--uvicorn-log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    p.add_argument("--config", default=None, help="YAML file of flags (CLI flags override it)")
    p.add_argument("--model", dest="model_flag", metavar="MODEL", default=None,
                   help="the model, as the positional argument (vLLM's spelling; giving both "
                        "with different values is an error)")
    p.add_argument("--chat-template", default=None,
                   help="chat template replacing the tokenizer's: a file, or the Jinja text "
                        "itself (used by chat completions, /tokenize and /tokenizer_info)")
    p.add_argument("--generation-config", default="auto",
                   help="sampling defaults (temperature, top_p, top_k, min_p, "
                        "repetition_penalty) for fields a request leaves unset, and a cap on "
                        "output tokens (max_new_tokens): 'auto' reads the model directory's "
                        "generation_config.json if it has one, 'vllm' ignores it, or a folder "
                        "holding one")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="let the model call tools on its own (tool_choice 'auto'); needs "
                        "--tool-call-parser")
    p.add_argument("--tool-call-parser", default=None, choices=list(TOOL_PARSERS),
                   help="how tool calls are read out of the model's text")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="accepted for vLLM compatibility; no effect: servelm runs no code "
                        "from model folders")
    p.add_argument("--disable-log-requests", action="store_true",
                   help="accepted for vLLM compatibility; no effect: servelm does not log "
                        "requests")
    p.add_argument("--enable-tokenizer-info-endpoint", action="store_true",
                   help="accepted for vLLM compatibility; no effect: GET /tokenizer_info is "
                        "always served (lm-eval's remote tokenizer reads it)")


def _serve_defaults() -> dict[str, Any]:
    twin = argparse.ArgumentParser(add_help=False)
    _add_serve_args(twin)
    return vars(twin.parse_args([]))


def add_serve_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help=SERVE_HELP, description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_serve_args(_NoDefaults(p))  # main_serve layers: defaults < --config YAML < command line
    p.set_defaults(func=main_serve)
    return p


def resolve_serve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Defaults, then the YAML file of ``--config``, then the flags given on the command line."""
    defaults = _serve_defaults()
    given = {k: v for k, v in vars(args).items() if k in defaults}
    flag = given.pop("model_flag", None)
    if flag is not None:
        if given.get("model") not in (None, flag):
            raise ValueError(f"the model is given twice, as {given['model']!r} and --model "
                             f"{flag!r}: give one.")
        given["model"] = flag
    merged = dict(defaults)
    path = given.get("config")
    if path:
        merged.update(load_yaml_config(path, set(defaults) - {"model_flag"}))
    merged.update(given)
    merged.pop("model_flag")
    return argparse.Namespace(**merged)


def load_yaml_config(path: str, allowed: set[str]) -> dict[str, Any]:
    import yaml
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ValueError(f"cannot read --config {path!r}: {e.strerror}.") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path!r} must be a mapping of flag names to values.")
    out = {}
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in allowed or name == "config":
            raise ValueError(f"--config {path!r}: unknown key {key!r}; use flag names such as "
                             "'max-model-len' or 'port'.")
        out[name] = value
    return out


def parse_lora_modules(items: Optional[list[str]]) -> tuple[tuple[str, str], ...]:
    """--lora-modules entries (NAME=PATH, or vLLM's JSON form {"name", "path"}) ->
    ((name, path), ...); ValueError for a malformed one or a repeated name."""
    out: list[tuple[str, str]] = []
    for item in items or ():
        if item.lstrip().startswith("{"):
            try:
                d = json.loads(item)
            except json.JSONDecodeError as e:
                raise ValueError(f"--lora-modules {item!r}: not valid JSON ({e}).") from None
            if not isinstance(d, dict) or not isinstance(d.get("name"), str) \
                    or not isinstance(d.get("path"), str):
                raise ValueError(f"--lora-modules {item!r}: JSON entries need string 'name' "
                                 "and 'path'.")
            unknown = set(d) - {"name", "path"}
            if unknown:
                raise ValueError(f"--lora-modules {item!r}: unknown keys {sorted(unknown)}.")
            name, path = d["name"], d["path"]
        else:
            name, sep, path = item.partition("=")
            if not sep:
                raise ValueError(f"--lora-modules {item!r}: expected NAME=PATH.")
        if not name or not path:
            raise ValueError(f"--lora-modules {item!r}: the name and the path must be non-empty.")
        if any(name == n for n, _ in out):
            raise ValueError(f"--lora-modules names {name!r} twice.")
        out.append((name, path))
    return tuple(out)


def default_model_name(model: str | None) -> str:
    if model is None:
        from servelm.loader.default_model import DEFAULT_MODEL_FILE
        return DEFAULT_MODEL_FILE.split(".")[0]  # SmolLM2-135M-Instruct
    return model


def main_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from servelm.server.api import build_app
    except ImportError as e:
        raise ValueError(f"`servelm serve` needs the server dependencies (missing: {e.name}); "
                         "install them with `pip install 'servelm[server]'`.") from None
    from servelm.config import EngineArgs
    from servelm.server.serve_settings import load_chat_template, load_generation_defaults
    from servelm.server.serving import ServerConfig
    from servelm.server.tool_parsers import TOOL_PARSERS

    ns = resolve_serve_args(args)
    parsers = ", ".join(TOOL_PARSERS)
    if ns.tool_call_parser is not None and ns.tool_call_parser not in TOOL_PARSERS:
        raise ValueError(f"--tool-call-parser must be one of {parsers}, got "
                         f"{ns.tool_call_parser!r}.")  # a YAML --config skips argparse's check
    if ns.enable_auto_tool_choice and ns.tool_call_parser is None:
        raise ValueError(f"--enable-auto-tool-choice needs --tool-call-parser (one of {parsers}).")
    chat_template = load_chat_template(ns.chat_template)
    cascade = None
    given = [f for f, v in (("--cascade-threshold", ns.cascade_threshold),
                            ("--cascade-criterion", ns.cascade_criterion),
                            ("--cascade-name", ns.cascade_name)) if v is not None]
    if given and not ns.cascade:
        raise ValueError(f"{', '.join(given)} need --cascade SMALL LARGE.")
    if ns.cascade:
        from servelm.cascade import CascadeConfig
        if ns.model is not None:
            raise ValueError("--cascade SMALL LARGE names the models: give no model argument.")
        cascade_cfg = CascadeConfig(0.5 if ns.cascade_threshold is None else ns.cascade_threshold,
                                    ns.cascade_criterion or "mean_prob")
        ea = EngineArgs.from_cli_args(ns)
        if ea.device not in ("cpu",) and not ea.device.startswith("cpu"):
            ea = dataclasses.replace(ea, gpu_memory_utilization=ea.gpu_memory_utilization / 2)
        small_cfg = dataclasses.replace(ea, model=ns.cascade[0]).create_engine_config()
        engine_config = dataclasses.replace(ea, model=ns.cascade[1]).create_engine_config()
        if small_cfg.model.vocab_size != engine_config.model.vocab_size:
            raise ValueError(f"--cascade models must share a vocabulary: {ns.cascade[0]} has "
                             f"{small_cfg.model.vocab_size} tokens, {ns.cascade[1]} "
                             f"{engine_config.model.vocab_size}.")
        cascade = (small_cfg, cascade_cfg)
    else:
        engine_config = EngineArgs.from_cli_args(ns).create_engine_config()
    sampling_defaults = load_generation_defaults(str(ns.generation_config),
                                                 engine_config.model.model)
    names = ns.served_model_name or [(ns.cascade_name or "cascade") if ns.cascade
                                     else default_model_name(ns.model)]
    if isinstance(names, str):
        names = [names]
    if ns.max_request_bytes < 1:
        raise ValueError("--max-request-bytes must be >= 1.")
    for flag, v in (("--max-sequences-per-request", ns.max_sequences_per_request),
                    ("--max-stop-sequences", ns.max_stop_sequences),
                    ("--max-stop-length", ns.max_stop_length)):
        if v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}.")
    if not ns.shutdown_timeout > 0:
        raise ValueError(f"--shutdown-timeout must be > 0 seconds, got {ns.shutdown_timeout}.")
    if ns.max_waiting_requests < 0:
        raise ValueError(f"--max-waiting-requests must be >= 0, got {ns.max_waiting_requests}.")
    for flag, v in (("--default-ttft-slo-ms", ns.default_ttft_slo_ms),
                    ("--default-tpot-slo-ms", ns.default_tpot_slo_ms)):
        if v is not None and not v > 0:
            raise ValueError(f"{flag} must be a positive number of milliseconds, got {v}.")
    lora_modules = parse_lora_modules(ns.lora_modules)
    if lora_modules and engine_config.lora is None:
        raise ValueError("--lora-modules needs --enable-lora.")
    if ns.cascade and engine_config.lora is not None:
        raise ValueError("--enable-lora with --cascade is not supported yet.")
    server_config = ServerConfig(served_model_names=tuple(names),
                                 api_key=ns.api_key or os.environ.get("SERVELM_API_KEY") or None,
                                 metrics_without_api_key=bool(ns.metrics_without_api_key),
                                 max_sequences_per_request=ns.max_sequences_per_request,
                                 max_stop_sequences=ns.max_stop_sequences,
                                 max_stop_length=ns.max_stop_length,
                                 max_waiting_requests=ns.max_waiting_requests,
                                 on_engine_failure=ns.on_engine_failure,
                                 max_body_bytes=ns.max_request_bytes,
                                 default_ttft_slo_ms=ns.default_ttft_slo_ms,
                                 default_tpot_slo_ms=ns.default_tpot_slo_ms,
                                 chat_template=chat_template,
                                 default_sampling_params=sampling_defaults,
                                 enable_auto_tool_choice=bool(ns.enable_auto_tool_choice),
                                 tool_call_parser=ns.tool_call_parser,
                                 cascade=cascade is not None,
                                 lora_modules=lora_modules)
    app = build_app(engine_config, server_config, cascade=cascade,
                    launcher=getattr(args, "core_launcher", None))
    logging.getLogger(__name__).warning("servelm: starting %s on http://%s:%d", names[0], ns.host,
                                        ns.port)
    # on Ctrl-C / SIGTERM, in-flight requests get --shutdown-timeout seconds, then an error
    from servelm.server.shutdown import install
    config = uvicorn.Config(app, host=ns.host, port=ns.port, log_level=ns.uvicorn_log_level,
                            timeout_keep_alive=5, timeout_graceful_shutdown=ns.shutdown_timeout)
    server = install(uvicorn.Server, app, ns.shutdown_timeout)(config)
    app.state.uvicorn_server = server  # --on-engine-failure exit stops it
    server.run()
    return getattr(app.state, "exit_code", 0)
