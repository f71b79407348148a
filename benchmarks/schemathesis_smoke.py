"""Fuzz the API from its own /openapi.json with schemathesis (every check): a tiny random model
served on a free port with an API key, then `st run`. Needs schemathesis on PATH or in
$SCHEMATHESIS (its dependencies clash with nothing here, but a separate venv keeps it apart):

  python3 -m venv /tmp/stvenv && /tmp/stvenv/bin/pip install schemathesis
  SCHEMATHESIS=/tmp/stvenv/bin/st python benchmarks/schemathesis_smoke.py [--max-examples 40]

Prints schemathesis' summary and whether the server logged a traceback.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tests.e2e.server_utils import ServerProcess, make_tiny_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-examples", type=int, default=40)
    ap.add_argument("--log", default=None, help="write schemathesis' whole output here (the "
                    "failures' details and their curl commands come before the summary)")
    a = ap.parse_args()
    st = os.environ.get("SCHEMATHESIS", "st")
    model = make_tiny_model(tempfile.mkdtemp(prefix="servelm-st-"))
    srv = ServerProcess([model, "--device", "cpu", "--max-model-len", "128",
                         "--kv-cache-memory", str(8 << 20), "--served-model-name", "tiny",
                         "--api-key", "k"])
    try:
        t0 = time.time()
        r = subprocess.run([st, "run", srv.base_url + "/openapi.json",
                            "-H", "Authorization: Bearer k", "--checks", "all",
                            "--max-examples", str(a.max_examples), "--request-timeout", "60",
                            "--workers", "2"], capture_output=True, text=True)
        if a.log:
            with open(a.log, "w") as f:
                f.write(r.stdout + r.stderr)
        summary = r.stdout[r.stdout.find("SUMMARY") - 40:] if "SUMMARY" in r.stdout else r.stdout
        print(summary[-4000:])
        print(f"schemathesis exit {r.returncode} in {time.time() - t0:.0f} s")
    finally:
        log = srv.close()
    print("server log: " + ("TRACEBACK\n" + log[-3000:] if "Traceback" in log else "clean"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
