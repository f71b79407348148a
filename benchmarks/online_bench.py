"""Online serving on one GPU: `servelm serve PRESET --load-format dummy` (its synthetic
tokenizer) driven by `servelm bench serve` (sharegpt-like prompts, Poisson arrivals), for each
server variant and request rate. One fresh server per variant.

    python benchmarks/online_bench.py --rates 16 32 --duration 40 \\
        --variant async= --variant sync=--no-async-scheduling

Prints one table last (p99 TTFT / TPOT / ITL and achieved rates); JSON per run under --out.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from typing import Iterator


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError("server did not become ready")


@contextlib.contextmanager
def dummy_server(preset: str, port: int, flags: list[str], log_path: str,
                 name: str) -> Iterator[str]:
    """`servelm serve PRESET --load-format dummy` with ``flags``, ready; yields its URL and
    stops it (terminate, then kill) however the block ends."""
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "servelm.cli", "serve", preset, "--load-format", "dummy",
           "--port", str(port), *flags]
    with open(log_path, "w") as log:
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(url, proc)
            print(f"{name}: server ready in {time.time() - t0:.1f}s", flush=True)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--rates", type=float, nargs="+", default=[16, 32])
    ap.add_argument("--duration", type=float, default=40, help="seconds of arrivals per rate")
    ap.add_argument("--variant", action="append", default=[],
                    help="name=extra serve flags (space separated); default: one plain server")
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--prewarm", action="store_true",
                    help="first run one unmeasured server (fills Triton's on-disk cache, so the "
                         "first measured variant does not pay compilation the others do not)")
    ap.add_argument("--warmup", type=int, default=64,
                    help="prompts sent at once before the measured rates (Triton JIT, caches)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    variants = [v.partition("=")[::2] for v in args.variant] or [("default", "")]
    if args.prewarm:
        variants = [("prewarm", variants[0][1])] + variants
    rows = []
    for name, flags in variants:
        with dummy_server(args.preset, args.port, flags.split(),
                          os.path.join(args.out, f"server_{name}.log"), name) as url:
            if args.warmup:  # first-use compilation must not land in the measured TTFTs
                subprocess.run([sys.executable, "-m", "servelm.cli", "bench", "serve",
                                "--base-url", url, "--dataset-name", "sharegpt-like",
                                "--num-prompts", str(args.warmup), "--tokenizer", args.preset,
                                "--ignore-eos", "--seed", "1", "--disable-tqdm"],
                               capture_output=True, text=True)
            for rate in (args.rates if name != "prewarm" else []):
                path = os.path.join(args.out, f"serve_{name}_rate{rate:g}.json")
                n = max(1, int(rate * args.duration))
                bench = [sys.executable, "-m", "servelm.cli", "bench", "serve", "--base-url", url,
                         "--dataset-name", "sharegpt-like", "--num-prompts", str(n),
                         "--tokenizer", args.preset, "--request-rate", str(rate),
                         "--ignore-eos", "--seed", "0", "--disable-tqdm", "--save-result", path]
                p = subprocess.run(bench, capture_output=True, text=True)
                with open(os.path.join(args.out, f"bench_{name}_rate{rate:g}.txt"), "w") as f:
                    f.write(p.stdout + p.stderr)
                with open(path) as f:
                    s = json.load(f)["summary"]
                rows.append((name, rate, s))
                print(name, rate, {k: s.get(k) for k in ("request_throughput", "p99_ttft_ms",
                                                          "p99_tpot_ms", "p99_itl_ms")},
                      flush=True)
    print("\n| server | offered req/s | achieved req/s | p99 TTFT ms | median TPOT ms | "
          "p99 TPOT ms | p99 ITL ms | failed |\n|---|---|---|---|---|---|---|---|")
    for name, rate, s in rows:
        print(f"| {name} | {rate:g} | {s['request_throughput']:.1f} | {s['p99_ttft_ms']:.0f} | "
              f"{s['median_tpot_ms']:.1f} | {s['p99_tpot_ms']:.1f} | {s['p99_itl_ms']:.1f} | "
              f"{s.get('failed', 0)} |")


if __name__ == "__main__":
    main()
