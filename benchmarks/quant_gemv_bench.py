"""Quantized linear layers on one GPU: bf16 cuBLAS (F.linear), servelm's bf16 GEMV
(linear_small_m, M <= 16), and servelm/kernels/quant_matmul.py's int4 (G=128), int8 (G=128) and
fp8 kernels, with torch._scaled_mm (row-wise fp8, x already quantized) for reference, on the
Llama-3-8B matmul shapes at M = 1, 4, 8, 16, 64, 512.

    PYTHONPATH=. python benchmarks/quant_gemv_bench.py [--check] [--sweep] [--sweep-budget S]

Times are per call of back-to-back calls replayed from one CUDA graph (cuda events, median of
5 replays), rotating over weight copies so that each pool is >= 512 MB or one copy is >= 400 MB:
HBM, not L2, is measured. TB/s counts the weights' stored bytes (packed weights + scales + zeros).
The device-to-device copy bandwidth (bytes read + written) is measured in the same run. fp8 is
the whole fp8_linear (x's quantization kernel + GEMV, or + _scaled_mm at M > 16); "scaled_mm" is
torch._scaled_mm alone on an already quantized x. The whole default run takes about 2-3 minutes
(most of it compiling kernels on a cold Triton cache).

--check compares every kernel with the reference of servelm/quantization/ref.py on these shapes
(relative norm error; the bound is the unit tests' bf16 tolerance) and exits non-zero on a miss.
--sweep times candidate small-M configs per (format, shape, M <= 16) and prints the winners next
to select_gemv_config's choice (the configs are untuned heuristics). Writes JSON to
$OUT/quant_gemv_bench.json when OUT is set.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from servelm.kernels import quant_matmul as qm  # noqa: E402
from servelm.kernels.gemv import linear_small_m  # noqa: E402
from servelm.quantization import ref  # noqa: E402

DEV = "cuda"
DT = torch.bfloat16
G = 128
MS = [1, 4, 8, 16, 64, 512]
SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096),
          ("down", 4096, 14336), ("lm_head", 128256, 4096)]
IMPLS = ["bf16", "gemv", "int4", "int8", "fp8", "scaled_mm"]
FORMAT = {"bf16": "bf16", "gemv": "bf16", "int4": "int4", "int8": "int8", "fp8": "fp8",
          "scaled_mm": "fp8"}
POOL_BYTES = 512 << 20
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def quantized(fmt: str, w: torch.Tensor) -> tuple:
    """w: [N, K] bf16 -> the tensors the format's kernel takes (after x)."""
    if fmt == "bf16":
        return (w,)
    if fmt == "int4":
        return ref.quantize_int4(w, G)
    if fmt == "int8":
        return ref.quantize_int8(w, G)
    return ref.quantize_fp8_per_channel(w)


def weight_pool(fmt: str, w: torch.Tensor) -> list[tuple]:
    """Copies of one quantized weight: >= 512 MB in all, or one copy of >= 400 MB."""
    first = quantized(fmt, w)
    size = nbytes(first)
    copies = 1 if size >= (400 << 20) else max(2, math.ceil(POOL_BYTES / size))
    return [first] + [tuple(t.clone() for t in first) for _ in range(copies - 1)]


def graph_us(fn, pool, target_ms: float = 2.0, reps: int = 5) -> float:
    """Per-call us of back-to-back fn(weights) calls (rotating over the pool) in one CUDA graph."""
    for w in pool[:2]:
        fn(w)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for i in range(len(pool)):
        fn(pool[i])
    e.record()
    torch.cuda.synchronize()
    est_ms = max(s.elapsed_time(e) / len(pool), 1e-3)  # eager (launch-bound): an upper bound
    calls = max(len(pool), 100, math.ceil(target_ms / est_ms))
    calls = min(math.ceil(calls / len(pool)) * len(pool), 4000)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(pool[i % len(pool)])
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / calls)
    del g
    return statistics.median(times)


def copy_tbs() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    b.copy_(a)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(7):
        s.record()
        for _ in range(4):
            b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 4)
    return 2 * a.numel() / statistics.median(times) / 1e9


def impl_fn(impl: str, x: torch.Tensor, config=None):
    """-> fn(weights tuple) for one implementation, or None where it does not apply."""
    m = x.shape[0]
    if impl == "bf16":
        return lambda w: F.linear(x, w[0])
    if impl == "gemv":
        return (lambda w: linear_small_m(x, w[0])) if m <= qm.MAX_M else None
    if impl == "int4":
        return lambda w: qm.int4_linear(x, *w, G, config=config)
    if impl == "int8":
        return lambda w: qm.int8_linear(x, *w, G, config=config)
    if impl == "fp8":
        return lambda w: qm.fp8_linear(x, *w, config=config)
    if impl == "scaled_mm":
        xq, xs = qm.fp8_quantize_per_token(x)
        xs = xs.view(m, 1)
        return lambda w: torch._scaled_mm(xq, w[0].t(), scale_a=xs, scale_b=w[1].view(1, -1),
                                          out_dtype=x.dtype)
    raise KeyError(impl)


def reference(fmt: str, x: torch.Tensor, w: tuple) -> torch.Tensor:
    """fp32 result with ref.py's semantics."""
    if fmt == "int4":
        return x.float() @ ref.dequantize_int4(*w, G).float().t()
    if fmt == "int8":
        return x.float() @ ref.dequantize_int8(*w, G).float().t()
    xq, xs = ref.quantize_fp8_per_token(x)
    return (xq.float() @ w[0].float().t()) * xs[:, None] * w[1][None, :]


def run_check() -> bool:
    """Every kernel vs the reference on the benchmark shapes; True when all are within 1e-2."""
    ok = True
    for name, n, k in SHAPES:
        w = torch.randn(n, k, device=DEV, dtype=DT) * k ** -0.5
        for fmt in ("int4", "int8", "fp8"):
            wq = quantized(fmt, w)
            errs = []
            for m in MS:
                x = torch.randn(m, k, device=DEV, dtype=DT)
                out = impl_fn(fmt, x)(wq).float()
                want = reference(fmt, x, wq)
                err = ((out - want).norm() / want.norm()).item()
                finite = bool(torch.isfinite(out).all())
                ok &= finite and err < 1e-2
                errs.append(f"M={m}:{err:.1e}" + ("" if finite else "(non-finite)"))
            log(f"check {name:8s} {n}x{k} {fmt}: " + " ".join(errs))
            del wq
        del w
        torch.cuda.empty_cache()
    log("check", "passed" if ok else "FAILED")
    return ok


def sweep_candidates(fmt: str, m: int, n: int, k: int) -> list:
    """Small-M configs to time: FMA tiles (M = 1, and M = 2 for int4/fp8), dot tiles; each at
    split 1 and at the heuristic's split."""
    C = qm.QGemvConfig
    fma = {"int4": [(16, 1024, 4, 3), (16, 512, 4, 4), (32, 512, 4, 3), (32, 256, 4, 4),
                    (8, 1024, 4, 3), (64, 256, 4, 3)],
           "int8": [(8, 1024, 4, 3), (4, 1024, 4, 3), (8, 512, 4, 4), (16, 512, 4, 3),
                    (4, 2048, 4, 3)],
           "fp8": [(8, 1024, 4, 3), (4, 2048, 4, 3), (8, 2048, 4, 3), (16, 512, 4, 3),
                   (4, 1024, 4, 1), (16, 1024, 8, 3)]}[fmt]
    dot = {"int4": [(128, 128, 4, 4, True), (64, 128, 4, 4, True), (128, 128, 8, 3, True),
                    (64, 128, 4, 6, True), (64, 128, 4, 4, False), (128, 64, 4, 6, True)],
           "int8": [(64, 128, 4, 4, True), (128, 128, 4, 4, True), (64, 128, 4, 6, True),
                    (32, 128, 4, 4, False), (128, 128, 8, 3, True)],
           "fp8": [(64, 256, 4, 4, True), (128, 256, 8, 3, True), (64, 128, 4, 6, True),
                   (32, 256, 4, 4, False), (64, 512, 4, 3, True), (128, 128, 4, 4, True)]}[fmt]
    out = []
    if m == 1 or (m == 2 and fmt != "int8"):
        out += [C(bn, bk, w, s) for bn, bk, w, s in fma]
    out += [C(bn, bk, w, s, use_dot=True, swap_ab=sw) for bn, bk, w, s, sw in dot]
    res = []
    for c in out:
        target = (2 if c.use_dot else 1) * qm.NUM_SMS
        split = qm._split(math.ceil(n / c.block_n), k, c.block_k, target)
        res += [c] + ([dataclasses.replace(c, split_k=split)] if split > 1 else [])
    return res


def run_sweep(budget_s: float) -> dict:
    deadline = time.time() + budget_s
    best = {}
    for m in (1, 8, 4, 16):  # most used first: a budget cut loses the least
        for name, n, k in SHAPES:
            w = torch.randn(n, k, device=DEV, dtype=DT) * k ** -0.5
            for fmt in ("int4", "int8", "fp8"):
                if time.time() > deadline:
                    break
                pool = weight_pool(fmt, w)
                x = torch.randn(m, k, device=DEV, dtype=DT)
                default = qm.select_gemv_config(fmt, m, n, k, G)
                results = []
                for cfg in [default] + sweep_candidates(fmt, m, n, k):
                    if time.time() > deadline:
                        break
                    try:
                        results.append((graph_us(impl_fn(fmt, x, cfg), pool), cfg))
                    except Exception as e:  # e.g. shared memory over the limit
                        log(f"  ! {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
                        torch.cuda.synchronize()
                if results:
                    t, cfg = min(results, key=lambda r: r[0])
                    gb = nbytes(pool[0]) / 1e9
                    best[f"{fmt},{m},{n},{k}"] = dict(us=t, config=dataclasses.asdict(cfg),
                                                      default_us=results[0][0])
                    log(f"sweep {fmt} M={m:2d} {name:8s}: best {t:7.1f} us "
                        f"({gb / t * 1e6 / 1e3:.2f} TB/s) {cfg}; default {results[0][0]:7.1f} us")
                del pool
            del w
            torch.cuda.empty_cache()
    return best


def dump_json(obj):
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "quant_gemv_bench.json"), "w") as f:
            json.dump(obj, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="compare with the references and exit")
    ap.add_argument("--sweep", action="store_true", help="time candidate small-M configs first")
    ap.add_argument("--sweep-budget", type=float, default=150.0, help="seconds")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev_name = torch.cuda.get_device_name()
    log(dev_name, "torch", torch.__version__)
    if args.check:
        sys.exit(0 if run_check() else 1)
    copy = copy_tbs()
    log(f"device-to-device copy: {copy:.2f} TB/s (read + write)")
    sweep = run_sweep(args.sweep_budget) if args.sweep else {}

    # compile every kernel first (cold Triton caches take most of the run)
    layers = [(fmt, n, k, G) for _, n, k in SHAPES for fmt in ("int4", "int8", "fp8")]
    qm.warmup_quant_matmul(layers, DT, DEV, large_ms=[m for m in MS if m > qm.MAX_M])
    log("kernels compiled")

    rows = []
    for name, n, k in SHAPES:
        w = torch.randn(n, k, device=DEV, dtype=DT) * k ** -0.5
        pools = {fmt: weight_pool(fmt, w) for fmt in ("bf16", "int4", "int8", "fp8")}
        del w
        for m in MS:
            x = torch.randn(m, k, device=DEV, dtype=DT)
            row = dict(name=name, n=n, k=k, m=m)
            for impl in IMPLS:
                fn = impl_fn(impl, x)
                if fn is None:
                    continue
                pool = pools[FORMAT[impl]]
                us = graph_us(fn, pool)
                row[impl] = dict(us=us, tbs=nbytes(pool[0]) / us / 1e6)
            rows.append(row)
            log(f"{name:8s} M={m:3d} " + " ".join(
                f"{impl} {row[impl]['us']:.1f}us/{row[impl]['tbs']:.2f}" for impl in IMPLS
                if impl in row))
        del pools
        torch.cuda.empty_cache()

    dump_json(dict(device=dev_name, copy_tbs=copy, rows=rows, sweep=sweep))
    print(f"\n{dev_name}; device-to-device copy {copy:.2f} TB/s. Per call: us / TB/s of stored "
          f"weight bytes (incl. scales, zeros), back-to-back calls in a CUDA graph. int4/int8: "
          f"G={G}; fp8 includes x's quantization; scaled_mm: x pre-quantized.")
    head = f"{'mat':8s} {'NxK':>12s} {'M':>4s}"
    for impl in IMPLS:
        head += f" {impl:>15s}"
    print(head)
    for r in rows:
        line = f"{r['name']:8s} {r['n']:>6d}x{r['k']:<5d} {r['m']:>4d}"
        for impl in IMPLS:
            line += (f" {r[impl]['us']:8.1f}/{r[impl]['tbs']:5.2f}" if impl in r
                     else f" {'-':>15s}")
        print(line)
    # per M: one Llama-3-8B layer's four matmuls x 32 + lm_head, from the per-shape times
    print("Llama-3-8B matmuls (32 layers x 4 + lm_head), summed per-call times, ms:")
    for m in MS:
        by = {r["name"]: r for r in rows if r["m"] == m}
        parts = []
        for impl in IMPLS:
            if all(impl in by[nm] for nm, _, _ in SHAPES):
                total = 32 * sum(by[nm][impl]["us"] for nm in ("qkv", "o", "gate_up", "down"))
                parts.append(f"{impl} {(total + by['lm_head'][impl]['us']) / 1e3:.2f}")
        print(f"  M={m:3d}: " + ", ".join(parts))


if __name__ == "__main__":
    main()
