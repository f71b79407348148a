"""Speculative decoding on vs off, batch 1, in the same run: one table.

    python benchmarks/spec_decode.py --cpu            # SmolLM2-135M (the embedded model)

Prompts: benchmarks/data/spec_decode_prompts.jsonl (a copy-heavy set and a plain chat set,
committed before any measurement). Each prompt runs alone (batch 1), greedy, on two engines
held side by side, one with speculation, alternating prompt by prompt so both see the same
machine state. Decode speed per request: (output tokens - 1) / (last token - first token).
Outputs are compared token by token: identical in fp32; in bf16 a verification step's
multi-token matmuls round differently from one-token steps, so near-ties can flip (counted).

    python benchmarks/spec_decode.py --cpu --methods ngram layer_skip:4 layer_skip:8 --limit 8

``--methods`` adds engines beside "off": ngram, layer_skip:N (the first N of SmolLM2's 30
layers draft), draft_model:PATH. The GPU benchmark (replayed drafts at set acceptance rates,
a draft model, load) is benchmarks/spec_gpu.py.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                    "spec_decode_prompts.jsonl")


def decode_tok_s(out) -> float:
    m, n = out.metrics, len(out.outputs[0].token_ids)
    return (n - 1) / (m.last_token_time - m.first_token_time) if n > 1 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true", help="the embedded SmolLM2 on the CPU")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--lookup-min", type=int, default=2)
    ap.add_argument("--lookup-max", type=int, default=4)
    ap.add_argument("--dtype", default="auto", help="auto: bf16 where the CPU has it natively")
    ap.add_argument("--limit", type=int, default=None, help="prompts per set (default: all)")
    ap.add_argument("--under-load", type=int, default=0, metavar="N",
                    help="instead: N prompts (both sets, cycled) at once; output tok/s for "
                         "speculation off, n-gram, and n-gram with disable_by_batch_size 16")
    ap.add_argument("--methods", nargs="+", default=["ngram"],
                    help="ngram, layer_skip:N, draft_model:PATH (each beside 'off')")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not args.cpu:
        raise SystemExit("this is the CPU benchmark (--cpu); on a GPU: benchmarks/spec_gpu.py")
    from servelm import LLM, SamplingParams
    spec = {"method": "ngram", "num_speculative_tokens": args.k,
            "prompt_lookup_min": args.lookup_min, "prompt_lookup_max": args.lookup_max}
    if args.under_load:
        return under_load(args, spec)
    engines = {"off": LLM(device="cpu", dtype=args.dtype)}
    for m in args.methods:
        name, _, arg = m.partition(":")
        cfg = {"ngram": spec,
               "layer_skip": {"method": "layer_skip", "num_speculative_tokens": args.k,
                              "draft_layers": int(arg or 0)},
               "draft_model": {"method": "draft_model", "num_speculative_tokens": args.k,
                               "model": arg}}[name]
        engines[m] = LLM(device="cpu", dtype=args.dtype, speculative_config=cfg)
    sets: dict[str, list[str]] = {}
    with open(DATA) as f:
        for line in f:
            r = json.loads(line)
            sets.setdefault(r["set"], []).append(r["prompt"])
    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    for llm in engines.values():  # warm-up (first-call costs out of the figures)
        llm.chat([{"role": "user", "content": "Hello"}], sp, use_tqdm=False)
    results: dict = {"methods": args.methods, "ngram_config": spec,
                     "max_tokens": args.max_tokens, "sets": {}}
    spec_names = [k for k in engines if k != "off"]
    for name, prompts in sets.items():
        prompts = prompts[:args.limit] if args.limit else prompts
        speeds: dict[str, list[float]] = {k: [] for k in engines}
        mismatches = {k: 0 for k in spec_names}
        before = {k: engines[k].spec_decode_stats() for k in spec_names}
        t0 = time.perf_counter()
        for p in prompts:
            toks = {}
            for k, llm in engines.items():
                o = llm.chat([{"role": "user", "content": p}], sp, use_tqdm=False)[0]
                speeds[k].append(decode_tok_s(o))
                toks[k] = o.outputs[0].token_ids
            for k in spec_names:
                mismatches[k] += toks["off"] != toks[k]
        med = {k: statistics.median(v) for k, v in speeds.items()}
        per = {}
        for k in spec_names:
            after = engines[k].spec_decode_stats()
            drafts = after["num_drafts"] - before[k]["num_drafts"]
            acc = after["num_accepted_tokens"] - before[k]["num_accepted_tokens"]
            per[k] = {"speedup": med[k] / med["off"], "mismatches": mismatches[k],
                      "mean_acceptance_length": 1 + acc / drafts if drafts else None}
        results["sets"][name] = {"prompts": len(prompts), "tok_s": speeds, "median_tok_s": med,
                                 "methods": per, "seconds": time.perf_counter() - t0}
        print(name, json.dumps({k: v for k, v in results["sets"][name].items()
                                if k != "tok_s"}), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print(f"\nSmolLM2-135M on the CPU ({args.dtype}), batch 1, greedy, {args.max_tokens} new "
          f"tokens, k={args.k} (n-gram lookup {args.lookup_min}-{args.lookup_max}); decode "
          "tok/s, median over prompts")
    print("| set | prompts | method | tok/s | vs off | mean acceptance length | "
          "outputs differing |\n|---|---|---|---|---|---|---|")
    for name, r in results["sets"].items():
        print(f"| {name} | {r['prompts']} | off | {r['median_tok_s']['off']:.1f} | 1.00x | - "
              "| - |")
        for k, m in r["methods"].items():
            mal = m["mean_acceptance_length"]
            print(f"| {name} | {r['prompts']} | {k} | {r['median_tok_s'][k]:.1f} | "
                  f"{m['speedup']:.2f}x | {'-' if mal is None else f'{mal:.2f}'} | "
                  f"{m['mismatches']} |")


def under_load(args: argparse.Namespace, spec: dict) -> None:
    """All prompts at once: total output tok/s per engine (each timed alone, after a warm-up)."""
    from servelm import LLM, SamplingParams
    with open(DATA) as f:
        pool = [json.loads(line)["prompt"] for line in f]
    convs = [[{"role": "user", "content": pool[i % len(pool)]}] for i in range(args.under_load)]
    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    rows = []
    for name, cfg in (("off", None), ("ngram", spec),
                      ("ngram, disable_by_batch_size 16", {**spec, "disable_by_batch_size": 16})):
        llm = LLM(device="cpu", dtype=args.dtype, speculative_config=cfg)
        llm.chat(convs[:4], sp, use_tqdm=False)
        t = time.perf_counter()
        outs = llm.chat(convs, sp, use_tqdm=False)
        dt = time.perf_counter() - t
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        st = llm.spec_decode_stats() if cfg else {}
        rows.append((name, n / dt, st.get("mean_acceptance_length")))
        print(name, n / dt, st, flush=True)
        del llm
    print(f"\n{args.under_load} prompts at once, SmolLM2-135M on the CPU ({args.dtype}), "
          f"{args.max_tokens} new tokens, greedy\n| engine | output tok/s | vs off | mean "
          "acceptance length |\n|---|---|---|---|")
    for name, tps, mal in rows:
        print(f"| {name} | {tps:.1f} | {tps / rows[0][1]:.2f}x | "
              f"{'-' if mal is None else f'{mal:.2f}'} |")


if __name__ == "__main__":
    main()
