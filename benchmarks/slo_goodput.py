"""Goodput under overload, by scheduling policy: `servelm serve PRESET --load-format dummy`
driven by `servelm bench serve` (sharegpt-like prompts, Poisson arrivals).

1. capacity: --capacity-prompts requests sent at once to the first server: completions/s;
2. for each policy: a fresh server, --overload x capacity offered for --duration seconds, every
   request carrying the objectives (--slo-in-request): goodput = requests meeting both TTFT and
   TPOT per second; a shed request (HTTP 503 slo_unattainable) counts as a miss.

    python benchmarks/slo_goodput.py --ttft-ms 500 --tpot-ms 50 --overload 1.5

Prints one table last; JSON per run under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from online_bench import dummy_server  # noqa: E402


def bench(url: str, preset: str, n: int, rate: float, out: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "servelm.cli", "bench", "serve", "--base-url", url,
           "--dataset-name", "sharegpt-like", "--num-prompts", str(n), "--tokenizer", preset,
           "--request-rate", str(rate), "--ignore-eos", "--seed", "0", "--disable-tqdm",
           "--save-result", out, *extra]
    p = subprocess.run(cmd, capture_output=True, text=True)
    with open(out.replace(".json", ".txt"), "w") as f:
        f.write(p.stdout + p.stderr)
    with open(out) as f:
        return json.load(f)["summary"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--ttft-ms", type=float, default=500)
    ap.add_argument("--tpot-ms", type=float, default=50)
    ap.add_argument("--overload", type=float, default=1.5, help="offered load / capacity")
    ap.add_argument("--duration", type=float, default=30, help="seconds of arrivals")
    ap.add_argument("--capacity-prompts", type=int, default=600)
    ap.add_argument("--capacity-rate", type=float, default=float("inf"),
                    help="Poisson rate of the capacity run (default: all at once). A burst "
                         "underestimates the sustained rate (H100: 37.5 req/s burst, 42.5 "
                         "sustained): a rate above capacity measures what the server sustains")
    ap.add_argument("--policies", nargs="+", default=["fcfs", "slo"])
    ap.add_argument("--serve-flags", default="", help="extra `servelm serve` flags")
    ap.add_argument("--port", type=int, default=8013)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    goodput = ["--goodput", f"ttft:{args.ttft_ms:g}", f"tpot:{args.tpot_ms:g}"]
    capacity, rows = None, []
    for policy in args.policies:
        with dummy_server(args.preset, args.port,
                          ["--scheduling-policy", policy, *args.serve_flags.split()],
                          os.path.join(args.out, f"server_slo_{policy}.log"), policy) as url:
            bench(url, args.preset, 64, float("inf"),  # warm-up: Triton JIT, the cost model
                  os.path.join(args.out, f"warmup_{policy}.json"), [])
            if capacity is None:
                s = bench(url, args.preset, args.capacity_prompts, args.capacity_rate,
                          os.path.join(args.out, "capacity.json"), [])
                capacity = s["request_throughput"]
                print(f"capacity {capacity:.2f} req/s", flush=True)
            rate = args.overload * capacity
            n = max(1, int(rate * args.duration))
            s = bench(url, args.preset, n, rate, os.path.join(args.out, f"overload_{policy}.json"),
                      goodput + ["--slo-in-request"])
            try:  # what the scheduler learnt and did: its step-cost model, requests shed
                with urllib.request.urlopen(url + "/dashboard/data", timeout=10) as r:
                    d = json.load(r)
                s["scheduler"] = {k: d.get(k) for k in ("step_cost", "num_shed",
                                                         "num_slo_requests", "num_slo_met",
                                                         "num_preemptions")}
                print(policy, s["scheduler"], flush=True)
            except OSError as e:
                print(f"{policy}: no dashboard data ({e})", flush=True)
            rows.append((policy, rate, s))
            print(policy, {k: s.get(k) for k in ("request_throughput", "request_goodput",
                                                  "failed", "p99_ttft_ms")}, flush=True)
    print(f"\nSLOs: TTFT {args.ttft_ms:g} ms, TPOT {args.tpot_ms:g} ms; capacity "
          f"{capacity:.2f} req/s ({args.capacity_prompts} sharegpt-like requests at "
          f"{args.capacity_rate:g} req/s)")
    print("| policy | offered req/s | completed req/s | goodput req/s | goodput / capacity | "
          "failed (shed) | p99 TTFT ms | median TPOT ms |\n|---|---|---|---|---|---|---|---|")
    for policy, rate, s in rows:
        print(f"| {policy} | {rate:.1f} | {s['request_throughput']:.1f} | "
              f"{s['request_goodput']:.1f} | {s['request_goodput'] / capacity:.0%} | "
              f"{s.get('failed', 0)} | {s['p99_ttft_ms']:.0f} | {s['median_tpot_ms']:.1f} |")


if __name__ == "__main__":
    main()
