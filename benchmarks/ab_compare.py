"""Before/after on one GPU: batch-1 decode (B1) and 1000 x 256/256 (B2) of two servelm trees,
interleaved, each run in a fresh process, with engine-step counts and host ms per step.

    python benchmarks/ab_compare.py --base /path/to/old/tree --new . --rounds 3 [--out DIR]

Llama-3-8B-shaped dummy bf16 weights as in gpu_suite.py. Host time is the engine's CPU-side
work per step: scheduling, the scheduler's update, batch building and the sampling set-up
(whatever each tree calls those). Prints one table of medians (and the spread) last.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ONE_RUN = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from servelm import LLM, SamplingParams
n_req = int(sys.argv[3])
g = torch.Generator().manual_seed(0)
V = 128256
b1_prompt = torch.randint(0, V, (128,), generator=g).tolist()
g = torch.Generator().manual_seed(1)
b2 = [torch.randint(0, V, (256,), generator=g).tolist() for _ in range(n_req)]
llm = LLM("llama-3-8b", load_format="dummy", max_model_len=8192, seed=0)
core = llm.engine.core
runner = core.executor.runner if hasattr(core, "executor") else core.runner
host = [0.0]
steps = [0]
total = [0.0]
def wrap(obj, name, is_host):
    fn = getattr(obj, name)
    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            dt = time.perf_counter() - t
            if is_host:
                host[0] += dt
            else:
                total[0] += dt
                steps[0] += 1
    setattr(obj, name, timed)
targets = [(core.scheduler, "schedule"), (core.scheduler, "update"), (runner, "_prepare_inputs")]
if hasattr(runner, "sampling"):
    targets += [(runner.sampling, "update"), (runner.sampling, "metadata")]
else:
    targets += [(runner, "_sampling_metadata")]
sp = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
llm.generate([b1_prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
b1 = []
for _ in range(3):
    m = llm.generate([b1_prompt], sp, use_tqdm=False)[0].metrics
    b1.append(255 / (m.last_token_time - m.first_token_time))
for t in targets:
    wrap(*t, True)
wrap(core, "step", False)
t = time.perf_counter()
outs = llm.generate(b2, sp, use_tqdm=False)
dt = time.perf_counter() - t
assert all(len(o.outputs[0].token_ids) == 256 for o in outs)
print("RESULT " + json.dumps({"b1_tok_s": sorted(b1)[1], "b1_runs": b1,
      "b2_req_s": n_req / dt, "b2_steps": steps[0], "host_ms": 1e3 * host[0] / steps[0],
      "step_ms": 1e3 * total[0] / steps[0]}), flush=True)
"""


def one_run(tree: str, n_req: int, log) -> dict:
    p = subprocess.run([sys.executable, "-c", ONE_RUN, os.path.abspath(tree), "x", str(n_req)],
                       capture_output=True, text=True, timeout=900)
    log.write(p.stdout + p.stderr)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"run of {tree} failed:\n{p.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--new", default=".")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {"base": [], "new": []}
    path = os.path.join(args.out, "ab_compare.json")
    with open(os.path.join(args.out, "ab_compare.log"), "a") as log:
        for r in range(args.rounds):
            order = ("base", "new") if r % 2 == 0 else ("new", "base")
            for name in order:
                t = time.perf_counter()
                res = one_run(getattr(args, name), args.num_requests, log)
                res["wall_s"] = time.perf_counter() - t
                runs[name].append(res)
                print(name, json.dumps(res), flush=True)
                with open(path, "w") as f:
                    json.dump(runs, f, indent=1)
    print("\n| metric | base median (runs) | new median (runs) | new/base |\n|---|---|---|---|")
    for key in ("b1_tok_s", "b2_req_s", "b2_steps", "host_ms", "step_ms"):
        a = [x[key] for x in runs["base"]]
        b = [x[key] for x in runs["new"]]
        ma, mb = statistics.median(a), statistics.median(b)
        fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
        print(f"| {key} | {ma:.2f} ({fmt(a)}) | {mb:.2f} ({fmt(b)}) | {mb / ma:.3f} |")


if __name__ == "__main__":
    main()
