"""GGUF weights kept quantized on one GPU: servelm's ``gguf_linear`` (kernels/gguf_matmul.py) vs a
bf16 ``F.linear`` (cuBLAS) of the same shape, for the Llama-3-8B layer matmuls (qkv 6144x4096,
o 4096x4096, gate_up 28672x4096, down 4096x14336) in Q4_0, Q4_K, Q6_K and Q8_0 at M = 1, 8, 64,
512 (bf16 activations). GPU only.

    PYTHONPATH=. python benchmarks/gguf_gemv_bench.py [--fused] [--sweep] [--sweep-budget S]

Times are per call of back-to-back calls replayed from one CUDA graph (as in a decode step),
timed with CUDA events, over weight copies rotated so that each pool is >= 512 MB (HBM, not the
50 MB L2, is measured). TB/s counts the weight's bytes as stored: the raw blocks for GGUF, 2 bytes
an element for bf16; the device-to-device copy bandwidth (read + write) measured in the same run
is printed as the ceiling. M <= 16 runs the GEMV kernels; M = 64 and 512 dequantize the weight
into a bf16 buffer and call F.linear. The "layer" rows sum the four shapes.

--fused adds, at M = 64 and 512, the fused dequantize-GEMM (the dot path with a grid over M).
--sweep times candidate configs (FMA and dot paths, tiles, splits) for every (format, shape) at
M = 1 and 8 and prints the fastest, to tune select_config; the default run takes < 2 minutes.
Writes JSON to $OUT/gguf_gemv_bench.json when OUT is set.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from quant_gemv_bench import graph_us  # noqa: E402  (CUDA-graph replay timing, shared)
from servelm.kernels.gguf_matmul import (  # noqa: E402
    MAX_M, GgufConfig, gguf_linear, select_config)
from servelm.quantization.gguf_formats import (  # noqa: E402
    GGUF_BLOCK_SIZES, gguf_row_bytes, random_gguf_blocks)

DEV = "cuda"
DT = torch.bfloat16
SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096),
          ("down", 4096, 14336)]
FORMATS = {"Q4_0": 2, "Q4_K": 12, "Q6_K": 14, "Q8_0": 8}
MS = [1, 8, 64, 512]
POOL_BYTES = 512 << 20
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def bf16_pool(n, k):
    copies = max(2, math.ceil(POOL_BYTES / (n * k * 2)))
    return [torch.randn(n, k, device=DEV, dtype=DT) * k ** -0.5 for _ in range(copies)]


def gguf_pool(n, k, t):
    raw = random_gguf_blocks(n, k, t, torch.Generator().manual_seed(n + k + t)).to(DEV)
    copies = max(2, math.ceil(POOL_BYTES / raw.numel()))
    return [raw] + [raw.clone() for _ in range(copies - 1)]  # distinct addresses: no L2 reuse


def copy_tbs():
    """Device-to-device copy of 1 GiB, read + write bytes per second (TB/s)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    us = graph_us(lambda w: b.copy_(w), [a], target_ms=20.0)
    return 2 * a.numel() / us / 1e6


def sweep_candidates(m, n, k, t):
    """FMA tiles (M = 1 only: the FMA path streams W once per row) and dot tiles, each dot tile
    also at the split that gives >= 2 programs per SM."""
    qk = GGUF_BLOCK_SIZES[t][0]
    nb = k // qk
    out = []
    if m == 1:
        per = [(4, 512), (4, 1024), (8, 512), (2, 1024), (4, 2048), (8, 1024), (16, 256)]
        out += [GgufConfig(block_n=bn, blocks=max(1, el // qk), num_warps=w)
                for bn, el in per for w in (4, 2, 8)]
    dots = [(64, 256, 4), (64, 128, 4), (128, 128, 8), (128, 256, 8), (32, 256, 2),
            (64, 512, 8), (128, 256, 4), (32, 512, 4)]
    for bn, el, w in dots:
        for stages in (1, 2):
            c = GgufConfig(block_n=bn, blocks=max(1, el // qk), num_warps=w, num_stages=stages,
                           use_dot=True)
            programs = -(-n // bn)
            for split in sorted({1, 2, 4, 8}):
                if split == 1 or programs * split // 2 < 264:
                    out.append(dataclasses.replace(c, split_k=split))
    return [c for c in out if c.blocks <= nb]


def sweep(pools, xs, budget_s):
    """(format, shape, M) -> (best config, us, default us)."""
    best = {}
    deadline = time.time() + budget_s
    for fname, t in FORMATS.items():
        for name, n, k in SHAPES:
            pool = pools[(t, n, k)]
            for m in (1, 8):
                x = xs[(m, k)]
                default = select_config(m, n, k, t)
                res = []
                for cfg in [default] + sweep_candidates(m, n, k, t):
                    if time.time() > deadline:
                        break
                    try:
                        us = graph_us(lambda w, c=cfg: gguf_linear(x, w, t, k, config=c), pool,
                                      target_ms=1.0)
                    except Exception as e:  # e.g. out of shared memory or registers
                        log(f"  ! {fname} {name} M={m} {cfg}: {type(e).__name__}")
                        torch.cuda.synchronize()
                        continue
                    res.append((us, cfg))
                if res:
                    us, cfg = min(res, key=lambda r: r[0])
                    best[(fname, name, m)] = (cfg, us, res[0][0] if res[0][1] == default else None)
                    log(f"sweep {fname} {name} M={m}: best {us:.1f} us "
                        f"(default {res[0][0]:.1f} us) {cfg}")
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fused", action="store_true", help="also time the fused GEMM at M > 16")
    ap.add_argument("--sweep", action="store_true", help="time candidate configs first")
    ap.add_argument("--sweep-budget", type=float, default=900.0, help="seconds for --sweep")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gguf_gemv_bench.py needs a CUDA device")
    torch.manual_seed(0)
    dev_name = torch.cuda.get_device_name()
    log(f"{dev_name}; d2d copy ...")
    copy = copy_tbs()
    log(f"d2d copy: {copy:.2f} TB/s (read + write)")
    xs = {(m, k): torch.randn(m, k, device=DEV, dtype=DT) for m in MS for _, _, k in SHAPES}
    pools = {}
    for t in FORMATS.values():
        for _, n, k in SHAPES:
            pools[(t, n, k)] = gguf_pool(n, k, t)
    best = sweep(pools, xs, args.sweep_budget) if args.sweep else {}

    rows = []  # dicts: shape, M, impl, us, tbs
    for name, n, k in SHAPES:
        wpool = bf16_pool(n, k)
        for m in MS:
            x = xs[(m, k)]
            us = graph_us(lambda w: F.linear(x, w), wpool)
            rows.append(dict(shape=name, n=n, k=k, m=m, impl="bf16", us=us,
                             tbs=n * k * 2 / us / 1e6))
            for fname, t in FORMATS.items():
                pool = pools[(t, n, k)]
                nbytes = n * gguf_row_bytes(t, k)
                cfg = best.get((fname, name, m), (None,))[0] if m <= MAX_M else None
                us = graph_us(lambda w: gguf_linear(x, w, t, k, config=cfg), pool)
                rows.append(dict(shape=name, n=n, k=k, m=m, impl=fname, us=us,
                                 tbs=nbytes / us / 1e6, config=dataclasses.asdict(
                                     cfg or select_config(m, n, k, t)) if m <= MAX_M else None))
                if args.fused and m > MAX_M:
                    fcfg = GgufConfig(block_n=64, blocks=max(1, 64 // GGUF_BLOCK_SIZES[t][0]),
                                      num_warps=8, use_dot=True, block_m=64 if m <= 64 else 128)
                    try:
                        us = graph_us(lambda w: gguf_linear(x, w, t, k, config=fcfg), pool)
                        rows.append(dict(shape=name, n=n, k=k, m=m, impl=fname + " fused",
                                         us=us, tbs=nbytes / us / 1e6))
                    except Exception as e:
                        log(f"  ! fused {fname} {name} M={m}: {type(e).__name__}")
            log(f"{name} M={m} done")
        del wpool
        torch.cuda.empty_cache()

    impls = ["bf16"] + list(FORMATS) + ([f + " fused" for f in FORMATS] if args.fused else [])
    get = {(r["shape"], r["m"], r["impl"]): r for r in rows}
    print(f"\n{dev_name}, bf16 activations; d2d copy {copy:.2f} TB/s (read + write). "
          "Per call: us (TB/s of the weight's stored bytes); x = speedup over bf16.")
    head = f"{'shape':<16}{'M':>4} " + "".join(f"{i:>22}" for i in impls)
    print(head)
    print("-" * len(head))
    for m in MS:
        for name, n, k in SHAPES + [("layer", 0, 0)]:
            cells = []
            for impl in impls:
                if name == "layer":
                    parts = [get.get((s, m, impl)) for s, _, _ in SHAPES]
                    if any(p is None for p in parts):
                        cells.append(f"{'-':>22}")
                        continue
                    us = sum(p["us"] for p in parts)
                    base = sum(get[(s, m, "bf16")]["us"] for s, _, _ in SHAPES)
                    tbs = sum(p["tbs"] * p["us"] for p in parts) / us
                else:
                    r = get.get((name, m, impl))
                    if r is None:
                        cells.append(f"{'-':>22}")
                        continue
                    us, tbs, base = r["us"], r["tbs"], get[(name, m, "bf16")]["us"]
                cell = f"{us:8.1f} ({tbs:4.2f})"
                cell += f" {base / us:4.2f}x" if impl != "bf16" else "      "
                cells.append(f"{cell:>22}")
            label = f"{name} {n}x{k}" if n else "layer (sum)"
            print(f"{label:<16}{m:>4} " + "".join(cells))
        print()
    if best:
        print("sweep winners (format, shape, M): us, default us, config")
        for (fname, name, m), (cfg, us, dus) in best.items():
            d = f"{dus:.1f}" if dus is not None else "-"
            print(f"  {fname:<5} {name:<8} M={m:<3} {us:8.1f} {d:>8}  {cfg}")
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "gguf_gemv_bench.json"), "w") as f:
            json.dump(dict(device=dev_name, copy_tbs=copy, rows=rows, sweep={
                f"{fn},{sh},{m}": dict(config=dataclasses.asdict(c), us=us, default_us=dus)
                for (fn, sh, m), (c, us, dus) in best.items()}), f, indent=1)
    log("done")


if __name__ == "__main__":
    main()
