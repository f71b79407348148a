"""servelm on the CPU side by side with llama.cpp's own programs, on the embedded
SmolLM2-135M-Instruct GGUF (Q4_1, the same file for both), the same thread count, one table.

    python benchmarks/cpu_suite.py [--runs 3] [--threads N] [--serve-runs 1] [--skip-serve]

llama.cpp is built by benchmarks/llamacpp_build.py from the sources inside the llama-cpp-python
sdist (the only download). Every figure is the median of --runs fresh runs (a new process each):

* batch-1 decode: servelm generates 128 tokens after a 16-token prompt (tokens 2..128 over
  their time); llama.cpp: ``llama-bench`` tg128.
* prefill: one 512-token prompt (servelm: its time to the first token); ``llama-bench`` pp512.
* 64 sequences: 64 prompts of 64 tokens, 128 new tokens each, all at once; servelm's offline
  output tok/s (wall clock, prefill included) against ``llama-batched-bench`` -npp 64 -ntg 128
  -npl 64 (its 64 x 128 tokens over its total time).
* serving: ``servelm bench serve`` (sharegpt-like, 200 prompts, ignore_eos and an EOS
  logit_bias, so both servers generate the same lengths; seed 0 at rate 2, then seed 1
  unlimited, so no prompt is served twice) against ``servelm serve`` and ``llama-server -np 64
  -cb``, a fresh server for each run; the bench JSON files go to --out-dir.
* resident memory of each server after its runs.

With --num-scheduler-steps N (> 1) the batch-1 and 64-sequence rows are measured again with
servelm's multi-step scheduling (one schedule, N passes of the C decode step), as extra rows
against the same llama.cpp runs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HERE = os.path.dirname(os.path.abspath(__file__))

from benchmarks.online_bench import wait_ready  # noqa: E402
from tests.e2e.server_utils import free_port, rss_mb  # noqa: E402


# ---- servelm, one measurement per fresh process ------------------------------------------------
def servelm_child(kind: str, threads: int | None, steps: int = 1) -> float:
    import torch

    from servelm import LLM, SamplingParams
    llm = LLM(kv_cache_memory=2 << 30, threads=threads, num_scheduler_steps=steps)
    g = torch.Generator().manual_seed(int(time.time() * 1e6) % 2**31)  # no prefix-cache hits
    rand = lambda n: torch.randint(100, 40000, (n,), generator=g).tolist()  # noqa: E731
    warm = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm.generate([rand(16)], warm, use_tqdm=False)
    if kind == "decode":
        o = llm.generate([rand(16)], SamplingParams(temperature=0, max_tokens=128, ignore_eos=True),
                         use_tqdm=False)[0]
        return 127 / (o.metrics.last_token_time - o.metrics.first_token_time)
    if kind == "prefill":
        llm.generate([rand(512)], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
        t = time.perf_counter()
        llm.generate([rand(512)], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
        return 512 / (time.perf_counter() - t)
    if kind == "batch64":
        prompts = [rand(64) for _ in range(64)]
        t = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=128, ignore_eos=True),
                            use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)
    raise ValueError(kind)


def servelm_runs(kind: str, runs: int, threads: int, steps: int = 1) -> list[float]:
    out = []
    for _ in range(runs):
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind,
                            "--threads", str(threads), "--num-scheduler-steps", str(steps)],
                           capture_output=True, text=True)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            raise RuntimeError(f"servelm {kind} run failed:\n{p.stdout[-1500:]}\n{p.stderr[-3000:]}")
        out.append(float(line[0].split()[1]))
    return out


# ---- llama.cpp ---------------------------------------------------------------------------------
def llama_bench_runs(bin_dir: str, model: str, runs: int, threads: int) -> tuple[list, list]:
    tg, pp = [], []
    for _ in range(runs):
        p = subprocess.run([os.path.join(bin_dir, "llama-bench"), "-m", model, "-t", str(threads),
                            "-p", "512", "-n", "128", "-r", "1", "-o", "json"],
                           capture_output=True, text=True, check=True)
        for row in json.loads(p.stdout):
            (pp if row["n_prompt"] else tg).append(row["avg_ts"])
    return tg, pp


def llama_batched_runs(bin_dir: str, model: str, runs: int, threads: int) -> list[float]:
    out = []
    for _ in range(runs):
        p = subprocess.run([os.path.join(bin_dir, "llama-batched-bench"), "-m", model,
                            "-c", "16384", "-b", "2048", "-ub", "512", "-npp", "64", "-ntg", "128",
                            "-npl", "64", "-t", str(threads)], capture_output=True, text=True,
                           check=True)
        rows = [r for r in p.stdout.splitlines() if re.match(r"^\|\s+64 \|\s+128 \|\s+64 \|", r)]
        total_s = float(rows[0].split("|")[9])  # T s: prompt processing and generation
        out.append(64 * 128 / total_s)
    return out


# ---- serving -----------------------------------------------------------------------------------
def _rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (servelm serve: API + engine core)."""
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    total = 0.0
    for p in [pid, *map(int, kids)]:
        try:
            total += rss_mb(p)
        except (OSError, RuntimeError):  # a child that just exited
            pass
    return total


def bench_serve(base_url: str, rate: str, eos: int, out_json: str) -> dict:
    cmd = [sys.executable, "-m", "servelm.cli", "bench", "serve", "--base-url", base_url,
           "--dataset-name", "sharegpt-like", "--num-prompts", "200", "--request-rate", rate,
           "--ignore-eos", "--eos-logit-bias", str(eos), "--disable-tqdm", "--save-result", out_json,
           # other prompts per rate: the second run must not find the first's in a prompt cache
           "--seed", "0" if rate == "2" else "1"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    with open(out_json) as f:
        data = json.load(f)
    s = data["summary"]
    print(f"  {out_json}: {s['completed']} done, {s.get('failed', 0)} failed, "
          f"{s['output_throughput']:.1f} output tok/s, p99 TTFT {s['p99_ttft_ms']:.0f} ms, "
          f"{sum(x or 0 for x in data['output_lens'])} output tokens", flush=True)
    return s


def serve_rows(server: str, bin_dir: str, model: str, threads: int, eos: int, runs: int,
               out_dir: str) -> dict:
    """{rate: [summary per run]}, and the server's RSS after its runs."""
    res: dict = {"2": [], "inf": [], "rss": []}
    for run in range(runs):
        port = free_port()
        if server == "servelm":
            cmd = [sys.executable, "-m", "servelm.cli", "serve", "--port", str(port),
                   "--threads", str(threads)]
        else:
            cmd = [os.path.join(bin_dir, "llama-server"), "-m", model, "-t", str(threads), "-np",
                   "64", "-cb", "-c", str(64 * 2048), "--port", str(port)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            wait_ready(f"http://127.0.0.1:{port}", proc, timeout_s=300)
            for rate in ("2", "inf"):
                res[rate].append(bench_serve(f"http://127.0.0.1:{port}", rate, eos,
                                             os.path.join(out_dir, f"serve_{server}_rate{rate}"
                                                                   f"_run{run}.json")))
            res["rss"].append(_rss_mb(proc.pid))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
    return res


def _med(xs: list) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--serve-runs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--only-serve", action="store_true")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results", "cpu_serve"),
                    help="where the serving runs' bench JSON files go")
    ap.add_argument("--num-scheduler-steps", type=int, default=1,
                    help="> 1: the batch-1 and 64-sequence rows run again with servelm's "
                         "--num-scheduler-steps (multi-step scheduling), as extra rows")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(f"RESULT {servelm_child(args.child, args.threads, args.num_scheduler_steps)}",
              flush=True)
        return
    from benchmarks.llamacpp_build import ensure_llamacpp
    from servelm.cpu.threads import default_threads
    from servelm.loader import default_model_path
    threads = args.threads or default_threads()
    model = default_model_path()
    bin_dir = ensure_llamacpp()
    rows = []  # (what, servelm runs, llama.cpp runs, unit, target ratio, higher is better)
    if not args.only_serve:
        tg, pp = llama_bench_runs(bin_dir, model, args.runs, threads)
        rows.append(("batch-1 decode, 128 tokens", servelm_runs("decode", args.runs, threads),
                     tg, "tok/s", 1.0, True))
        rows.append(("prefill, 512-token prompt", servelm_runs("prefill", args.runs, threads),
                     pp, "tok/s", 2.0, True))
        batched = llama_batched_runs(bin_dir, model, args.runs, threads)
        rows.append(("64 sequences, 64 in / 128 out", servelm_runs("batch64", args.runs, threads),
                     batched, "output tok/s", 3.0, True))
        n = args.num_scheduler_steps
        if n > 1:
            rows.insert(1, (f"batch-1 decode, 128 tokens, --num-scheduler-steps {n}",
                            servelm_runs("decode", args.runs, threads, n), tg, "tok/s", 1.0,
                            True))
            rows.append((f"64 sequences, --num-scheduler-steps {n}",
                         servelm_runs("batch64", args.runs, threads, n), batched,
                         "output tok/s", 3.0, True))
        for what, a, b, *_ in rows:
            print(f"  {what}: servelm {a}, llama.cpp {b}", flush=True)
    rss = {}
    if not args.skip_serve:
        eos = 2  # SmolLM2's <|im_end|>; the bench's prompts are token ids
        os.makedirs(args.out_dir, exist_ok=True)
        s = serve_rows("servelm", bin_dir, model, threads, eos, args.serve_runs, args.out_dir)
        lc = serve_rows("llama.cpp", bin_dir, model, threads, eos, args.serve_runs, args.out_dir)
        for rate in ("2", "inf"):
            rows.append((f"serve rate {rate}: output tok/s",
                         [r["output_throughput"] for r in s[rate]],
                         [r["output_throughput"] for r in lc[rate]], "tok/s", 2.0, True))
            rows.append((f"serve rate {rate}: p99 TTFT", [r["p99_ttft_ms"] for r in s[rate]],
                         [r["p99_ttft_ms"] for r in lc[rate]], "ms",
                         1.0 if rate == "2" else None, False))
        rss = {"servelm": _med(s["rss"]), "llama.cpp": _med(lc["rss"])}
    from servelm.cpu.native import simd_level
    print(f"\nSmolLM2-135M-Instruct Q4_1 on the CPU ({os.cpu_count()} cores, {threads} threads, "
          f"servelm's kernels: {simd_level()}), medians of {args.runs} fresh runs (serving: "
          f"{args.serve_runs})")
    print("| what | servelm | llama.cpp | ratio | target | runs (servelm; llama.cpp) |")
    print("|---|---|---|---|---|---|")
    for what, s_runs, l_runs, unit, target, higher in rows:
        sm, lm = _med(s_runs), _med(l_runs)
        ratio = sm / lm if higher else lm / sm
        tgt = "-" if target is None else (f">= {target:.1f}x" if higher or target != 1.0 else "lower")
        met = "" if target is None else (" met" if ratio >= target else " MISSED")
        print(f"| {what} ({unit}) | {sm:.1f} | {lm:.1f} | {ratio:.3f}x | {tgt}{met} | "
              f"{', '.join(f'{x:.1f}' for x in s_runs)}; {', '.join(f'{x:.1f}' for x in l_runs)} |")
    for k, v in rss.items():
        print(f"| resident memory, {k} server (MB) | {v:.0f} | | | reported | |")


if __name__ == "__main__":
    main()
