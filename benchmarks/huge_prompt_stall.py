"""How much a huge request holds up small ones: a tiny model served on a free port; a 10 MB
prompt sent with curl (another process, so this client's GIL is not in the way) while this
client sends 1-token completions in a loop. Prints the small requests' idle latency, their
worst latency during each huge request, and the API process's RSS before and after.

  python benchmarks/huge_prompt_stall.py [--repeat 3] [--mb 10]
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

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tests.e2e.server_utils import ServerProcess, httpx, make_tiny_model, rss_mb  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mb", type=float, default=10.0)
    a = ap.parse_args()
    model = make_tiny_model(tempfile.mkdtemp(prefix="servelm-huge-"))
    srv = ServerProcess([model, "--device", "cpu", "--max-model-len", "256",
                         "--kv-cache-memory", str(8 << 20), "--served-model-name", "tiny"])
    body = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump({"model": "tiny", "prompt": "a " * int(a.mb * (1 << 20) / 2), "max_tokens": 1},
              body)
    body.close()
    small = {"model": "tiny", "prompt": "Hello world", "max_tokens": 1}
    try:
        with httpx.Client(base_url=srv.base_url, timeout=120) as c:
            for _ in range(30):
                c.post("/v1/completions", json=small)
            lat = []
            for _ in range(30):
                t = time.perf_counter()
                c.post("/v1/completions", json=small)
                lat.append(time.perf_counter() - t)
            idle = statistics.median(lat)
            rss0 = rss_mb(srv.proc.pid)
            print("| run | huge request | its time | small requests during | worst | vs idle |")
            print("|---|---|---|---|---|---|")
            for i in range(a.repeat):
                p = subprocess.Popen(
                    ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total}",
                     "-H", "Content-Type: application/json", "--data-binary", "@" + body.name,
                     srv.base_url + "/v1/completions"], stdout=subprocess.PIPE, text=True)
                during = []
                while p.poll() is None:
                    t = time.perf_counter()
                    c.post("/v1/completions", json=small)
                    during.append(time.perf_counter() - t)
                code, secs = p.stdout.read().split()
                worst = max(during, default=0.0)
                print(f"| {i + 1} | HTTP {code} | {float(secs) * 1e3:.0f} ms | {len(during)} | "
                      f"{worst * 1e3:.1f} ms | {worst / idle:.1f}x |")
            time.sleep(3.0)  # the API process trims freed memory 2 s after a big body
            print(f"\nidle small-request latency {idle * 1e3:.1f} ms; API RSS {rss0:.0f} -> "
                  f"{rss_mb(srv.proc.pid):.0f} MB")
    finally:
        srv.close()
        os.unlink(body.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
