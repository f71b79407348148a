"""Structured outputs: what a JSON schema costs per output token and in time to first token.

Two parts, one engine, one table:
- TPOT: B requests decoding together, every one with the same JSON schema, against the same B
  unconstrained (same prompt, sampling, seeds and token count: ignore_eos keeps the batch full;
  a row whose grammar has ended samples its stop token). The median time of the steps where
  all B rows decode, medians over --repeat alternating runs.
- TTFT added: one request at a time on an idle engine: each of --schemas first-seen schemas
  (compiled on arrival), then the same schemas again (cached), against unconstrained requests;
  the added TTFT is a request's TTFT minus the median unconstrained one.

  python benchmarks/structured_bench.py                          # this CPU, embedded SmolLM2
  python benchmarks/structured_bench.py --export-8b DIR          # write the GPU model dir
  python benchmarks/structured_bench.py --model DIR --load-format dummy --batch 256
The GPU model is Llama-3-8B's shape with SmolLM2's vocabulary and tokenizer (dummy weights), so
grammars see real tokens (--export-8b writes it from the embedded GGUF).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

PROMPT = "<|im_start|>user\nList some people as JSON.<|im_end|>\n<|im_start|>assistant\n"
S = {"type": "string", "maxLength": 16}
I = {"type": "integer", "minimum": 0, "maximum": 999}
# long enough to stay active for the whole run (an array of up to 200 records)
TPOT_SCHEMA = {"type": "array", "maxItems": 200, "items": {
    "type": "object", "properties": {"name": S, "age": I, "ok": {"type": "boolean"},
                                     "tags": {"type": "array", "items": S, "maxItems": 3}},
    "required": ["name", "age", "ok"]}}


def distinct_schemas(n: int) -> list[dict]:
    """n different schemas of varied shape (distinct property names defeat any cache)."""
    out = []
    kinds = [S, I, {"type": "boolean"}, {"enum": ["a", "b", "c"]},
             {"type": "array", "items": I, "maxItems": 4},
             {"type": "object", "properties": {"x": I, "y": S}, "required": ["x"]},
             {"type": "string", "format": "date"}, {"type": ["number", "null"]}]
    for i in range(n):
        props = {f"f{i}_{j}": kinds[(i + j) % len(kinds)] for j in range(3 + i % 5)}
        out.append({"type": "object", "properties": props, "required": list(props)[:2]})
    return out


def export_8b(path: str) -> None:
    """A model dir: Llama-3-8B's config with SmolLM2's vocabulary, and SmolLM2's tokenizer."""
    from servelm.loader import load_tokenizer
    from servelm.loader.presets import PRESETS
    tok = load_tokenizer(None)  # the embedded SmolLM2
    os.makedirs(path, exist_ok=True)
    cfg = dict(PRESETS["llama-3-8b"])
    cfg.update(vocab_size=49152, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               torch_dtype="bfloat16")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    tok.backend_tokenizer.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.bos_token,
                   "eos_token": tok.eos_token, "pad_token": tok.pad_token,
                   "unk_token": tok.unk_token, "chat_template": tok.chat_template,
                   "model_max_length": 8192}, f, indent=1)
    print(f"wrote {path}")


def _step_times(engine, params, batch: int) -> tuple[float, int]:
    """(median ms of the steps where every row decodes, how many such steps)."""
    stamp = time.time_ns()
    for i in range(batch):
        engine.add_request(f"{stamp}-{i}", PROMPT, params(i))
    times = []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t0
        sched = engine.core.scheduler
        n_decoding = sum(1 for r in sched.running if r.num_computed_tokens >= r.num_prompt_tokens)
        if n_decoding == batch and not sched.waiting:
            times.append(dt)
    return statistics.median(times) * 1e3, len(times)


def tpot(engine, batch: int, max_tokens: int, repeat: int, seeded: bool = True) -> dict:
    from servelm import SamplingParams, StructuredOutputsParams
    so = StructuredOutputsParams(json=TPOT_SCHEMA)

    def plain(i):
        return SamplingParams(temperature=0.8, seed=i if seeded else None,
                              max_tokens=max_tokens, ignore_eos=True)

    def constrained(i):
        return SamplingParams(temperature=0.8, seed=i if seeded else None,
                              max_tokens=max_tokens, ignore_eos=True, structured_outputs=so)
    _step_times(engine, constrained, min(batch, 4))  # compile, warm every path
    _step_times(engine, plain, min(batch, 4))
    res = {"plain": [], "json": []}
    for _ in range(repeat):
        res["plain"].append(_step_times(engine, plain, batch)[0])
        res["json"].append(_step_times(engine, constrained, batch)[0])
    return res


def _ttft(engine, params) -> float:
    rid = f"t{time.time_ns()}"
    t0 = time.perf_counter()
    engine.add_request(rid, PROMPT, params)
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.request_id == rid and o.outputs[0].token_ids:
                first = time.perf_counter() - t0
                while engine.has_unfinished_requests():
                    engine.step()
                return first * 1e3
    raise RuntimeError("no token")


def ttft(engine, n_schemas: int) -> dict:
    from servelm import SamplingParams, StructuredOutputsParams
    mgr = engine.core.grammars
    mgr.warm_up()  # as a server does while idle: tokenizer tables built before traffic
    mgr._backend.result()
    plain = SamplingParams(temperature=0, max_tokens=1)
    for _ in range(3):
        _ttft(engine, plain)
    schemas = distinct_schemas(n_schemas)
    base, first, cached = [], [], []
    for s in schemas:
        base.append(_ttft(engine, plain))
        first.append(_ttft(engine, SamplingParams(
            temperature=0, max_tokens=1, structured_outputs=StructuredOutputsParams(json=s))))
    for s in schemas:
        base.append(_ttft(engine, plain))
        cached.append(_ttft(engine, SamplingParams(
            temperature=0, max_tokens=1, structured_outputs=StructuredOutputsParams(json=s))))
    b = statistics.median(base)
    return {"base": b, "first": [x - b for x in first], "cached": [x - b for x in cached]}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--schemas", type=int, default=24)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--no-seeds", action="store_true",
                    help="requests without a seed (one noise draw for the batch, not one each)")
    ap.add_argument("--mask-process", choices=["auto", "on", "off"], default="auto",
                    help="grammar masks filled in a process of their own (auto: on CUDA)")
    ap.add_argument("--export-8b", default=None, metavar="DIR")
    ap.add_argument("--json-out", default=None)
    a = ap.parse_args()
    if a.export_8b:
        export_8b(a.export_8b)
        return
    from servelm.config import EngineArgs
    from servelm.engine.engine import Engine
    engine = Engine.from_engine_args(EngineArgs(
        model=a.model, load_format=a.load_format, dtype=a.dtype, device=a.device,
        max_model_len=a.max_model_len, max_num_seqs=max(a.batch, 8),
        structured_outputs_config={"mask_process": {"auto": "auto", "on": True,
                                                    "off": False}[a.mask_process]}))
    dev = engine.config.device
    t = tpot(engine, a.batch, a.max_tokens, a.repeat, seeded=not a.no_seeds)
    f = ttft(engine, a.schemas)
    pm, jm = statistics.median(t["plain"]), statistics.median(t["json"])
    rows = [
        ("TPOT ms, B=%d" % a.batch, f"{pm:.2f} ({', '.join(f'{x:.2f}' for x in t['plain'])})",
         f"{jm:.2f} ({', '.join(f'{x:.2f}' for x in t['json'])})", f"{jm / pm:.3f}x",
         "<= 1.1x"),
        (f"TTFT added, {a.schemas} first-seen schemas", f"base {f['base']:.1f} ms",
         f"p50 {_pct(f['first'], .5):.1f} / p99 {_pct(f['first'], .99):.1f} / max "
         f"{max(f['first']):.1f} ms", "", "p99 <= 50 ms"),
        (f"TTFT added, {a.schemas} cached schemas", f"base {f['base']:.1f} ms",
         f"p50 {_pct(f['cached'], .5):.2f} / p99 {_pct(f['cached'], .99):.2f} ms", "",
         "< 5 ms"),
    ]
    print(f"\nstructured outputs, {dev}, model {engine.config.model.model}, "
          f"{a.max_tokens} tokens, {a.repeat} runs, {'no seeds' if a.no_seeds else 'seeded'}, "
          f"masks filled in "
          f"{'the mask process' if engine.core.grammars.mask_process else 'the engine thread'}")
    print("| measure | unconstrained | JSON schema | ratio | target |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if a.json_out:
        with open(a.json_out, "w") as fh:
            json.dump({"tpot": t, "ttft": f, "device": dev,
                       "mask_process": engine.core.grammars.mask_process}, fh, indent=1)


if __name__ == "__main__":
    main()
