"""Where start-up time goes: process start to first generated token, by phase, each run in a fresh
process.

    python benchmarks/cold_start.py --preset llama-3-8b --runs 3 --fresh-caches   # empty caches
    python benchmarks/cold_start.py --preset llama-3-8b --runs 3                  # warm caches
    python benchmarks/cold_start.py --preset smollm2-135m --runs 1                # CPU check

--fresh-caches points TRITON_CACHE_DIR (and the torch/CUDA compile caches) at a new empty
directory per run, as on a fresh machine (the OS file cache stays warm: that part of a fresh
machine's first start, reading torch from disk, is not reproduced). Without it the runs use the
persistent cache (~/.cache/servelm/triton unless TRITON_CACHE_DIR is set), after one untimed
run that fills it. Each phase is the time since the previous mark; the table gives the median
over runs per phase (and min-max), the last row the time to the first token. --json PATH
writes every run's phases, the kernel warm-up report and the medians.
"""
from __future__ import annotations

import time

T_START = time.time()  # first: the child's start (its interpreter start is measured from argv)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- the child: one cold start, timed by wrapping the engine's start-up steps ---------------
def child(args: argparse.Namespace) -> None:
    marks: list[tuple[str, float]] = [("python start", T_START)]
    t_spawn = args.spawn_time

    def mark(name: str) -> None:
        marks.append((name, time.time()))

    import torch
    mark("import torch")
    sys.path.insert(0, ROOT)
    from servelm import SamplingParams
    from servelm.config import EngineArgs
    from servelm.engine.engine import Engine
    mark("import servelm")
    import servelm.loader
    from servelm.executor import uniproc
    from servelm.worker import cuda_graphs, kernel_warmup
    from servelm.worker import model_runner as mr
    if args.capture_all_graphs:
        cuda_graphs.EAGER_CAPTURE_MAX_BS = 1 << 30

    def wrap(owner, name: str, label: str, before: str | None = None) -> None:
        fn = getattr(owner, name)

        def wrapped(*a, **k):
            if before:
                mark(before)
            out = fn(*a, **k)
            mark(label)
            return out
        setattr(owner, name, wrapped)

    # Triton compiles in this process, by phase: cache misses after the warm-up are kernels it
    # did not foresee (or optional ones it had not reached)
    compiles: list[tuple[str, str, bool]] = []
    try:
        from triton import knobs

        def listener(*, src, cache_hit, **_):
            compiles.append((marks[-1][0], getattr(src, "name", "?"), bool(cache_hit)))
        knobs.compilation.listener = listener
    except ImportError:
        pass

    wrap(servelm.loader, "load_tokenizer", "tokenizer")
    wrap(mr.ModelRunner, "_start_kernel_warmup", "kernel recording (shadow dry run)",
         before="runner set-up")
    wrap(mr.ModelRunner, "_build_and_load", "weights load / init")
    wrap(kernel_warmup.KernelWarmup, "wait", "wait for kernel compiles")
    wrap(uniproc, "determine_num_blocks", "memory profile (first forward)")
    wrap(mr.ModelRunner, "allocate_kv", "KV cache allocation")
    wrap(cuda_graphs.DecodeGraphs, "capture", "CUDA graph capture")

    kw = dict(model=args.preset, load_format="dummy", device=args.device)
    if args.max_model_len:
        kw["max_model_len"] = args.max_model_len
    if kw["device"] == "cpu":
        kw["kv_cache_memory"] = 1 << 26  # a small cache: this measures start-up, not serving
    cfg = EngineArgs(**kw).create_engine_config()
    mark("engine config")
    eng = Engine(cfg)
    mark("engine ready")
    eng.add_request("0", [1, 2, 3, 4], SamplingParams(max_tokens=1, ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
    mark("first token")

    # the allocate_kv mark also fires for the profile's throwaway cache: keep the last one
    phases, prev = [], t_spawn
    seen_kv = [i for i, (n, _) in enumerate(marks) if n == "KV cache allocation"]
    for i, (name, t) in enumerate(marks):
        if name == "KV cache allocation" and i != seen_kv[-1]:
            continue
        phases.append((name, t - prev))
        prev = t
    runner = eng.core.executor.runner
    report = getattr(runner, "warmup_report", None)
    graphs = runner.graphs
    print("COLD_START_JSON " + json.dumps({
        "phases": phases, "first_token_s": marks[-1][1] - t_spawn,
        "device": torch.cuda.get_device_name() if cfg.device.startswith("cuda") else "cpu",
        "triton_cache": os.environ.get("TRITON_CACHE_DIR"),
        "warmup": report.__dict__ if report is not None else None,
        "graphs_at_start": len(graphs.graphs) if graphs is not None else 0,
        "graphs_total": len(graphs.keys) if graphs is not None else 0,
        # (phase the compile happened after, kernel, cache hit)
        "triton_compiles": compiles,
    }), flush=True)


# ---- the parent: fresh processes, medians ----------------------------------------------------
def run_once(args: argparse.Namespace, fresh: bool) -> dict:
    env = dict(os.environ)
    tmp = None
    if fresh:
        tmp = tempfile.mkdtemp(prefix="servelm-cold-")
        env.update(TRITON_CACHE_DIR=os.path.join(tmp, "triton"),
                   TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"),
                   CUDA_CACHE_PATH=os.path.join(tmp, "cuda"))
    if args.no_warmup:
        env["SERVELM_KERNEL_WARMUP"] = "0"
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--preset", args.preset,
           "--device", args.device, "--max-model-len", str(args.max_model_len or 0)]
    if args.capture_all_graphs:
        cmd.append("--capture-all-graphs")
    try:
        cmd += ["--spawn-time", repr(time.time())]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    line = [x for x in p.stdout.splitlines() if x.startswith("COLD_START_JSON ")]
    if p.returncode != 0 or not line:
        sys.stderr.write(p.stdout[-3000:] + p.stderr[-6000:])
        raise SystemExit(f"the cold-start child failed (exit {p.returncode})")
    return json.loads(line[-1].split(" ", 1)[1])


def summarize(runs: list[dict]) -> dict:
    names: list[str] = []
    for r in runs:
        for name, _ in r["phases"]:
            if name not in names:
                names.append(name)
    per = {n: [sum(s for m, s in r["phases"] if m == n) for r in runs] for n in names}
    return {"phases": {n: {"median": statistics.median(v), "min": min(v), "max": max(v)}
                       for n, v in per.items()},
            "first_token_s": {"median": statistics.median(r["first_token_s"] for r in runs),
                              "all": [r["first_token_s"] for r in runs]}}


def print_table(args: argparse.Namespace, runs: list[dict], summary: dict) -> None:
    w = runs[-1].get("warmup")
    print(f"\ndevice: {runs[-1]['device']}; preset {args.preset}; "
          f"{'fresh (empty) caches' if args.fresh_caches else 'warm caches'}; {len(runs)} run(s)")
    if w:
        print(f"kernel warm-up (last run): {w['jobs']} kernels recorded in {w['record_seconds']:.2f}s,"
              f" {w['cached']} cached, {w['done']} compiled by {w['workers']} workers + the runner,"
              f" {w['failed']} failed{': ' + w['first_error'][:300] if w['first_error'] else ''}")
    print(f"decode graphs captured at start: {runs[-1]['graphs_at_start']} of "
          f"{runs[-1]['graphs_total']} (the rest on first use)")
    compiles = runs[-1]["triton_compiles"]
    if compiles:
        after = [(p, n) for p, n, hit in compiles
                 if not hit and p not in ("runner set-up", "kernel recording (shadow dry run)",
                                          "weights load / init")]
        print(f"Triton in the runner's process (last run): {sum(h for *_, h in compiles)} cache "
              f"hits, {sum(not h for *_, h in compiles) - len(after)} compiled helping the "
              f"warm-up, {len(after)} compiled later"
              + (": " + ", ".join(f"{n} (after {p})" for p, n in after[:8]) if after else ""))
    print()
    print("| phase | median s | min-max s |\n|---|---|---|")
    for name, v in summary["phases"].items():
        print(f"| {name} | {v['median']:.2f} | {v['min']:.2f}-{v['max']:.2f} |")
    ft = summary["first_token_s"]
    print(f"| **process start to first token** | **{ft['median']:.2f}** | "
          f"{min(ft['all']):.2f}-{max(ft['all']):.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--fresh-caches", action="store_true",
                    help="an empty Triton (and torch/CUDA) compile cache for every run")
    ap.add_argument("--no-prime", action="store_true",
                    help="warm mode: skip the untimed first run that fills the persistent cache")
    ap.add_argument("--no-warmup", action="store_true",
                    help="SERVELM_KERNEL_WARMUP=0: no parallel kernel compile (A/B)")
    ap.add_argument("--capture-all-graphs", action="store_true",
                    help="capture every decode graph at start-up (the old behaviour; A/B)")
    ap.add_argument("--json", default=None, metavar="PATH")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--spawn-time", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.max_model_len = args.max_model_len or None
        if args.spawn_time is None:
            args.spawn_time = T_START
        return child(args)
    if not args.fresh_caches and not args.no_prime:
        print("priming the persistent caches (one untimed run) ...", flush=True)
        run_once(args, fresh=False)
    runs = []
    for i in range(args.runs):
        r = run_once(args, args.fresh_caches)
        runs.append(r)
        print(f"run {i + 1}/{args.runs}: first token after {r['first_token_s']:.2f}s", flush=True)
    summary = summarize(runs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs, "summary": summary}, f, indent=1)
    print_table(args, runs, summary)


if __name__ == "__main__":
    main()
