"""All-reduce latency on the GPUs of one host: NCCL against the one-shot peer-memory all-reduce
(servelm/distributed/one_shot.py), eager and inside a CUDA graph, over the sizes that tensor-
parallel decode (one step's hidden states) and prefill produce. One table; medians of --runs.

    python benchmarks/allreduce_bench.py [--world-size 2] [--runs 5]

Per-call time: a loop of N calls (eager: launched from Python; graph: N calls captured in one
graph, replayed) timed with CUDA events, divided by N. Also checks the one-shot sums against
NCCL's on random data at each size.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZES_KIB = [8, 16, 64, 256, 512, 1024, 4096]
CALLS = 50


def _time(fn, runs: int) -> float:
    """Median over ``runs`` of the per-call microseconds of fn() (which makes CALLS calls)."""
    import torch
    fn()  # warm
    torch.cuda.synchronize()
    out = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) * 1e3 / CALLS)
    return statistics.median(out)


def _graph(step, x):
    """A CUDA graph of CALLS calls of step(x) (warmed on a side stream first)."""
    import torch
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(x)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(CALLS):
            step(x)
    return g


def _rank(rank: int, ws: int, port: int, runs: int, queue) -> None:
    import dataclasses

    import torch

    from servelm.config import ParallelConfig
    from servelm.distributed.init import close_group, make_groups, make_store
    from servelm.distributed.one_shot import OneShotAllReduce
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    store = make_store("127.0.0.1", port, ws, rank)
    groups = make_groups(store, rank, ParallelConfig(tensor_parallel_size=ws), f"cuda:{rank}")
    g = groups.tp
    # a one-shot buffer large enough for every size here (the engine's keeps its default)
    import torch.distributed as dist
    big = OneShotAllReduce(dist.PrefixStore("bench", store), rank, ws, device, g.group,
                           max(SIZES_KIB) * 1024)
    one_shot = dataclasses.replace(g, one_shot=big)
    nccl = dataclasses.replace(g, one_shot=None)
    rows = []
    for kib in SIZES_KIB:
        torch.manual_seed(kib * 10 + rank)
        x = torch.randn(kib * 1024 // 2, dtype=torch.bfloat16, device=device)
        ref = nccl.all_reduce(x.clone())
        assert torch.equal(one_shot.all_reduce(x), ref), f"one-shot sum differs at {kib} KiB"
        row = {"KiB": kib}
        for name, grp in (("nccl", nccl), ("one_shot", one_shot)):
            def eager(grp=grp):
                for _ in range(CALLS):
                    grp.all_reduce(x)
            row[f"{name}_eager_us"] = _time(eager, runs)
            graph = _graph(grp.all_reduce, x)
            row[f"{name}_graph_us"] = _time(graph.replay, runs)
            del graph
        rows.append(row)
    torch.cuda.synchronize()
    if rank == 0:
        queue.put(rows)
    big.close()
    for grp in groups.distinct():
        close_group(grp)


def main() -> None:
    import torch
    import torch.multiprocessing as mp

    from servelm.distributed.init import free_port
    ap = argparse.ArgumentParser()
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    ws = args.world_size
    if torch.cuda.device_count() < ws:
        raise SystemExit(f"needs {ws} GPUs, found {torch.cuda.device_count()}")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, ws, port, args.runs, queue)) for r in range(ws)]
    for p in procs:
        p.start()
    rows = queue.get(timeout=600)
    for p in procs:
        p.join(60)
        if p.is_alive():
            p.kill()
    print(f"\nall-reduce of bf16 on {ws} GPUs, us per call (median of {args.runs} loops of "
          f"{CALLS} calls)")
    print("| size KiB | NCCL eager | NCCL in graph | one-shot eager | one-shot in graph |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['KiB']} | {r['nccl_eager_us']:.1f} | {r['nccl_graph_us']:.1f} | "
              f"{r['one_shot_eager_us']:.1f} | {r['one_shot_graph_us']:.1f} |")


if __name__ == "__main__":
    main()
