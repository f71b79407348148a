"""Before/after: batch-1 decode (B1) and a batch submitted at once (B2) of two servelm trees,
interleaved, each run in a fresh process, with engine-step counts and host ms per step.

    python benchmarks/ab_compare.py --base /path/to/old/tree --new . --rounds 3 [--out DIR]
    python benchmarks/ab_compare.py --cpu --base ... --new . --rounds 3
    python benchmarks/ab_compare.py --variant old=/old/tree --variant sync=.:'{"async_scheduling": false}' \
        --variant async=. --rounds 3        # any number of variants: name=tree[:engine kwargs]

GPU: Llama-3-8B-shaped dummy bf16 weights as in gpu_suite.py, B1 128 in / 256 out, B2 1000
requests of 256 in / 256 out. --cpu: the embedded SmolLM2-135M (bf16 where the CPU has native
bf16), B1 128 out, B2 64 requests of 128 out (as cpu_suite.py). Host time is the engine's
CPU-side work per step: scheduling, the scheduler's update, batch building and the sampling
set-up (whatever each tree calls those). Prints one table of medians (and the runs) last.
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
from servelm import LLM, SamplingParams
sys.path.insert(0, sys.argv[4])  # benchmarks/ of the tree running this comparison
from gpu_suite import StepTimer, random_prompts
n_req = int(sys.argv[3])
cpu = sys.argv[2] == "cpu"
V, in_len, out_len = (49152, 32, 128) if cpu else (128256, 256, 256)
b1_prompt = random_prompts(1, [32 if cpu else 128], 0, V)[0]
b2 = random_prompts(n_req, [in_len] * n_req, 1, V)
kw = json.loads(sys.argv[5])
llm = (LLM(kv_cache_memory=1 << 30, **kw) if cpu else
       LLM("llama-3-8b", load_format="dummy", max_model_len=8192, seed=0,
           skip_tokenizer_init=True, **kw))
sp = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
llm.generate([b1_prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
b1 = []
for _ in range(3):
    m = llm.generate([b1_prompt], sp, use_tqdm=False)[0].metrics
    b1.append((out_len - 1) / (m.last_token_time - m.first_token_time))
timer = StepTimer(llm)
t = time.perf_counter()
outs = llm.generate(b2, sp, use_tqdm=False)
dt = time.perf_counter() - t
assert all(len(o.outputs[0].token_ids) == out_len for o in outs)
sm = timer.summary()
print("RESULT " + json.dumps({"b1_tok_s": sorted(b1)[1], "b1_runs": b1,
      "b2_req_s": n_req / dt, "b2_steps": sm["steps"], "host_ms": sm["host_ms_per_step"],
      "step_ms": sm["step_ms"]}), flush=True)
"""


def one_run(tree: str, kwargs: dict, n_req: int, log, cpu: bool) -> dict:
    p = subprocess.run([sys.executable, "-c", ONE_RUN, os.path.abspath(tree),
                        "cpu" if cpu else "gpu", str(n_req), os.path.dirname(os.path.abspath(__file__)),
                        json.dumps(kwargs)],
                       capture_output=True, text=True, timeout=900)
    log.write(p.stdout + p.stderr)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"run of {tree} failed:\n{p.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default=None, help="shorthand for --variant base=TREE")
    ap.add_argument("--new", default=None, help="shorthand for --variant new=TREE")
    ap.add_argument("--variant", action="append", default=[],
                    help="name=tree[:json engine kwargs]; runs in the order given, rotated per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-requests", type=int, default=None, help="B2 size (GPU 1000, CPU 64)")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    n_req = args.num_requests or (64 if args.cpu else 1000)
    variants: dict[str, tuple[str, dict]] = {}
    for name, tree in (("base", args.base), ("new", args.new)):
        if tree:
            variants[name] = (tree, {})
    for v in args.variant:
        name, _, rest = v.partition("=")
        tree, _, kw = rest.partition(":")
        variants[name] = (tree, json.loads(kw) if kw else {})
    names = list(variants)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    path = os.path.join(args.out, "ab_compare.json")
    with open(os.path.join(args.out, "ab_compare.log"), "a") as log:
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                t = time.perf_counter()
                res = one_run(*variants[name], n_req, log, args.cpu)
                res["wall_s"] = time.perf_counter() - t
                runs[name].append(res)
                print(name, json.dumps(res), flush=True)
                with open(path, "w") as f:
                    json.dump(runs, f, indent=1)
    first = names[0]
    print(f"\n| metric | {' | '.join(f'{n} median (runs)' for n in names)} | "
          f"{' | '.join(f'{n}/{first}' for n in names[1:])} |")
    print("|---" * (2 * len(names)) + "|")
    for key in ("b1_tok_s", "b2_req_s", "b2_steps", "host_ms", "step_ms"):
        med = {n: statistics.median(x[key] for x in runs[n]) for n in names}
        cells = [f"{med[n]:.2f} ({', '.join(f'{x[key]:.2f}' for x in runs[n])})" for n in names]
        ratios = [f"{med[n] / med[first]:.3f}" for n in names[1:]]
        print(f"| {key} | {' | '.join(cells)} | {' | '.join(ratios)} |")


if __name__ == "__main__":
    main()
