"""Small-M linear layers on one GPU: cuBLAS (``F.linear``) vs servelm's ``linear_small_m``, for the
Llama-3-8B, Qwen2.5-7B and Llama-3.2-1B matmul shapes at M = 1, 2, 4, 8, 16 (bf16).

    PYTHONPATH=. python benchmarks/gemv_bench.py [--sweep] [--sweep-budget S] [--quick]

Primary times are per call of back-to-back calls replayed from one CUDA graph (as in a decode
step), over weight copies rotated so that each pool is >= 512 MB or one copy is >= 400 MB: HBM, not
L2, is measured. TB/s counts weight bytes. The last two columns are ``triton.testing.do_bench``
medians, kept for reference: do_bench zeroes a 256 MB buffer before each call, so ~50 MB of dirty
L2 lines are written back while the next kernel reads (seen: 23 us for a 4096x4096 cuBLAS call
that takes 15.5 us in a graph), and a Python launch slower than that flush shows up as GPU time.
The stack rows: one Llama-3-8B layer's four matmuls x 32 + lm_head, summed from per-shape times,
and measured as one CUDA graph over 32 layers of distinct weights (15 GB) for cuBLAS, ours, and
"pick" (per shape whichever was faster).

--sweep first times candidate configs for every (shape, M) (CUDA-graph timing) and uses the
best in the table; it prints the winners as a Python literal for servelm/kernels/gemv.py's _TABLE.
Prints a table last; writes JSON to $OUT/gemv_bench.json when OUT is set.
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
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from servelm.kernels.gemv import (  # noqa: E402
    GemvConfig, _heuristic, linear_small_m, select_config)

DEV = "cuda"
DT = torch.bfloat16
MS = [1, 2, 4, 8, 16]
MODELS = {
    "llama3-8b": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096),
                  ("down", 4096, 14336), ("lm_head", 128256, 4096)],
    "qwen2.5-7b": [("qkv", 4608, 3584), ("o", 3584, 3584), ("gate_up", 37888, 3584),
                   ("down", 3584, 18944), ("lm_head", 152064, 3584)],
    "llama3.2-1b": [("qkv", 3072, 2048), ("o", 2048, 2048), ("gate_up", 16384, 2048),
                    ("down", 2048, 8192), ("lm_head", 128256, 2048)],
}
POOL_BYTES = 512 << 20
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def weight_pool(n, k):
    nbytes = n * k * 2
    copies = 1 if nbytes >= (400 << 20) else max(4, math.ceil(POOL_BYTES / nbytes))
    return [torch.randn(n, k, device=DEV, dtype=DT) * (k ** -0.5) for _ in range(copies)]


class Rotor:
    """Calls fn(weights[i]) with i cycling over the pool."""

    def __init__(self, fn, pool):
        self.fn, self.pool, self.i = fn, pool, 0

    def __call__(self):
        w = self.pool[self.i]
        self.i = (self.i + 1) % len(self.pool)
        return self.fn(w)


def bench_ms(fn, pool):
    return do_bench(Rotor(fn, pool), warmup=10, rep=40, return_mode="median")


def graph_ms(fn, pool, target_ms=1.5):
    """Per-call ms of back-to-back calls (rotating over the pool) replayed from one CUDA graph."""
    for w in pool[:2]:
        fn(w)
    torch.cuda.synchronize()
    est_ms = pool[0].numel() * 2 / 2.5e9  # at 2.5 TB/s
    calls = max(len(pool), math.ceil(target_ms / est_ms))
    calls = math.ceil(calls / len(pool)) * len(pool)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(pool[i % len(pool)])
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / calls)
    del g
    return statistics.median(times)


def candidates(m, n, k):
    """Configs for the sweep: FMA tiles for M <= 4 (with shared-memory stages or straight to
    registers), dot tiles (x @ W.T, or W @ x.T on wgmma) for M >= 2, dot tiles also at the split
    that gives >= 2 programs per SM."""
    bm = triton.next_power_of_2(m)
    # (block_n, block_k, num_warps, num_stages)
    fma = {1: [(8, 512, 4, 3), (4, 512, 4, 1), (8, 512, 4, 5), (16, 512, 4, 3), (8, 1024, 4, 3),
               (4, 1024, 4, 4), (16, 1024, 8, 3), (8, 512, 4, 1), (16, 256, 4, 4),
               (8, 1024, 4, 1), (4, 512, 4, 3), (4, 1024, 4, 1), (8, 256, 4, 3),
               (4, 2048, 4, 3), (8, 512, 4, 4), (8, 1024, 8, 4)],
           2: [(4, 512, 4, 3), (8, 256, 4, 1), (8, 512, 4, 3), (8, 1024, 8, 3), (8, 512, 4, 1),
               (4, 1024, 4, 3), (4, 512, 4, 1), (8, 256, 4, 3), (4, 512, 4, 4)],
           4: [(8, 256, 4, 3), (4, 512, 4, 3), (4, 256, 4, 3), (8, 512, 8, 3), (4, 1024, 8, 3),
               (4, 512, 4, 1), (8, 256, 4, 4)]}.get(bm, [])
    dot = [(64, 256, 8, 3), (128, 128, 8, 3), (32, 256, 4, 4), (64, 128, 4, 4), (32, 128, 4, 5),
           (32, 512, 8, 3), (16, 512, 4, 3), (32, 256, 4, 6), (64, 256, 8, 4)] if m > 1 else []
    swap = [(64, 128, 4, 4), (64, 256, 8, 3), (128, 128, 8, 3), (64, 128, 4, 6),
            (128, 128, 4, 3), (64, 64, 4, 6), (128, 64, 4, 4)] if m > 1 else []
    out = [GemvConfig(bn, bk, w, s) for bn, bk, w, s in fma]
    for tiles, sw in ((dot, False), (swap, True)):
        for bn, bk, w, s in tiles:
            c = GemvConfig(bn, bk, w, s, use_dot=True, swap_ab=sw)
            out.append(c)
            programs = triton.cdiv(n, bn)
            split = 1
            while programs * split < 264 and k // (2 * split) >= 1024 and split < 8:
                split *= 2
            if split > 1:
                out.append(dataclasses.replace(c, split_k=split))
    return [c for c in out if c.block_k <= triton.next_power_of_2(k)]


def sweep_point(m, n, k, pool, x, deadline):
    """Times the candidates; returns (best config, best ms, all results)."""
    results = []

    def run(cfg):
        try:
            t = graph_ms(lambda w: linear_small_m(x, w, config=cfg), pool)
        except Exception as e:  # e.g. a tile over the shared-memory limit
            log(f"  ! {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
            torch.cuda.synchronize()
            return
        results.append((t, cfg))

    for cfg in candidates(m, n, k):
        if time.time() > deadline:
            break
        run(cfg)
    if not results:
        return None, None, []
    best = min(results, key=lambda r: r[0])[1]
    # phase 2: the best tile at other splits, partial buffer vs fp32 atomics
    tried = {c for _, c in results}
    for split in (1, 2, 4, 8):
        for atomic in (False, True):
            if time.time() > deadline or (split == 1 and atomic):
                continue
            c = dataclasses.replace(best, split_k=split, atomic=atomic)
            if c not in tried and triton.cdiv(k, c.block_k) >= split:
                run(c)
    t, best = min(results, key=lambda r: r[0])
    return best, t, [(tt, dataclasses.asdict(c))
                     for tt, c in sorted(results, key=lambda r: r[0])]


def stack_graph_ms(m, impl, configs, pick=None):
    """One CUDA graph over 32 Llama-3-8B layers of distinct weights + lm_head at M=m.
    impl: "cublas", "ours", or "pick" (pick[(n, k)] says which one per shape)."""
    shapes = MODELS["llama3-8b"]
    layers = [[torch.randn(n, k, device=DEV, dtype=DT) for _, n, k in shapes[:4]]
              for _ in range(32)]
    lm = torch.randn(shapes[4][1], shapes[4][2], device=DEV, dtype=DT)
    xs = {k: torch.randn(m, k, device=DEV, dtype=DT) for _, _, k in shapes}

    def lin(w):
        n, k = w.shape
        if impl == "cublas" or (impl == "pick" and pick[(n, k)] == "cublas"):
            return F.linear(xs[k], w)
        return linear_small_m(xs[k], w, config=configs.get((m, n, k)))

    def step():
        for ws in layers:
            for w in ws:
                lin(w)
        lin(lm)

    step()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    del g, layers, lm
    torch.cuda.empty_cache()
    return statistics.median(times)


def copy_tbs():
    a = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=10, rep=50, return_mode="median")
    return 2 * a.numel() / ms / 1e9


def _best_json(best):
    return {f"{m},{n},{k}": dataclasses.asdict(c) for (m, n, k), c in best.items()}


def dump_json(name, obj):
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(obj, f, indent=1)


def config_literal(c: GemvConfig) -> str:
    """``_C(block_n, block_k, num_warps, num_stages[, use_dot][, keyword=...])``"""
    args = [str(c.block_n), str(c.block_k), str(c.num_warps), str(c.num_stages)]
    if c.use_dot:
        args.append("True")
    args += [f"{f}={getattr(c, f)!r}" for f in ("split_k", "atomic", "swap_ab")
             if getattr(c, f) != getattr(GemvConfig(1, 1), f)]
    return f"_C({', '.join(args)})"


def print_table_literal(best):
    """The sweep's winners as the _TABLE literal of servelm/kernels/gemv.py."""
    table = {}
    for (m, n, k), c in sorted(best.items(), key=lambda t: (t[0][1], t[0][2], t[0][0])):
        table.setdefault((n, k), {})[m] = c
    print("\n# proposed _TABLE for servelm/kernels/gemv.py")
    print("_TABLE = {")
    for (n, k), row in table.items():
        print(f"    ({n}, {k}): {{")
        print("".join(f"        {b}: {config_literal(c)},\n" for b, c in sorted(row.items())),
              end="")
        print("    },")
    print("}", flush=True)


def cfg_str(c: GemvConfig) -> str:
    s = f"{'dot' if c.use_dot else 'fma'} {c.block_n}x{c.block_k} w{c.num_warps} s{c.num_stages}"
    if c.split_k > 1:
        s += f" sk{c.split_k}{'a' if c.atomic else ''}"
    return s + (" swap" if c.swap_ab else "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-budget", type=float, default=170.0, help="seconds")
    ap.add_argument("--quick", action="store_true", help="Llama-3-8B only")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev_name = torch.cuda.get_device_name()
    log(dev_name, "torch", torch.__version__, "triton", triton.__version__)
    copy = copy_tbs()
    log(f"device-to-device copy: {copy:.2f} TB/s (read + write)")
    models = {"llama3-8b": MODELS["llama3-8b"]} if args.quick else MODELS

    # the sweep, M-major so that a budget cut loses the least used batch sizes
    best: dict[tuple[int, int, int], GemvConfig] = {}
    sweep_log = {}
    if args.sweep:
        deadline = time.time() + args.sweep_budget
        pools = {}
        for m in (1, 8, 4, 2, 16):
            for model, shapes in models.items():
                for name, n, k in shapes:
                    if time.time() > deadline:
                        break
                    if (n, k) not in pools:
                        pools.clear()
                        torch.cuda.empty_cache()
                        pools[(n, k)] = weight_pool(n, k)
                    if (m, n, k) in best:
                        continue
                    x = torch.randn(m, k, device=DEV, dtype=DT)
                    cfg, t, res = sweep_point(m, n, k, pools[(n, k)], x, deadline)
                    if cfg is None:
                        continue
                    best[(m, n, k)] = cfg
                    sweep_log[f"{m},{n},{k}"] = res
                    dump_json("gemv_sweep.json", dict(sweep=sweep_log, best=_best_json(best)))
                    log(f"sweep M={m:2d} {model:11s} {name:8s} {n}x{k}: {t * 1e3:7.1f} us "
                        f"({n * k * 2 / t / 1e9:.2f} TB/s) {cfg_str(cfg)}; "
                        f"heuristic {cfg_str(_heuristic(m, n, k))}")
        pools.clear()
        torch.cuda.empty_cache()
        log(f"sweep done: {len(best)} points")
        print_table_literal(best)

    rows = []
    for model, shapes in models.items():
        for name, n, k in shapes:
            pool = weight_pool(n, k)
            gb = n * k * 2 / 1e9
            for m in MS:
                x = torch.randn(m, k, device=DEV, dtype=DT)
                cfg = best.get((m, n, k)) or select_config(m, n, k, DT)
                ours = lambda w, x=x, cfg=cfg: linear_small_m(x, w, config=cfg)  # noqa: E731
                ref = lambda w, x=x: F.linear(x, w)  # noqa: E731
                err = ((ours(pool[0]).float() - ref(pool[0]).float()).norm()
                       / ref(pool[0]).float().norm()).item()
                t_cb, t_us = bench_ms(ref, pool), bench_ms(ours, pool)
                g_cb, g_us = graph_ms(ref, pool), graph_ms(ours, pool)
                rows.append(dict(model=model, name=name, n=n, k=k, m=m, cublas_ms=t_cb,
                                 ours_ms=t_us, cublas_graph_ms=g_cb, ours_graph_ms=g_us,
                                 cublas_tbs=gb / t_cb, ours_tbs=gb / t_us,
                                 speedup=t_cb / t_us, rel_err_vs_cublas=err,
                                 config=dataclasses.asdict(cfg)))
                log(f"{model:11s} {name:8s} M={m:2d} cuBLAS {t_cb * 1e3:7.1f} us "
                    f"{gb / t_cb:5.2f} TB/s | ours {t_us * 1e3:7.1f} us {gb / t_us:5.2f} TB/s "
                    f"x{t_cb / t_us:4.2f} | graph {g_cb * 1e3:7.1f} / {g_us * 1e3:7.1f} us "
                    f"| {cfg_str(cfg)} err {err:.1e}")
            del pool
            torch.cuda.empty_cache()

    # whole Llama-3-8B stack at M=1 and 8: sums of per-shape times, and one measured graph
    stack = {}
    for m in (1, 8):
        by = {r["name"]: r for r in rows if r["model"] == "llama3-8b" and r["m"] == m}
        if len(by) < 5:
            continue
        s = {}
        for impl in ("cublas", "ours"):
            for kind, key in (("sum", f"{impl}_graph_ms"), ("bench_sum", f"{impl}_ms")):
                layer = sum(by[nm][key] for nm in ("qkv", "o", "gate_up", "down"))
                s[f"{impl}_{kind}_ms"] = 32 * layer + by["lm_head"][key]
        pick = {(r["n"], r["k"]): "ours" if r["ours_graph_ms"] < r["cublas_graph_ms"] else "cublas"
                for r in by.values()}
        s["pick"] = {f"{n}x{k}": v for (n, k), v in pick.items()}
        for impl in ("cublas", "ours", "pick"):
            try:
                s[f"{impl}_graph_ms"] = stack_graph_ms(m, impl, best, pick)
            except Exception as e:  # e.g. out of memory
                log(f"stack graph {impl} M={m}: {type(e).__name__}: {e}")
                torch.cuda.empty_cache()
        stack[m] = s
        log(f"stack M={m}: {s}")

    dump_json("gemv_bench.json", dict(device=dev_name, copy_tbs=copy, rows=rows,
                                      stack={str(k): v for k, v in stack.items()},
                                      sweep=sweep_log, best=_best_json(best)))

    print(f"\n{dev_name}; copy {copy:.2f} TB/s; bf16. Per-call us of back-to-back calls in a CUDA "
          f"graph (weights rotated, HBM-bound), TB/s of weight bytes; x = cuBLAS / ours; "
          f"do_bench medians (L2 flushed, launch overhead) last")
    print(f"{'model':10s} {'mat':7s} {'NxK':12s} {'M':>2s} {'cuBLAS':>7s} {'TB/s':>5s} "
          f"{'ours':>7s} {'TB/s':>5s} {'x':>5s} {'db-cuB':>7s} {'db-our':>7s}  config")
    for r in rows:
        gb = r["n"] * r["k"] * 2 / 1e9
        print(f"{r['model'][:10]:10s} {r['name']:7s} {r['n']:>6d}x{r['k']:<5d} {r['m']:>2d} "
              f"{r['cublas_graph_ms'] * 1e3:7.1f} {gb / r['cublas_graph_ms']:5.2f} "
              f"{r['ours_graph_ms'] * 1e3:7.1f} {gb / r['ours_graph_ms']:5.2f} "
              f"{r['cublas_graph_ms'] / r['ours_graph_ms']:5.2f} {r['cublas_ms'] * 1e3:7.1f} "
              f"{r['ours_ms'] * 1e3:7.1f}  {cfg_str(GemvConfig(**r['config']))}")
    for m, s in stack.items():
        print(f"Llama-3-8B matmuls (32 layers x 4 + lm_head), M={m}, ms and tok/s:")
        for impl in ("cublas", "ours", "pick"):
            parts = [f"{kind} {s[f'{impl}_{kind}_ms']:.2f} ms = "
                     f"{1e3 / s[f'{impl}_{kind}_ms']:.0f} tok/s"
                     for kind in ("graph", "sum", "bench_sum") if f"{impl}_{kind}_ms" in s]
            print(f"  {impl:6s}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
