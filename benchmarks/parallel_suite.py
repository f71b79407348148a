"""Tensor parallelism on the GPUs of one host against one GPU, in the same run, one table.

    python benchmarks/parallel_suite.py [--tp 1 2] [--pp 2] [--repeat 3] [--preset llama-3-8b]
    python benchmarks/parallel_suite.py --offload-gb 8     # one GPU, weights streamed

Llama-3-8B-shaped dummy bf16 weights (``--preset``), random prompt ids, ignore_eos; every
(tensor_parallel_size, run) is a fresh process, the sizes interleaved run by run so drift hits
all alike; each figure is the median over --repeat runs:
  B1 batch-1 decode: 128 prompt tokens, 256 new; tokens 2..256 over their time
  B2 1000 requests of 256 in / 256 out, all at once: req/s
Also the copy bandwidth of GPU 0 and the roofline of B1 at each size: the bytes one rank reads
per token (its shard of every weight but the embedding table) over that bandwidth.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def h2d_bandwidth() -> float:
    """Pinned host -> device copy, bytes per second (median of many)."""
    import torch
    import triton.testing
    x = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
    y = torch.empty_like(x, device="cuda")
    ms = triton.testing.do_bench(lambda: y.copy_(x, non_blocking=True), warmup=5, rep=200,
                                 return_mode="median")
    return x.numel() / (ms / 1e3)


def offload_child(preset: str, gib: float) -> dict:
    """cpu_offload_gb on one GPU: batch-1 decode and a batch of 256, against the bound the
    host-to-device bandwidth sets (offloaded bytes per step / bandwidth)."""
    import torch

    from benchmarks.gpu_suite import random_prompts
    from servelm import LLM, SamplingParams
    from servelm.loader import preset_config
    V = preset_config(preset).vocab_size
    out: dict = {"offload_gb": gib, "h2d_GBps": h2d_bandwidth() / 1e9}
    torch.cuda.empty_cache()
    llm = LLM(preset, load_format="dummy", max_model_len=2048, seed=0, skip_tokenizer_init=True,
              cpu_offload_gb=gib)
    st = llm.engine.core.executor.runner.streamer
    out["offloaded_GB"] = st.host_bytes / 1e9
    bound_steps = out["h2d_GBps"] / out["offloaded_GB"]  # steps per second the bus allows
    b1 = random_prompts(1, [128], 0, V)[0]
    o = llm.generate([b1], SamplingParams(temperature=0, max_tokens=64, ignore_eos=True),
                     use_tqdm=False)[0]
    out["b1_tok_s"] = 63 / (o.metrics.last_token_time - o.metrics.first_token_time)
    prompts = random_prompts(256, [128] * 256, 2, V)
    t = time.perf_counter()
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True),
                 use_tqdm=False)
    out["b256_out_tok_s"] = 256 * 64 / (time.perf_counter() - t)
    out["b1_bound_tok_s"], out["b256_bound_tok_s"] = bound_steps, 256 * bound_steps
    print("RESULT", json.dumps(out), flush=True)
    t = time.perf_counter()
    llm.engine.core.shutdown()
    out["shutdown_s"] = time.perf_counter() - t
    return out


def profile_b2(llm, prompts, tp: int) -> None:
    """torch.profiler over a B2-like batch (600 x 256 in / 64 out) on the driver (rank 0):
    the top operators by device and by host time, written to $OUT/profile_tp{tp}.txt. Where
    rank 0 waits in NCCL for later ranks, the all-reduce kernels' time shows it."""
    from torch.profiler import ProfilerActivity, profile

    from servelm import SamplingParams
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True),
                     use_tqdm=False)
        dt = time.perf_counter() - t
    ka = prof.key_averages()
    text = (f"tp={tp}: {len(prompts)} x 256 in / 64 out in {dt:.2f} s (profiled)\n"
            + ka.table(sort_by="self_cuda_time_total", row_limit=25)
            + ka.table(sort_by="self_cpu_time_total", row_limit=25))
    out_dir = os.environ.get("OUT") or tempfile.gettempdir()
    with open(os.path.join(out_dir, f"profile_tp{tp}.txt"), "w") as f:
        f.write(text)


def child(tp: int, preset: str, num_requests: int, profile: bool = False,
          b2_only: bool = False, pp: int = 1) -> dict:
    import torch

    from benchmarks.gpu_suite import copy_bandwidth, random_prompts, run_offline
    from servelm import LLM, SamplingParams
    from servelm.loader import preset_config
    cfg = preset_config(preset)
    V = cfg.vocab_size
    out: dict = {"tp": tp, "pp": pp, "copy_bw_TBps": copy_bandwidth() / 1e12}
    torch.cuda.empty_cache()
    t = time.perf_counter()
    llm = LLM(preset, load_format="dummy", max_model_len=2048, seed=0, skip_tokenizer_init=True,
              tensor_parallel_size=tp, pipeline_parallel_size=pp)
    out["init_s"] = time.perf_counter() - t
    model = llm.engine.core.executor.runner.model
    params = dict(model.named_parameters())
    out["rank_weight_GB"] = sum(p.numel() * p.element_size() for n, p in params.items()
                                if "embed_tokens" not in n or "lm_head.weight" not in params) / 1e9
    b1 = random_prompts(1, [128], 0, V)[0]
    llm.generate([b1], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                 use_tqdm=False)
    runs = []
    for _ in range(0 if b2_only else 3):
        o = llm.generate([b1], SamplingParams(temperature=0, max_tokens=256, ignore_eos=True),
                         use_tqdm=False)[0]
        runs.append(255 / (o.metrics.last_token_time - o.metrics.first_token_time))
    out["b1_tok_s"] = statistics.median(runs) if runs else float("nan")
    b2 = random_prompts(num_requests, [256] * num_requests, 1, V)
    if profile:
        profile_b2(llm, b2[:600], tp)
    r = run_offline(llm, b2, [256] * num_requests, "B2")
    out["b2_req_s"], out["b2_out_tok_s"] = r["req_s"], r["out_tok_s"]
    out["b2_step_ms"] = r.get("step_ms")
    # printed before shutting down: a result stands even if the teardown hangs (the parent
    # reads it after its timeout)
    print("RESULT", json.dumps(out), flush=True)
    t = time.perf_counter()
    llm.engine.core.shutdown()
    out["shutdown_s"] = time.perf_counter() - t
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--pp", type=int, nargs="*", default=[],
                    help="also these pipeline_parallel_size values (tensor_parallel_size 1)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child-pp", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--child-timeout", type=int, default=600)
    ap.add_argument("--b2-only", action="store_true",
                    help="with --child: skip B1 (for SERVELM_TORCH_PROFILER_STEPS windows "
                         "counted from B2's first step, after one 16-token warm-up request)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile a B2-like batch on rank 0 ($OUT/profile_tp{N}.txt)")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--offload-gb", type=float, default=None,
                    help="instead: one GPU with cpu_offload_gb=N (B1 and a batch of 256 "
                         "against the host-to-device bound)")
    args = ap.parse_args()
    if args.offload_gb is not None:
        r = offload_child(args.preset, args.offload_gb)
        print(f"\n{args.preset}, cpu_offload_gb={args.offload_gb:g} ({r['offloaded_GB']:.1f} GB "
              f"in host memory), host-to-device {r['h2d_GBps']:.1f} GB/s")
        print("| figure | tok/s | bound (bus; decode steps only) | % of bound |\n|---|---|---|---|")
        for name, got, bound in (("batch-1 decode", r["b1_tok_s"], r["b1_bound_tok_s"]),
                                 ("batch of 256, 128 in / 64 out", r["b256_out_tok_s"],
                                  r["b256_bound_tok_s"])):
            print(f"| {name} | {got:.1f} | {bound:.1f} | {100 * got / bound:.0f}% |")
        return
    if args.child is not None:
        r = child(args.child, args.preset, args.num_requests, args.profile, args.b2_only,
                  args.child_pp)
        print(f"engine shut down in {r['shutdown_s']:.1f} s", flush=True)
        return
    # (tensor_parallel_size, pipeline_parallel_size) of each configuration, the first the base
    confs = [(tp, 1) for tp in args.tp] + [(1, pp) for pp in args.pp]
    label = lambda c: f"tp={c[0]}" if c[1] == 1 else f"pp={c[1]}"  # noqa: E731
    runs: dict = {c: [] for c in confs}
    out_dir = os.environ.get("OUT")
    for i in range(args.repeat):
        for c in confs:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", str(c[0]), "--child-pp",
                   str(c[1]), "--preset", args.preset, "--num-requests",
                   str(args.num_requests)] + (["--profile"] if args.profile and i == 0 else [])
            # files, not pipes: a worker process that outlives the child would hold a pipe
            # open, and a result printed before a hang still counts
            with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
                p = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True)
                try:
                    p.wait(args.child_timeout)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                    print(f"{label(c)} run {i}: the process did not exit in "
                          f"{args.child_timeout} s", flush=True)
                fo.seek(0)
                fe.seek(0)
                stdout, stderr = fo.read(), fe.read()
            line = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                print(f"{label(c)} run {i} failed:\n{stdout[-3000:]}\n{stderr[-6000:]}",
                      flush=True)
                continue
            r = json.loads(line[0][7:])
            runs[c].append(r)
            print(f"run {i} {label(c)}: {r}", flush=True)
            if out_dir:
                with open(os.path.join(out_dir, "parallel_suite.json"), "w") as f:
                    json.dump({label(k): v for k, v in runs.items()}, f, indent=2)
    med = lambda c, k: statistics.median(r[k] for r in runs[c]) if runs[c] else float("nan")  # noqa: E731
    base = confs[0]
    print(f"\n{args.preset}, dummy bf16, medians of {args.repeat} fresh runs per configuration")
    print(f"| configuration | B1 tok/s | vs {label(base)} | B1 % of roofline | B2 req/s | "
          f"vs {label(base)} | init s |")
    print("|---|---|---|---|---|---|---|")
    for c in confs:
        # tensor-parallel ranks read their shards at once; stages one after another (no
        # per-rank roofline for B1 there)
        roof = med(c, "copy_bw_TBps") * 1e12 / (med(c, "rank_weight_GB") * 1e9)
        pct = f"{100 * med(c, 'b1_tok_s') / roof:.0f}% of {roof:.0f}" if c[1] == 1 else "-"
        print(f"| {label(c)} | {med(c, 'b1_tok_s'):.1f} | "
              f"{med(c, 'b1_tok_s') / med(base, 'b1_tok_s'):.2f}x | {pct} | "
              f"{med(c, 'b2_req_s'):.2f} | {med(c, 'b2_req_s') / med(base, 'b2_req_s'):.2f}x "
              f"| {med(c, 'init_s'):.0f} |")

if __name__ == "__main__":
    main()
