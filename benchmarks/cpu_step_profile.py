"""Where one CPU decode step's time goes, before and after the C decode step: the embedded
SmolLM2-135M Q4_1, one decode batch of --batch sequences at a --context-token context.

    python benchmarks/cpu_step_profile.py [--batch 1] [--context 64] [--steps 50]

"eager" is the PyTorch path (enforce_eager=True: the same weights through the linear methods'
PyTorch kernels, attention gathering the paged cache), profiled with torch.profiler and grouped
by operator; "C step" is servelm/cpu's one call per step, timed per phase on its thread 0
(barrier to barrier). Both tables print median step times over --steps steps.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PHASES = ("norm", "qkv", "rope + KV write", "attention", "o_proj", "norm", "gate_up", "silu*mul",
          "down", "final norm", "lm_head")


def _inputs(runner, S: int, ctx: int):
    from servelm.attention.backend import AttentionMetadata
    bs = runner.block_size
    nblk = -(-ctx // bs)
    bt = torch.arange(S * nblk, dtype=torch.int32).reshape(S, nblk)
    slots = bt[:, (ctx - 1) // bs].long() * bs + (ctx - 1) % bs
    meta = AttentionMetadata(slot_mapping=slots, query_start_loc=torch.arange(S + 1, dtype=torch.int32),
                             seq_lens=torch.full((S,), ctx, dtype=torch.int32), block_tables=bt,
                             max_query_len=1, max_seq_len=ctx, query_lens_cpu=(1,) * S,
                             seq_lens_cpu=(ctx,) * S)
    ids = torch.randint(100, 40000, (S,))
    pos = torch.full((S,), ctx - 1, dtype=torch.int64)
    return ids, pos, meta


def _timed(fn, steps: int) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    from servelm import LLM
    S, ctx = args.batch, args.context
    need = S * -(-ctx // 16) + 8

    eager = LLM(kv_cache_memory=1 << 30, enforce_eager=True)
    r = eager.engine.core.executor.runner
    assert r.graphs is None and r.kv_caches[0][0].shape[0] >= need
    ids, pos, meta = _inputs(r, S, ctx)
    with torch.inference_mode():
        ms_eager = _timed(lambda: r._decode(ids, pos, meta), args.steps)
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                r._decode(ids, pos, meta)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total_self = sum(e.self_cpu_time_total for e in ops) / 10 / 1e3
    del eager, r

    fast = LLM(kv_cache_memory=1 << 30)
    g = fast.engine.core.executor.runner.graphs
    ids, pos, meta = _inputs(fast.engine.core.executor.runner, S, ctx)
    with torch.inference_mode():
        ms_fast = _timed(lambda: g.run(ids, pos, meta), args.steps)
        acc = g.profile()
        for _ in range(args.steps):
            g.run(ids, pos, meta)
        g.profile(False)
    phases = (acc / args.steps * 1e3).tolist()

    print(f"\nSmolLM2-135M Q4_1, decode step of {S} sequence(s) at {ctx} tokens of context, "
          f"{torch.get_num_threads()} threads")
    print(f"\neager PyTorch path: {ms_eager:.2f} ms a step (median of {args.steps}); "
          f"self time by operator ({total_self:.2f} ms profiled):")
    print("| operator | calls a step | self ms a step | share |\n|---|---|---|---|")
    for e in ops[:12]:
        print(f"| {e.key} | {e.count // 10} | {e.self_cpu_time_total / 10 / 1e3:.3f} | "
              f"{e.self_cpu_time_total / 10 / 1e3 / total_self:.0%} |")
    print(f"\nC step: {ms_fast:.2f} ms a step (median of {args.steps}), by phase:")
    print("| phase | ms a step | share |\n|---|---|---|")
    merged: dict[str, float] = {}
    for name, v in zip(PHASES, phases):
        merged[name] = merged.get(name, 0.0) + v
    tot = sum(merged.values())
    for name, v in merged.items():
        print(f"| {name} | {v:.3f} | {v / tot:.0%} |")
    print(f"\nspeed-up of the step: {ms_eager / ms_fast:.2f}x")


if __name__ == "__main__":
    main()
