"""Early exit on the CPU: speed against agreement with the full model, one table.

    python benchmarks/early_exit.py [--exit-layers 15 20 25] [--thresholds 0.9 0.7 0.5 0.3]
                                    [--criterion max_prob] [--score-tokens 512] [--runs 3]

The embedded SmolLM2-135M-Instruct GGUF (30 layers), fp32, batch 1. For each threshold:
- speed: decode tok/s generating 128 greedy tokens from a fixed chat prompt (median of --runs),
  next to the plain engine (C decode step) and the same eager path with no exits (threshold 2);
- quality, teacher-forced on the first --score-tokens tokens of the perplexity text
  (servelm/bench/data/perplexity.txt, the perplexity tool's): each token fed as a decode step
  through the early-exit forward (early_exit/forward.py), the perplexity of the next token, top-1
  agreement with the full model's, and the share of tokens exiting at each candidate layer;
- free running: how many of the 128 generated tokens match the full model's greedy output
  before the first difference.

    python benchmarks/early_exit.py --gpu-preset llama-3-8b [--forced-layers 8 16 24]
                                    [--batch 1 32]

On a GPU with dummy weights (confidence means nothing there), the speed side only: decode tok/s
at each batch size with every token forced to exit after layer n (threshold 0, exit_layers [n])
against the plain engine (decode graphs), and the early-exit step checking every forced layer
with no exits (threshold 2), in eager steps and in piecewise graphs; each a fresh engine.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPT = [{"role": "user", "content": "Explain in detail how a lighthouse works and why "
                                      "lighthouses were important for ships."}]


def generate(cfg, runs: int) -> tuple[float, list[int], dict]:
    from servelm import LLM, SamplingParams
    llm = LLM(device="cpu", dtype="float32", early_exit_config=cfg, enable_prefix_caching=False)
    tok = llm.get_tokenizer()
    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    sp = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    llm.generate([ids], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    rates, out = [], None
    for _ in range(runs):
        out = llm.generate([ids], sp, use_tqdm=False)[0]
        m = out.metrics
        rates.append(127 / (m.last_token_time - m.first_token_time))
    exits = dict(llm.engine.stats().early_exit_tokens)
    llm.engine.core.shutdown()
    return statistics.median(rates), list(out.outputs[0].token_ids), exits


def teacher_forced(text_ids: list[int], cfgs: list) -> list[dict]:
    """Each config's NLL, top-1 agreement with the first (the full model), and exits per
    layer, feeding the text one token a step through the early-exit forward."""
    import numpy as np
    import torch

    from servelm.bench.perplexity import load_config
    from servelm.early_exit.forward import early_exit_forward
    from servelm.worker.step_meta import step_meta
    base = {"device": "cpu", "dtype": "float32"}
    loaded = load_config(base, "none", len(text_ids))
    runner = loaded.runner
    n = len(text_ids)
    ids = torch.tensor(text_ids)
    table = np.arange(loaded.num_blocks, dtype=np.int32)[None, :]
    res = [{"nll": 0.0, "agree": 0, "exits": {}} for _ in cfgs]
    L = runner.model.num_stage_layers
    with torch.inference_mode():
        # the first token's KV, then one token a step; every config writes the same KV for
        # the full model is not what the early-exit forward writes: one pass per config
        for ci, cfg in enumerate(cfgs):
            runner.allocate_kv(loaded.num_blocks)
            ref_top = res[0].get("top") if ci else None
            tops = []
            for i in range(n - 1):
                _, pos, meta = step_meta(table, np.array([i]), np.array([i + 1]),
                                         runner.block_size, runner.device)
                positions = torch.from_numpy(pos)
                if cfg is None:
                    hidden = runner.model(ids[i:i + 1], positions, runner.kv_caches, meta)
                    layer = L
                else:
                    hidden, ex = early_exit_forward(runner.model, ids[i:i + 1], positions,
                                                    runner.kv_caches, meta, cfg)
                    layer = int(ex[0])
                lp = torch.log_softmax(runner.model.compute_logits(hidden)[0].float(), -1)
                res[ci]["nll"] -= float(lp[text_ids[i + 1]])
                top = int(lp.argmax())
                tops.append(top)
                if ref_top is not None and ref_top[i] == top:
                    res[ci]["agree"] += 1
                if layer < L:
                    res[ci]["exits"][layer] = res[ci]["exits"].get(layer, 0) + 1
            res[ci]["top"] = tops
    for r in res:
        r["ppl"] = math.exp(r["nll"] / (n - 1))
        r["agree"] = r["agree"] / (n - 1) if r is not res[0] else 1.0
    return res


def gpu_speed(preset: str, forced: list[int], runs: int, batches: list[int]) -> None:
    from benchmarks.gpu_suite import random_prompts
    from servelm import LLM, SamplingParams
    from servelm.loader import preset_config
    cfg = preset_config(preset)
    new = 256
    sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    none = {"threshold": 2.0, "exit_layers": forced}  # every candidate checked, none exits
    configs = ([("plain engine (decode graphs)", None, False),
                (f"early exit, no exits (candidates {forced}), eager steps", none, True),
                (f"early exit, no exits (candidates {forced}), piecewise graphs", none, False),
                ("the same, criterion state (no lm_head at candidates)",
                 {**none, "criterion": "state"}, False)]
               + [(f"all exit after layer {n}, piecewise graphs",
                   {"threshold": 0.0, "exit_layers": [n]}, False) for n in forced])
    rows = []
    for label, ee, eager in configs:
        llm = LLM(preset, load_format="dummy", max_model_len=2048, skip_tokenizer_init=True,
                  early_exit_config=ee, enforce_eager=eager, max_num_seqs=max(batches))
        rates = {}
        for b in batches:
            prompts = random_prompts(b, [128] * b, b, cfg.vocab_size)
            llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                         use_tqdm=False)
            rs = []
            for _ in range(runs):  # decode tok/s: tokens after each first / the decode span
                ms = [o.metrics for o in llm.generate(prompts, sp, use_tqdm=False)]
                span = max(m.last_token_time for m in ms) - min(m.first_token_time for m in ms)
                rs.append(b * (new - 1) / span)
            rates[b] = statistics.median(rs)
            print(f"{label}, batch {b}: {rates[b]:.1f} tok/s ({[round(r, 1) for r in rs]})",
                  flush=True)
        llm.engine.core.shutdown()
        del llm
        rows.append((label, rates))
    print(f"\n{preset}, dummy bf16, decode of {new} tokens from 128-token prompts, output "
          f"tok/s, median of {runs}")
    print("| configuration | " + " | ".join(f"B={b} tok/s | vs plain" for b in batches) + " |")
    print("|---|" + "---|---|" * len(batches))
    for label, r in rows:
        print(f"| {label} | " + " | ".join(f"{r[b]:.1f} | {r[b] / rows[0][1][b]:.2f}x"
                                           for b in batches) + " |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu-preset", default=None)
    ap.add_argument("--forced-layers", type=int, nargs="+", default=[8, 16, 24])
    ap.add_argument("--exit-layers", type=int, nargs="+", default=[15, 20, 25])
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.7, 0.5, 0.3])
    ap.add_argument("--criterion", default="max_prob", choices=["max_prob", "margin", "state"])
    ap.add_argument("--score-tokens", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="GPU: batch sizes")
    args = ap.parse_args()
    if args.gpu_preset:
        gpu_speed(args.gpu_preset, args.forced_layers, args.runs, args.batch)
        return
    from servelm.bench.perplexity import DEFAULT_TEXT
    from servelm.early_exit import parse_early_exit_config
    from servelm.loader import load_tokenizer
    tok = load_tokenizer(None, None, "auto")
    with open(DEFAULT_TEXT, encoding="utf-8") as f:
        text_ids = list(tok.encode(f.read()))[:args.score_tokens]
    cfgs = [{"threshold": t, "exit_layers": args.exit_layers, "criterion": args.criterion}
            for t in args.thresholds]
    plain_rate, plain_ids, _ = generate(None, args.runs)
    eager_rate, _, _ = generate({"threshold": 2.0, "exit_layers": args.exit_layers}, args.runs)
    print(f"plain engine {plain_rate:.1f} tok/s; early-exit path, no exits {eager_rate:.1f}",
          flush=True)
    gens = []
    for c in cfgs:
        gens.append(generate(c, args.runs))
        print(f"{c}: {gens[-1][0]:.1f} tok/s", flush=True)
    tf = teacher_forced(text_ids, [None] + [parse_early_exit_config(c) for c in cfgs])
    n = len(text_ids) - 1

    def prefix(a: list[int]) -> int:
        k = 0
        while k < min(len(a), len(plain_ids)) and a[k] == plain_ids[k]:
            k += 1
        return k

    print(f"\nSmolLM2-135M-Instruct (embedded GGUF, fp32, 2-core CPU), batch 1, candidates after "
          f"layers {args.exit_layers} of 30, criterion {args.criterion}; speed: 128 greedy "
          f"tokens, median of {args.runs}; quality: {n} positions of perplexity.txt "
          "teacher-forced one token a step")
    cols = " | ".join(f"exits after {x}" for x in args.exit_layers)
    print(f"| threshold | tok/s | vs plain | perplexity | top-1 agreement | "
          f"matching prefix of 128 | {cols} |")
    print("|" + "---|" * (6 + len(args.exit_layers)))
    print(f"| plain engine | {plain_rate:.1f} | 1.00x | {tf[0]['ppl']:.2f} | 1.000 | 128 |"
          + " - |" * len(args.exit_layers))
    print(f"| no exits (eager path) | {eager_rate:.1f} | {eager_rate / plain_rate:.2f}x | "
          f"{tf[0]['ppl']:.2f} | 1.000 | 128 |" + " - |" * len(args.exit_layers))
    for c, g, r in zip(cfgs, gens, tf[1:]):
        shares = " | ".join(f"{100 * r['exits'].get(x, 0) / n:.0f}%" for x in args.exit_layers)
        print(f"| {c['threshold']} | {g[0]:.1f} | {g[0] / plain_rate:.2f}x | {r['ppl']:.2f} | "
              f"{r['agree']:.3f} | {prefix(g[1])} | {shares} |")


if __name__ == "__main__":
    main()
