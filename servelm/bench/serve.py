"""`servelm bench serve`: a streaming load generator for any OpenAI-compatible server.

Requests arrive as a seeded Poisson process (`--request-rate`), optionally capped by a semaphore
(`--max-concurrency`), each a streaming POST whose SSE chunks are timed on arrival. The flags,
metrics and result table follow `vllm bench serve`.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
from tqdm import tqdm

from servelm.bench.datasets import DATASET_NAMES, BenchRequest, Tokenizer, build_requests
from servelm.bench.metrics import GoodputSLO, RequestRecord, compute_summary, format_table

if TYPE_CHECKING:
    import aiohttp

COMPLETIONS, CHAT = "completions", "chat"
_REQUEST_TIMEOUT_S = 6 * 3600  # a long benchmark on a slow server must not be cut short
_ERROR_BODY_CHARS = 500


@dataclass(frozen=True)
class ServeBenchConfig:
    """How to drive the server; built once from the CLI."""

    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/completions"
    model: Optional[str] = None  # None: the first id listed by GET /v1/models
    api_key: Optional[str] = None
    request_rate: float = math.inf  # requests/s; inf sends all at once
    max_concurrency: Optional[int] = None
    ignore_eos: bool = False
    seed: int = 0
    disable_tqdm: bool = False
    extra_body: tuple[tuple[str, Any], ...] = ()  # fields added to every request body

    def __post_init__(self) -> None:
        if not self.request_rate > 0:
            raise ValueError(f"--request-rate must be > 0 (or inf), got {self.request_rate}.")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}.")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"--base-url must start with http:// or https://, "
                             f"got {self.base_url!r}.")
        api_kind(self.endpoint)  # validates

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + self.endpoint

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass(frozen=True)
class BenchRun:
    """The records of one run, in request order, and its wall-clock span."""

    model: str
    records: tuple[RequestRecord, ...]
    start_time: float  # time.perf_counter() when the first request was due
    duration: float  # seconds, start to the end of the last request


def api_kind(endpoint: str) -> str:
    """COMPLETIONS or CHAT, from the endpoint path."""
    path = endpoint.rstrip("/")
    if path.endswith("/chat/completions"):
        return CHAT
    if path.endswith("/completions"):
        return COMPLETIONS
    raise ValueError(f"--endpoint must be an OpenAI completions path such as /v1/completions or "
                     f"/v1/chat/completions; got {endpoint!r}.")


def arrival_offsets(num_requests: int, request_rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each request is due: a Poisson process of the rate.

    The first request goes at 0; gaps are exponential with mean 1/rate. The generator is seeded
    apart from the dataset's so changing the rate leaves the prompts alone.
    """
    if math.isinf(request_rate):
        return [0.0] * num_requests
    gaps = np.random.default_rng((seed, 1)).exponential(1.0 / request_rate, num_requests - 1)
    return [0.0] + [float(t) for t in np.cumsum(gaps)]


def build_payload(request: BenchRequest, model: str, kind: str, ignore_eos: bool) -> dict:
    payload: dict[str, Any] = {
        "model": model,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if kind == CHAT:
        if not isinstance(request.prompt, str):
            raise ValueError("--endpoint /v1/chat/completions needs text prompts: pass "
                             "--tokenizer, or a jsonl dataset with text prompts.")
        payload["messages"] = [{"role": "user", "content": request.prompt}]
        payload["max_completion_tokens"] = request.output_len  # OpenAI's current name
    else:
        payload["prompt"] = request.prompt
        payload["max_tokens"] = request.output_len
    if ignore_eos:
        payload["ignore_eos"] = True  # vLLM/SGLang extension: always generate max_tokens
    return payload


def chunk_text(data: dict, kind: str) -> str:
    """The generated text one SSE chunk carries ("" for a usage-only chunk)."""
    text = []
    for choice in data.get("choices") or []:
        if kind == CHAT:
            delta = choice.get("delta") or {}
            text.append(delta.get("content") or delta.get("reasoning_content") or "")
        else:
            text.append(choice.get("text") or "")
    return "".join(text)


async def send_request(session: "aiohttp.ClientSession", config: ServeBenchConfig,
                       payload: dict, request: BenchRequest) -> RequestRecord:
    """POST one streaming request and time its chunks; never raises for server faults."""
    kind = api_kind(config.endpoint)
    chunk_times: list[float] = []
    usage: dict = {}
    error: Optional[str] = None
    send_time = time.perf_counter()
    try:
        async with session.post(config.url, json=payload, headers=config.headers) as resp:
            if resp.status != 200:
                body = (await resp.text())[:_ERROR_BODY_CHARS]
                error = f"HTTP {resp.status}: {body}"
            else:
                error = await _read_stream(resp, kind, chunk_times, usage)
    except (_import_aiohttp().ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
        error = f"{type(e).__name__}: {e}"  # ValueError: a malformed SSE line
    end_time = time.perf_counter()
    if error is None and not chunk_times:
        error = "the response carried no text, so TTFT is undefined (try --ignore-eos)"
    return RequestRecord(
        prompt_len=int(usage.get("prompt_tokens") or request.prompt_len),
        output_tokens=int(usage.get("completion_tokens") or len(chunk_times)),
        send_time=send_time,
        chunk_times=tuple(chunk_times),
        end_time=end_time,
        error=error,
    )


async def _read_stream(resp: "aiohttp.ClientResponse", kind: str, chunk_times: list[float],
                       usage: dict) -> Optional[str]:
    """Consume SSE `data:` lines until `data: [DONE]`; return an error text or None."""
    buffer = b""
    async for piece in resp.content.iter_any():
        now = time.perf_counter()
        buffer += piece
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue  # blank separators, ": keep-alive" comments, event:/id: fields
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                return None
            event = json.loads(data)
            if event.get("error"):
                return f"error event: {json.dumps(event['error'])[:_ERROR_BODY_CHARS]}"
            if event.get("usage"):
                usage.update(event["usage"])
            if chunk_text(event, kind):
                chunk_times.append(now)
    return "the stream ended before data: [DONE]"


async def fetch_model_id(session: "aiohttp.ClientSession", config: ServeBenchConfig) -> str:
    url = config.base_url.rstrip("/") + "/v1/models"
    try:
        async with session.get(url, headers=config.headers) as resp:
            if resp.status != 200:
                raise ValueError(f"GET {url} returned HTTP {resp.status}; pass --model NAME.")
            models = (await resp.json()).get("data") or []
    except (_import_aiohttp().ClientError, asyncio.TimeoutError, OSError) as e:
        raise ValueError(f"GET {url} failed ({type(e).__name__}: {e}); is the server running "
                         f"there? Point --base-url at it, or pass --model NAME.") from None
    if not models:
        raise ValueError(f"GET {url} listed no models; pass --model NAME.")
    return models[0]["id"]


async def run_benchmark(requests: Sequence[BenchRequest], config: ServeBenchConfig) -> BenchRun:
    """Send every request on its Poisson schedule, at most max_concurrency at once."""
    aiohttp = _import_aiohttp()
    kind = api_kind(config.endpoint)
    offsets = arrival_offsets(len(requests), config.request_rate, config.seed)
    limiter = (asyncio.Semaphore(config.max_concurrency) if config.max_concurrency
               else contextlib.nullcontext())
    # limit=0: no connection-pool cap, so only --max-concurrency bounds what is in flight.
    connector = aiohttp.TCPConnector(limit=config.max_concurrency or 0)
    timeout = aiohttp.ClientTimeout(total=_REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        model = config.model or await fetch_model_id(session, config)
        payloads = [{**build_payload(r, model, kind, config.ignore_eos), **dict(config.extra_body)}
                    for r in requests]
        progress = tqdm(total=len(requests), disable=config.disable_tqdm, desc="requests")

        async def one(i: int) -> RequestRecord:
            await asyncio.sleep(max(0.0, start + offsets[i] - time.perf_counter()))
            async with limiter:
                record = await send_request(session, config, payloads[i], requests[i])
            progress.update(1)
            return record

        start = time.perf_counter()
        records = await asyncio.gather(*(one(i) for i in range(len(requests))))
        duration = time.perf_counter() - start
        progress.close()
    return BenchRun(model=model, records=tuple(records), start_time=start, duration=duration)


def _import_aiohttp():
    try:
        import aiohttp
    except ImportError:
        raise ValueError("servelm bench serve needs aiohttp: pip install aiohttp "
                         "(or servelm[server]).") from None
    return aiohttp


def load_tokenizer(spec: str) -> Tokenizer:
    """A Hugging Face tokenizer from a model directory or hub id, or from a .gguf file, or the
    synthetic tokenizer of a dummy preset (what `servelm serve PRESET --load-format dummy` uses).
    Presets and GGUF files go through the engine's own loader (no transformers import)."""
    from servelm.loader.presets import PRESETS
    if spec in PRESETS:
        from servelm.loader.synthetic_tokenizer import preset_tokenizer
        return preset_tokenizer(spec)
    try:
        if spec.endswith(".gguf"):
            from servelm.loader import load_tokenizer as engine_tokenizer
            return engine_tokenizer(spec, load_format="gguf")
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError, KeyError, ImportError) as e:  # KeyError: a GGUF without one
        raise ValueError(f"could not load a tokenizer from --tokenizer {spec!r}: {e}") from None


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """The flags of `servelm bench serve` (named as in `vllm bench serve`)."""
    g = parser.add_argument_group("server")
    g.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="server root, without /v1 (default: %(default)s)")
    g.add_argument("--endpoint", default="/v1/completions",
                   help="/v1/completions (default) or /v1/chat/completions")
    g.add_argument("--model", default=None,
                   help="model name to send (default: the first id from GET /v1/models)")
    g.add_argument("--api-key", default=None,
                   help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY if set)")
    g.add_argument("--tokenizer", default=None,
                   help="HF tokenizer path/id, a .gguf file or a dummy preset name: turns synthetic prompts into "
                        "text and measures text prompts (default: send token-id prompts)")
    g = parser.add_argument_group("dataset")
    g.add_argument("--dataset-name", choices=DATASET_NAMES, default="random")
    g.add_argument("--dataset-path", default=None,
                   help='jsonl: one {"prompt": str | [ids], "output_len": N, "prompt_len"?: N} '
                        "per line")
    g.add_argument("--num-prompts", type=int, default=1000)
    g.add_argument("--random-input-len", type=int, default=1024)
    g.add_argument("--random-output-len", type=int, default=128)
    g.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="random lengths are uniform in [len*(1-r), len*(1+r)]")
    g.add_argument("--random-vocab-size", type=int, default=32000,
                   help="token ids are drawn from [0, N) when no --tokenizer is given")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="sharegpt-like: cap prompt + output at this many tokens")
    g = parser.add_argument_group("load")
    g.add_argument("--request-rate", type=float, default=math.inf,
                   help="Poisson arrival rate in requests/s (default: inf, all at once)")
    g.add_argument("--max-concurrency", type=int, default=None,
                   help="most requests in flight at once (default: no limit)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--eos-logit-bias", default=None, metavar="ID[,ID...]",
                   help="also send logit_bias -100 on these token ids (the model's EOS), for "
                        "servers that ignore ignore_eos: every server then generates the "
                        "same lengths")
    g.add_argument("--ignore-eos", action="store_true",
                   help="ask the server to generate exactly output_len tokens")
    g = parser.add_argument_group("results")
    g.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs for goodput, e.g. --goodput ttft:500 tpot:50 e2el:2000")
    g.add_argument("--slo-in-request", action="store_true",
                   help="also send the --goodput ttft/tpot objectives as the request fields "
                        "ttft_slo_ms / tpot_slo_ms (servelm's slo scheduling policy uses them)")
    g.add_argument("--disable-tqdm", action="store_true")
    g.add_argument("--save-result", default=None, metavar="PATH.json",
                   help="write config, summary and per-request arrays as JSON")
    g.add_argument("--plot", default=None, metavar="PATH.png",
                   help="histograms of TTFT/TPOT/E2EL and output tok/s over time (matplotlib)")


def main_serve(args: argparse.Namespace, tokenizer: Optional[Tokenizer] = None) -> dict:
    """Run the benchmark the flags describe, print the table, return the summary as a dict."""
    config = ServeBenchConfig(
        base_url=args.base_url, endpoint=args.endpoint, model=args.model,
        api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
        request_rate=args.request_rate, max_concurrency=args.max_concurrency,
        ignore_eos=args.ignore_eos, seed=args.seed, disable_tqdm=args.disable_tqdm)
    if getattr(args, "eos_logit_bias", None):
        try:
            ids = [int(t) for t in str(args.eos_logit_bias).split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"--eos-logit-bias takes token ids separated by commas, got "
                             f"{args.eos_logit_bias!r}.") from None
        config = replace(config, extra_body=config.extra_body
                         + (("logit_bias", {str(i): -100 for i in ids}),))
    slo = GoodputSLO.parse(args.goodput) if args.goodput else None
    if args.slo_in_request:
        if slo is None or (slo.ttft_ms is None and slo.tpot_ms is None):
            raise ValueError("--slo-in-request needs --goodput with ttft and/or tpot.")
        config = replace(config, extra_body=config.extra_body + tuple(
            (k, v) for k, v in (("ttft_slo_ms", slo.ttft_ms), ("tpot_slo_ms", slo.tpot_ms))
            if v is not None))
    if tokenizer is None and args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    requests = build_requests(
        args.dataset_name, num_prompts=args.num_prompts, seed=args.seed, tokenizer=tokenizer,
        random_input_len=args.random_input_len, random_output_len=args.random_output_len,
        random_range_ratio=args.random_range_ratio, random_vocab_size=args.random_vocab_size,
        max_model_len=args.max_model_len, dataset_path=args.dataset_path)
    print(f"Traffic request rate: {config.request_rate}\n"
          f"Maximum request concurrency: {config.max_concurrency}")
    run = asyncio.run(run_benchmark(requests, config))
    summary = compute_summary(run.records, run.duration, slo)
    print(format_table(summary, config.max_concurrency))
    _report_errors(run.records)
    if args.save_result:
        save_result(args.save_result, args, run, asdict(summary))
    if args.plot:
        from servelm.bench.plot import save_plot

        save_plot(args.plot, run.records, run.start_time)
    return asdict(summary)


def _report_errors(records: Sequence[RequestRecord], limit: int = 3) -> None:
    errors = list(dict.fromkeys(r.error for r in records if r.error is not None))
    if errors:
        print(f"{sum(not r.success for r in records)} requests failed; first distinct errors:",
              *(f"  {e}" for e in errors[:limit]), sep="\n", file=sys.stderr)


def save_result(path: str, args: argparse.Namespace, run: BenchRun, summary: dict) -> None:
    """Config + summary + per-request arrays (times in seconds, as vLLM saves them)."""
    config = {k: v for k, v in vars(args).items() if _is_json_scalar(v)}
    config["request_rate"] = str(args.request_rate)  # JSON has no inf
    if config.get("api_key"):
        config["api_key"] = "<redacted>"  # result files get shared; keys must not be
    records = run.records
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": run.model,
        "config": config,
        "summary": summary,
        "input_lens": [r.prompt_len for r in records],
        "output_lens": [r.output_tokens for r in records],
        "start_times": [r.send_time - run.start_time for r in records],
        "ttfts": [r.ttft if r.success else None for r in records],
        "itls": [r.itls for r in records],
        "e2els": [r.e2el for r in records],
        "errors": [r.error for r in records],
    }
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def _is_json_scalar(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_is_json_scalar(v) for v in value)
    return value is None or isinstance(value, (str, int, bool))
