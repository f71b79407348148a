"""How much a huge request holds up small ones: a tiny model served on a free port; a 10 MB
prompt sent by another process (started up front, so its start is not counted) while this
client sends 1-token completions in a loop. Prints the small requests' idle latency, their
worst latency during each huge request and during the same sender posting a small body (the
control), and the API process's RSS before and after.

  python benchmarks/huge_prompt_stall.py [--repeat 3] [--mb 10]
"""
from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tests.e2e.server_utils import ServerProcess, httpx, make_tiny_model, rss_mb  # noqa: E402


# the sender: reads "huge" or "small" lines; posts that body with a raw socket (HTTP/1.1, one
# connection per request) and prints "<status> <ms>"
_SENDER = r"""
import socket, sys, time, urllib.parse
url = urllib.parse.urlparse(sys.argv[1])
bodies = {"huge": open(sys.argv[2], "rb").read(), "small": sys.argv[3].encode()}
print("ready", flush=True)
for line in sys.stdin:
    body = bodies[line.strip()]
    t = time.perf_counter()
    s = socket.create_connection((url.hostname, url.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
              b"\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
    try:
        s.sendall(body)  # the server may answer (and stop reading) before the end
    except OSError:
        pass
    head = s.recv(65536)
    print(head.split()[1].decode(), "%.1f" % ((time.perf_counter() - t) * 1e3), flush=True)
    s.close()
"""


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
            # the huge body is sent by a sender process started up front (not this client:
            # its GIL would be in the way; not a fresh curl: a process start on a 2-core machine
            # is itself a stall); the control is the same sender posting the small body
            sender = subprocess.Popen([sys.executable, "-c", _SENDER, srv.base_url, body.name,
                                       json.dumps(small)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, bufsize=1)
            assert sender.stdout.readline().strip() == "ready"

            def during_send(which: str) -> tuple[str, float, list[float]]:
                sender.stdin.write(which + "\n")
                sender.stdin.flush()
                during = []
                while not select.select([sender.stdout], [], [], 0)[0]:
                    t = time.perf_counter()
                    c.post("/v1/completions", json=small)
                    during.append(time.perf_counter() - t)
                code, ms = sender.stdout.readline().split()
                return code, float(ms), during

            print("| run | huge request | its time | small requests during | worst | vs idle "
                  "| worst during a small request from the sender (control) | vs idle |")
            print("|---|---|---|---|---|---|---|---|")
            ratios, controls = [], []
            for i in range(a.repeat):
                code, ms, during = during_send("huge")
                _, _, ctl = during_send("small")
                worst, cworst = max(during, default=0.0), max(ctl, default=0.0)
                ratios.append(worst / idle)
                controls.append(cworst / idle)
                print(f"| {i + 1} | HTTP {code} | {ms:.0f} ms | {len(during)} | "
                      f"{worst * 1e3:.1f} ms | {worst / idle:.1f}x | {cworst * 1e3:.1f} ms | "
                      f"{cworst / idle:.1f}x |")
            sender.stdin.close()
            sender.wait(10)
            print(f"\nmedian worst / idle: {statistics.median(ratios):.1f}x during the huge "
                  f"request, {statistics.median(controls):.1f}x during the control")
            time.sleep(3.0)  # the API process trims freed memory 2 s after a big body
            print(f"\nidle small-request latency {idle * 1e3:.1f} ms; API RSS {rss0:.0f} -> "
                  f"{rss_mb(srv.proc.pid):.0f} MB")
    finally:
        srv.close()
        os.unlink(body.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
