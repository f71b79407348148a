"""`servelm bench perplexity`: perplexity of a fixed English text under engine configurations,
and how far each one's next-token distributions move from the first (the reference): mean
KL(ref || cand) per position over the full vocabulary, top-1 agreement, perplexity delta.

The text is scored as ONE sequence with all prior context, in chunks through the engine's own
model, paged KV cache and attention backend (so a quantized KV cache or linear method is
exercised exactly as when serving). Position i predicts token i + 1. The tokens are the
engine's tokenization of the text, ``tokenizer.encode(text)`` with special tokens as the engine
adds them to a prompt: a tokenizer that adds a BOS (Llama 3) puts it first, as context only; one
that adds none (SmolLM2) leaves the text's first token as the unscored context.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import typing
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "perplexity.txt")
_NONE_WORDS = ("none", "null")
_BOOL_WORDS = MappingProxyType({"true": True, "1": True, "yes": True, "on": True,
               "false": False, "0": False, "no": False, "off": False})


@dataclass(frozen=True)
class PerplexityResult:
    """One configuration's scores over the text (against the reference configuration)."""

    config: str  # the configuration as given ("none": no overrides)
    num_tokens: int  # positions scored: the text's tokens less the last (it predicts nothing)
    perplexity: float  # exp(mean negative log-likelihood of the next token)
    ppl_delta_pct: float  # 100 * (perplexity / reference perplexity - 1)
    mean_kl: float  # mean over positions of KL(reference || this) over the full vocabulary
    top1_agree: float  # fraction of positions whose argmax token is the reference's
    weight_bytes: int  # nbytes of every parameter and buffer of the model
    seconds: float  # scoring time: forwards, logits and log-softmax over the text (no loading)
    load_seconds: float  # building the model and loading its weights


@dataclass(frozen=True)
class LoadedConfig:
    """A configuration built through the engine: its runner holds the model and a KV cache of
    `num_blocks` blocks, enough for the whole text as one sequence."""

    spec: str
    runner: Any  # servelm.worker.model_runner.ModelRunner
    num_blocks: int
    load_seconds: float


@dataclass
class _Sums:
    """Running totals of one configuration over the chunks (local to one scoring run)."""

    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    seconds: float = 0.0


# ---- configurations ----------------------------------------------------------------------
def parse_config(spec: str) -> dict[str, Any]:
    """'quantization=fp8,kv_cache_dtype=fp8' -> {'quantization': 'fp8', ...}, each value
    converted to its EngineArgs field's type; 'none' or '' -> {} (no overrides). Values cannot
    hold commas."""
    from servelm.config import EngineArgs
    if spec.strip().lower() in ("", "none"):
        return {}
    hints = typing.get_type_hints(EngineArgs)
    allowed = [f.name for f in dataclasses.fields(EngineArgs)]
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq:
            raise ValueError(f"config item {item!r} of {spec!r} is not key=value.")
        if key not in allowed:
            raise ValueError(f"unknown config key {key!r} in {spec!r}: the keys are EngineArgs "
                             f"fields: {', '.join(allowed)}.")
        out[key] = _convert(value.strip(), hints[key], key)
    return out


def _convert(value: str, hint: Any, key: str) -> Any:
    """A string to the field type `hint`: bool, int, float, str, Optional[...] ('none' ->
    None); Any stays a string (e.g. speculative_config's JSON, parsed by the engine)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and type(None) in args:
        if value.lower() in _NONE_WORDS:
            return None
        inner = [a for a in args if a is not type(None)]
        hint = inner[0] if len(inner) == 1 else Any
    try:
        if hint is bool:
            return _BOOL_WORDS[value.lower()]
        if hint in (int, float):
            return hint(value)
    except (KeyError, ValueError):
        kind = "true/false" if hint is bool else hint.__name__
        raise ValueError(f"config key {key!r} takes {kind}, got {value!r}.") from None
    return value


def engine_args(base: dict[str, Any], overrides: dict[str, Any], spec: str, num_tokens: int):
    """EngineArgs of one configuration: the command line's `base`, then its overrides; the
    context is the text's length unless the configuration sets a max_model_len that holds it."""
    from servelm.config import EngineArgs
    merged = {**base, **overrides}
    # settings that act in the scheduler or at decode steps, which this tool's prompt
    # passes through the runner never reach: refused, not silently ignored
    for key, how in (("kv_eviction", "benchmarks/kv_eviction.py scores through the engine"),
                     ("early_exit_config", "benchmarks/early_exit.py scores decode steps"),
                     ("speculative_config", "drafts do not change a prompt's scores")):
        if merged.get(key) not in (None, "none"):
            raise ValueError(f"config {spec!r}: {key} does not apply to this tool's "
                             f"one-sequence prompt scoring ({how}).")
    if merged.get("max_model_len") is not None and merged["max_model_len"] < num_tokens:
        raise ValueError(f"config {spec!r}: max_model_len={merged['max_model_len']} is shorter "
                         f"than the text's {num_tokens} tokens; pass --max-tokens "
                         f"{merged['max_model_len']}.")
    args = EngineArgs(**merged)
    # the model's own context: a text longer than it cannot be one sequence
    context = args.create_engine_config().model.max_model_len if args.max_model_len is None \
        else args.max_model_len
    if num_tokens > context:
        raise ValueError(f"config {spec!r}: the text has {num_tokens} tokens, more than the "
                         f"model's context of {context}; pass --max-tokens {context}.")
    return dataclasses.replace(args, max_model_len=args.max_model_len or num_tokens)


def load_config(base: dict[str, Any], spec: str, num_tokens: int) -> LoadedConfig:
    """Builds the configuration's ModelRunner through the engine's loading path (every
    EngineArgs option applies) and a KV cache for exactly the text."""
    from servelm.worker.model_runner import ModelRunner
    t0 = time.perf_counter()
    config = engine_args(base, parse_config(spec), spec, num_tokens).create_engine_config()
    runner = ModelRunner(config)
    num_blocks = -(-num_tokens // config.cache.block_size)
    # allocate_kv, not initialize_kv_cache: the cache tensors in the engine's own layout and
    # dtype (what the memory profile runs forwards on) without decode CUDA graphs, unused here
    runner.allocate_kv(num_blocks)
    return LoadedConfig(spec or "none", runner, num_blocks, time.perf_counter() - t0)


def weight_bytes(model: torch.nn.Module) -> int:
    """nbytes of every parameter and buffer (shared tensors, e.g. tied embeddings, once)."""
    return sum(t.nbytes for t in model.parameters()) + sum(t.nbytes for t in model.buffers())


# ---- scoring -------------------------------------------------------------------------------
@torch.inference_mode()
def chunk_logprobs(cfg: LoadedConfig, ids: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Log-probs [end - start, vocab] fp32 of the next token at positions start..end-1 of the
    one sequence `ids` [n] (on the runner's device); positions before `start` must already be
    in the KV cache (earlier chunks), and this chunk's KV is written there."""
    from servelm.worker.step_meta import step_meta
    runner = cfg.runner
    # one sequence owning blocks 0..num_blocks-1 in order: token i lives in slot i
    block_table = np.arange(cfg.num_blocks, dtype=np.int32)[None, :]  # [1, num_blocks]
    _, pos, meta = step_meta(block_table, np.array([start]), np.array([end]),
                             runner.block_size, runner.device)
    positions = torch.from_numpy(pos).to(runner.device)  # [end - start] int64
    hidden = runner.model(ids[start:end], positions, runner.kv_caches, meta)  # [C, hidden]
    return torch.log_softmax(runner.model.compute_logits(hidden), dim=-1)  # [C, V] fp32


def iter_logprobs(cfg: LoadedConfig, token_ids: Sequence[int], chunk_size: int):
    """(start, log-probs [C, V]) per chunk of positions 0..n-2 (the last token predicts
    nothing); one configuration alone, for tests and single-config use. (Inference mode is
    entered per chunk, not around the loop: a generator would leak it to its caller.)"""
    ids = torch.tensor(token_ids, dtype=torch.int64, device=cfg.runner.device)
    for start in range(0, len(token_ids) - 1, chunk_size):
        yield start, chunk_logprobs(cfg, ids, start, min(start + chunk_size, len(token_ids) - 1))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def score(configs: Sequence[LoadedConfig], token_ids: Sequence[int],
          chunk_size: int) -> list[_Sums]:
    """Runs the configurations in lockstep, chunk by chunk, the first being the reference.

    Lockstep rather than the reference first and the others after: KL needs the reference's
    full distribution at every position, [n, vocab] fp32 (1.1 GB for 5.7k tokens of a 49k
    vocabulary, 2-3 GB for Llama 3's 128k), while in lockstep only one chunk's [C, vocab] is
    alive per configuration. The cost is every configuration's weights resident at once,
    which the small models this compares fit easily."""
    n = len(token_ids)
    sums = [_Sums() for _ in configs]
    ids = {c.runner.device: torch.tensor(token_ids, dtype=torch.int64, device=c.runner.device)
           for c in configs}
    for start in range(0, n - 1, chunk_size):
        end = min(start + chunk_size, n - 1)
        ref_logp = ref_top = targets = None
        for cfg, s in zip(configs, sums):
            dev = cfg.runner.device
            t0 = time.perf_counter()
            logp = chunk_logprobs(cfg, ids[dev], start, end)  # [C, V]
            _sync(dev)
            s.seconds += time.perf_counter() - t0
            if ref_logp is None:  # the reference: the others are measured against it
                ref_logp, ref_top = logp, logp.argmax(-1)
                targets = ids[dev][start + 1:end + 1, None]  # [C, 1]: the tokens predicted
            elif logp.shape[-1] != ref_logp.shape[-1]:
                raise ValueError(f"config {cfg.spec!r} has a vocabulary of {logp.shape[-1]}, "
                                 f"the reference {ref_logp.shape[-1]}: they cannot be compared.")
            logp = logp.to(ref_logp.device)
            s.nll -= float(logp.gather(1, targets).double().sum())
            # sum over positions and vocab of p_ref * (log p_ref - log p_cand)
            s.kl += float(F.kl_div(logp, ref_logp, reduction="sum", log_target=True))
            s.agree += int((logp.argmax(-1) == ref_top).sum())
    return sums


def results(configs: Sequence[LoadedConfig], sums: Sequence[_Sums],
            num_scored: int) -> list[PerplexityResult]:
    ppl = [math.exp(s.nll / num_scored) for s in sums]
    return [PerplexityResult(c.spec, num_scored, p, 100.0 * (p / ppl[0] - 1.0),
                             s.kl / num_scored, s.agree / num_scored,
                             weight_bytes(c.runner.model), s.seconds, c.load_seconds)
            for c, s, p in zip(configs, sums, ppl)]


def run_perplexity(specs: Sequence[str], base: dict[str, Any], token_ids: Sequence[int],
                   chunk_size: int = 512) -> list[PerplexityResult]:
    """Scores `token_ids` under each configuration (EngineArgs overrides of `base`, see
    parse_config); the first is the reference."""
    if not specs:
        raise ValueError("give at least one configuration (--configs none ...).")
    if len(token_ids) < 2:
        raise ValueError(f"the text has {len(token_ids)} tokens: at least 2 are needed.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    for spec in specs:  # every spec's errors before any model loads
        parse_config(spec)
    configs = [load_config(base, spec, len(token_ids)) for spec in specs]
    return results(configs, score(configs, token_ids, chunk_size), len(token_ids) - 1)


# ---- text and command line -----------------------------------------------------------------
def text_token_ids(base: dict[str, Any], path: str, max_tokens: Optional[int]) -> list[int]:
    """The text's tokens under the engine's tokenizer of the base model (special tokens as
    for a prompt: a BOS first where the tokenizer adds one), the first `max_tokens`."""
    from servelm.loader import load_tokenizer
    tok = load_tokenizer(base.get("model"), base.get("tokenizer"),
                         base.get("load_format") or "auto")
    if tok is None:
        raise ValueError("this model has no tokenizer: pass --tokenizer (a HF directory or "
                         ".gguf file).")
    with open(path, encoding="utf-8") as f:
        ids = list(tok.encode(f.read()))
    return ids[:max_tokens] if max_tokens else ids


def format_table(res: Sequence[PerplexityResult]) -> str:
    width = max(len("config"), *(len(r.config) for r in res))
    head = (f"{'config':<{width}}  {'tokens':>6}  {'perplexity':>10}  {'Δppl %':>8}  "
            f"{'mean KL':>9}  {'top-1 agree':>11}  {'weights':>11}  {'seconds':>7}")
    rows = [f"{r.config:<{width}}  {r.num_tokens:>6}  {r.perplexity:>10.4f}  "
            f"{r.ppl_delta_pct:>+8.3f}  {r.mean_kl:>9.3e}  {r.top1_agree:>11.4f}  "
            f"{r.weight_bytes / 2**20:>7.1f} MiB  {r.seconds:>7.1f}" for r in res]
    return "\n".join([head, "-" * len(head), *rows])


def add_perplexity_args(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model", default=None, help="HF directory, .gguf file or dummy preset (default: the "
                                    "embedded SmolLM2-135M-Instruct)")
    a("--tokenizer", default=None, help="a HF directory or .gguf file (default: the model's)")
    a("--load-format", default="auto", choices=["auto", "safetensors", "gguf", "dummy"])
    a("--dtype", default="auto", help="the base dtype; a configuration may override it")
    a("--device", default="auto")
    a("--text", default=DEFAULT_TEXT, help="UTF-8 text to score (default: the first chapters "
                                           "of Pride and Prejudice, ~5.7k tokens)")
    a("--max-tokens", type=int, default=None, help="score only the text's first N tokens")
    a("--chunk-size", type=int, default=512, help="tokens per forward pass")
    a("--configs", nargs="+", default=["none"],
      help="configurations, each comma-separated key=value EngineArgs fields (e.g. "
           "'quantization=int4', 'dtype=bfloat16,block_size=32'); 'none': no overrides. The "
           "first is the reference")
    a("--json", default=None, help="write the results to this JSON file")


def main_perplexity(args: argparse.Namespace) -> int:
    base = {"model": args.model, "tokenizer": args.tokenizer, "load_format": args.load_format,
            "dtype": args.dtype, "device": args.device}
    ids = text_token_ids(base, args.text, args.max_tokens)
    t0 = time.perf_counter()
    res = run_perplexity(args.configs, base, ids, args.chunk_size)
    print(format_table(res))
    print(f"{len(ids)} tokens of {args.text}; {time.perf_counter() - t0:.1f}s in all",
          file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"text": args.text, "text_tokens": len(ids), "chunk_size": args.chunk_size,
                       "base": base, "results": [dataclasses.asdict(r) for r in res]}, f,
                      indent=2)
    return 0
