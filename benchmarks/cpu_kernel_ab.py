"""A/B of the C decode step's source on this CPU: another version of csrc/decode.c (the same
structs) against the working tree's, on a SmolLM2-135M-shaped dummy model with int4 weights
(the C step's Q4 path; no weights file needed, so it runs on any machine) or, with --model
embedded, the embedded SmolLM2-135M Q4_1 GGUF itself (Q4_1 blocks, a Q8_0 lm_head), 2 threads
pinned to 2 cores, alternating builds, the median of --reps alternations x 30 steps each.

    git show cf7e279:servelm/cpu/csrc/decode.c > /tmp/old_decode.c
    python benchmarks/cpu_kernel_ab.py --old-source /tmp/old_decode.c [--reps 3] [--model embedded]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-source", required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--model", choices=("dummy-int4", "embedded"), default="dummy-int4")
    ap.add_argument("--batches", default="1,64", help="decode batch sizes, comma-separated")
    args = ap.parse_args()
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:2]))
    import torch

    from benchmarks.cpu_step_profile import _inputs
    from servelm import LLM
    from servelm.cpu import native
    torch.set_num_threads(2)
    sources = {"old": os.path.abspath(args.old_source), "new": native.SOURCE}
    res: dict = {}
    batches = [int(b) for b in args.batches.split(",")]
    for _ in range(args.reps):
        for name, src in sources.items():
            native.SOURCE = src
            native.load.cache_clear()
            if args.model == "embedded":
                llm = LLM(device="cpu", kv_cache_memory=1 << 30, threads=2)
            else:
                llm = LLM("smollm2-135m", load_format="dummy", quantization="int4", device="cpu",
                          dtype="bfloat16", kv_cache_memory=1 << 30, threads=2)
            runner = llm.engine.core.executor.runner
            for S in batches:
                ids, pos, meta = _inputs(runner, S, 128)
                with torch.inference_mode():
                    for _ in range(5):
                        runner.graphs.run(ids, pos, meta)
                    ts = []
                    for _ in range(30):
                        t = time.perf_counter()
                        runner.graphs.run(ids, pos, meta)
                        ts.append(time.perf_counter() - t)
                res.setdefault((name, S), []).append(statistics.median(ts) * 1e3)
            del llm, runner
    what = "the embedded Q4_1 GGUF" if args.model == "embedded" else "SmolLM2-135M shape, int4"
    print(f"C decode step, {what}, 2 threads, context 128 "
          f"(kernels: {native.simd_level()}); ms a step, median of {args.reps}")
    print("| batch | old | new | new / old |\n|---|---|---|---|")
    for S in batches:
        a, b = res[("old", S)], res[("new", S)]
        print(f"| {S} | {statistics.median(a):.2f} ({', '.join(f'{x:.2f}' for x in a)}) | "
              f"{statistics.median(b):.2f} ({', '.join(f'{x:.2f}' for x in b)}) | "
              f"{statistics.median(b) / statistics.median(a):.3f} |")


if __name__ == "__main__":
    main()
