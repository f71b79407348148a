"""A sliding-window model at long context against the same model with full attention, one table.

    python benchmarks/window_suite.py [--repeat 3] [--num-requests 16] [--fit 4]

Mistral-7B's shape (dummy bf16 weights, window 4096) at max_model_len 32768, B4-like: requests
of 32768 - 256 random prompt ids and 256 new tokens, all sent at once, ignore_eos. The same
model is run twice in each repeat, each a fresh process: with its window (blocks before each
request's window go back to the pool as it advances) and without it (a config.json of the same
shape with sliding_window null: every layer attends to all 32k positions). Both get the same KV
pool, sized for --fit full-length requests (num_gpu_blocks_override), so the table shows how
many requests each can hold at once (the most running in any step), their preemptions, and
throughput. --attention-backend picks the kernels for both (default triton).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MAX_LEN = 32768
BLOCK = 16


def child(window: bool, num_requests: int, fit: int, backend: str) -> dict:
    import time

    from benchmarks.gpu_suite import random_prompts
    from servelm import LLM, SamplingParams
    from servelm.loader.presets import PRESETS
    cfg = dict(PRESETS["mistral-7b"])
    if not window:
        cfg["sliding_window"] = None
    d = tempfile.mkdtemp()
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    blocks = fit * MAX_LEN // BLOCK
    llm = LLM(d, load_format="dummy", max_model_len=MAX_LEN, seed=0, skip_tokenizer_init=True,
              block_size=BLOCK, num_gpu_blocks_override=blocks, attention_backend=backend)
    greedy = dict(temperature=0, ignore_eos=True)
    llm.generate([[1] * 64], SamplingParams(max_tokens=8, **greedy), use_tqdm=False)  # warm-up
    prompts = random_prompts(num_requests, [MAX_LEN - 256] * num_requests, 3, cfg["vocab_size"])
    start_step = llm.engine.telemetry()["num_steps"] - 1
    t = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=256, **greedy), use_tqdm=False)
    dt = time.perf_counter() - t
    tel = llm.engine.telemetry(start_step)
    steps = tel.get("steps", [])
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    tpot = [(o.metrics.last_token_time - o.metrics.first_token_time) / 255 for o in outs]
    out = {"window": window, "requests": num_requests, "kv_blocks": blocks, "seconds": dt,
           "req_s": num_requests / dt, "out_tok_s": n_out / dt,
           "max_running": max((s["num_running"] for s in steps), default=0),
           "preemptions": llm.engine.stats().num_preemptions,
           "median_tpot_ms": 1e3 * statistics.median(tpot)}
    print("RESULT", json.dumps(out), flush=True)
    llm.engine.core.shutdown()
    return out


def _run(args: list[str], timeout: int) -> dict | None:
    from benchmarks.gpu_suite import run_child
    return run_child(__file__, args, timeout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--fit", type=int, default=4,
                    help="KV pool size in full-length (32k) requests, for both runs")
    ap.add_argument("--attention-backend", default="triton")
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--child", choices=["window", "full"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child == "window", args.num_requests, args.fit, args.attention_backend)
        return
    common = ["--num-requests", str(args.num_requests), "--fit", str(args.fit),
              "--attention-backend", args.attention_backend]
    runs: dict[str, list[dict]] = {"window": [], "full": []}
    for i in range(args.repeat):
        for kind in ("window", "full"):
            r = _run(["--child", kind] + common, args.timeout)
            if r:
                runs[kind].append(r)
                print(f"run {i} {kind}: {r}", flush=True)
    print(f"\nmistral-7b shape, dummy bf16, {args.num_requests} requests of {MAX_LEN - 256} in / "
          f"256 out, KV pool for {args.fit} full-length requests, {args.attention_backend} "
          f"attention; medians of fresh runs")
    print("| model | runs | req/s | out tok/s | most running at once | preemptions | "
          "median TPOT ms |\n|---|---|---|---|---|---|---|")
    for kind, label in (("window", "window 4096"), ("full", "no window (full attention)")):
        rs = runs[kind]
        if not rs:
            print(f"| {label} | 0 | failed | | | | |")
            continue
        med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        print(f"| {label} | {len(rs)} | {med('req_s'):.3f} | {med('out_tok_s'):.0f} | "
              f"{med('max_running'):.0f} | {med('preemptions'):.0f} | {med('median_tpot_ms'):.1f} |")
    if runs["window"] and runs["full"]:
        w = statistics.median(r["req_s"] for r in runs["window"])
        f = statistics.median(r["req_s"] for r in runs["full"])
        print(f"\nwindow / full throughput: {w / f:.2f}x")


if __name__ == "__main__":
    main()
