"""Where start-up time goes: process start to first generated token, by phase.

    python benchmarks/cold_start.py [--preset llama-3-8b] [--max-model-len 8192]

Run it in a fresh process (and, for a true cold start, with an empty Triton cache).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

T0 = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--max-model-len", type=int, default=8192)
    args = ap.parse_args()
    marks = []

    def mark(name: str) -> None:
        marks.append((name, time.perf_counter()))

    import torch  # noqa: F401
    mark("import torch")
    from servelm import SamplingParams
    from servelm.config import EngineArgs
    from servelm.engine.engine import Engine
    from servelm.executor import uniproc
    from servelm.worker import model_runner as mr
    mark("import servelm")
    # time the runner's phases by wrapping its methods (and the executor's profiling call)
    for owner, name in ((mr.ModelRunner, "_load_model"), (uniproc, "determine_num_blocks"),
                        (mr.ModelRunner, "allocate_kv")):
        fn = getattr(owner, name)

        def wrapped(*a, _fn=fn, _name=name, **k):
            out = _fn(*a, **k)
            mark(_name)
            return out
        setattr(owner, name, wrapped)
    from servelm.worker import cuda_graphs
    cap = cuda_graphs.DecodeGraphs.capture

    def capture(self):
        cap(self)
        mark(f"capture {len(self.graphs)} CUDA graphs")
    cuda_graphs.DecodeGraphs.capture = capture
    cfg = EngineArgs(model=args.preset, load_format="dummy", max_model_len=args.max_model_len).create_engine_config()
    mark("engine config")
    eng = Engine(cfg)
    mark("engine ready")
    eng.add_request("0", [1, 2, 3, 4], SamplingParams(max_tokens=1, ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
    mark("first token")
    prev = T0
    print("| phase | seconds | cumulative |\n|---|---|---|")
    for name, t in marks:
        print(f"| {name} | {t - prev:.2f} | {t - T0:.2f} |")
        prev = t


if __name__ == "__main__":
    main()
