"""servelm on one GPU, side by side with Hugging Face transformers in the same run.

    python benchmarks/gpu_suite.py            # prints one table last; JSON to $OUT if set
    python benchmarks/gpu_suite.py --repeat 3 --only B1 B2 B2same
        # three fresh processes (HF in the first only): median and spread of every figure


Llama-3-8B-shaped dummy bf16 weights, random prompt token ids, fixed seeds, ignore_eos:
  B1 batch-1 decode (128 in / 256 out), tok/s and % of the copy-bandwidth roofline
  B2 1000 requests of 256 in / 256 out, all at once
  B3 1000 requests with sharegpt-like seeded lengths
  B4 32 requests of 7936 in / 256 out (8k context)
  HF transformers: batch-1 generate, and generate_batch on a subset of B2
  B2same servelm on exactly that subset (the HF ratio on the same requests)
  cold start: process start -> first generated token
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PRESET = "llama-3-8b"
COLD_START = r"""
import time, sys
t0 = float(sys.argv[1])
from servelm import LLM, SamplingParams
llm = LLM(sys.argv[2], load_format="dummy", max_model_len=int(sys.argv[3]))
llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
print("FIRST_TOKEN", time.time() - t0, flush=True)
"""


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (median of many)."""
    import triton.testing
    n = 1 << 30  # 2 GiB of bf16
    x = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    del x, y
    return 2 * n * 2 / (ms / 1e3)


def random_prompts(n: int, lens, seed: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (L,), generator=g).tolist() for L in lens]


def run_child(script: str, args: list[str], timeout: int) -> dict | None:
    """``python script *args`` as a fresh process (a benchmark's child run); the JSON of its
    ``RESULT {...}`` line, or None (its output printed) when it fails or times out."""
    try:
        p = subprocess.run([sys.executable, os.path.abspath(script)] + args,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{args} timed out after {timeout} s", flush=True)
        return None
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        print(f"{args} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}", flush=True)
        return None
    return json.loads(line[0][7:])


def hf_baseline(cfg, b1_prompt, b2_prompts, out_len: int, b1_new: int) -> dict:
    import transformers as tf
    # the preset's own config object -> transformers' config of that model type
    fields = {k: v for k, v in cfg.to_dict().items() if k != "model_type"}
    hf_cfg = tf.AutoConfig.for_model(cfg.model_type, **fields)
    with torch.device("cuda"):
        model = tf.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16).eval()
    res = {}
    gen = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        ids = torch.tensor([b1_prompt], device="cuda")
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, **gen)
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=b1_new, min_new_tokens=b1_new, **gen)
        torch.cuda.synchronize()
        res["b1_tok_s"] = b1_new / (time.perf_counter() - t)
        gc_ = tf.GenerationConfig(max_new_tokens=out_len, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)
        t = time.perf_counter()
        outs = model.generate_batch(inputs=b2_prompts, generation_config=gc_, progress_bar=False)
        dt = time.perf_counter() - t
        n_out = sum(len(o.generated_tokens) for o in outs.values())
        res["b2_subset_requests"] = len(b2_prompts)
        res["b2_subset_out_tok_s"] = n_out / dt
        res["b2_subset_req_s"] = len(b2_prompts) / dt
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return res


class StepTimer:
    """Host time spent in the engine's CPU-side work per step, against the whole step."""

    def __init__(self, llm) -> None:
        core = llm.engine.core
        # (trees from before the plug-in seams held the runner directly: benchmarks/ab_compare.py)
        runner = core.executor.runner if hasattr(core, "executor") else core.runner
        self.host = 0.0
        self.steps = 0
        self.total = 0.0
        targets = [(core.scheduler, "schedule"), (core.scheduler, "update"),
                   (runner, "_prepare_inputs")]
        if hasattr(runner, "sampling"):  # the sampling set-up: per-row state and metadata
            targets += [(runner.sampling, "update"), (runner.sampling, "metadata")]
        else:
            targets.append((runner, "_sampling_metadata"))
        for obj, name in targets:
            self._wrap(obj, name, host=True)
        self._wrap(core, "step", host=False)

    def _wrap(self, obj, name, host: bool) -> None:
        fn = getattr(obj, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t
                if host:
                    self.host += dt
                else:
                    self.total += dt
                    self.steps += 1
        setattr(obj, name, timed)

    def summary(self) -> dict:
        s = max(self.steps, 1)
        return {"steps": self.steps, "host_ms_per_step": 1e3 * self.host / s,
                "step_ms": 1e3 * self.total / s}


def run_offline(llm, prompts, out_lens, label: str) -> dict:
    from servelm import SamplingParams
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in out_lens]
    timer = StepTimer(llm)
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    n_in = sum(len(p) for p in prompts)
    r = {"bench": label, "requests": len(prompts), "seconds": dt, "req_s": len(prompts) / dt,
         "out_tok_s": n_out / dt, "total_tok_s": (n_in + n_out) / dt, **timer.summary()}
    ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outs]
    r["median_ttft_s"] = statistics.median(ttft)
    return r


def save(results: dict, path: str | None = None) -> None:
    """Written after every stage, so a run cut short still leaves its numbers."""
    out_dir = os.environ.get("OUT")
    for p in ([os.path.join(out_dir, "gpu_suite.json")] if out_dir and not path else []) + \
            ([path] if path else []):
        with open(p, "w") as f:
            json.dump(results, f, indent=2)
    print("RESULTS", json.dumps(results), flush=True)


def gpu_state() -> dict:
    """Clocks, temperature and power now: one suspect of run-to-run variance."""
    q = "clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active"
    try:
        p = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=10)
        sm, mem, temp, power, throttle = [x.strip() for x in p.stdout.splitlines()[0].split(",")]
        return {"sm_mhz": float(sm), "mem_mhz": float(mem), "temp_c": float(temp),
                "power_w": float(power), "throttle": throttle}
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return {}


# figures the --repeat table reports: (label, path in the results)
REPEATED = [("B1 tok/s", ("B1", "tok_s")), ("B2 req/s", ("B2", "req_s")),
            ("B2 steps", ("B2", "steps")), ("B2 step ms", ("B2", "step_ms")),
            ("B2 host ms / step", ("B2", "host_ms_per_step")),
            ("B2same out tok/s", ("B2same", "out_tok_s")), ("B3 req/s", ("B3", "req_s")),
            ("B4 req/s", ("B4", "req_s")), ("cold start s", ("cold_start_s",))]


def repeat(args: argparse.Namespace, argv: list[str]) -> None:
    """Runs the suite in ``args.repeat`` fresh processes; prints median and spread."""
    runs = []
    out_dir = os.environ.get("OUT") or "."
    for i in range(args.repeat):
        path = os.path.join(out_dir, f"gpu_suite_run{i}.json")
        child = [a for a in argv if a != "--skip-hf"]
        if i > 0 or args.skip_hf:
            child.append("--skip-hf")
        p = subprocess.run([sys.executable, os.path.abspath(__file__), *child, "--repeat", "1",
                            "--json", path], capture_output=True, text=True)
        with open(os.path.join(out_dir, f"gpu_suite_run{i}.log"), "w") as f:
            f.write(p.stdout + p.stderr)
        if os.path.exists(path):
            with open(path) as f:
                runs.append(json.load(f))
        print(f"run {i}: rc {p.returncode}", flush=True)
    hf = next((r["hf"] for r in runs if "hf" in r), {})
    print(f"\n{len(runs)} fresh runs | metric | median | min | max | spread (max-min)/median |"
          "\n|---|---|---|---|---|")
    for label, path in REPEATED:
        vals = []
        for r in runs:
            v = r
            for k in path:
                v = v.get(k) if isinstance(v, dict) else None
            if isinstance(v, (int, float)):
                vals.append(float(v))
        if vals:
            med = statistics.median(vals)
            print(f"| {label} | {med:.2f} | {min(vals):.2f} | {max(vals):.2f} | "
                  f"{(max(vals) - min(vals)) / med:.1%} |")
    if hf:
        same = statistics.median(r["B2same"]["out_tok_s"] for r in runs if "B2same" in r) \
            if any("B2same" in r for r in runs) else None
        print(f"| HF b1 tok/s | {hf['b1_tok_s']:.1f} | | | |")
        print(f"| HF generate_batch out tok/s ({hf['b2_subset_requests']} req) | "
              f"{hf['b2_subset_out_tok_s']:.0f} | | | |")
        if same:
            print(f"| servelm / HF on the same requests | "
                  f"{same / hf['b2_subset_out_tok_s']:.1f}x | | | |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-cold", action="store_true")
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--hf-subset", type=int, default=100)
    ap.add_argument("--only", nargs="+", default=None,
                    help="benchmarks to run: B1 B2 B2same B3 B4 (default: all)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the suite this many times in fresh processes: median and spread")
    ap.add_argument("--json", default=None, help="write the results here too")
    args = ap.parse_args()
    if args.repeat > 1:
        argv = sys.argv[1:]
        i = argv.index("--repeat")
        return repeat(args, argv[:i] + argv[i + 2:])
    only = set(args.only or ["B1", "B2", "B2same", "B3", "B4"])
    from servelm.bench.datasets import sharegpt_like_requests
    from servelm.loader import preset_config
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                     "gpu_at_start": gpu_state()}
    cfg = preset_config(PRESET)
    V = cfg.vocab_size
    max_len = cfg.max_position_embeddings  # 8192

    if not args.skip_cold:  # first, while this process holds no GPU memory
        t0 = time.time()
        p = subprocess.run([sys.executable, "-c", COLD_START, str(t0), PRESET, str(max_len)],
                           capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": os.getcwd()})
        line = [x for x in p.stdout.splitlines() if x.startswith("FIRST_TOKEN")]
        results["cold_start_s"] = float(line[0].split()[1]) if line else None
        save(results, args.json)
        if not line:
            print(p.stdout[-2000:], p.stderr[-4000:])

    bw = copy_bandwidth()
    results["copy_bw_TBps"] = bw / 1e12
    b1_prompt = random_prompts(1, [128], 0, V)[0]
    b2 = random_prompts(args.num_requests, [256] * args.num_requests, 1, V)
    if not args.skip_hf:
        results["hf"] = hf_baseline(cfg, b1_prompt, b2[:args.hf_subset], 256, 64)
        save(results, args.json)

    from servelm import LLM, SamplingParams
    t = time.perf_counter()
    # token ids in and out, as before dummy presets had a (synthetic) tokenizer
    llm = LLM(PRESET, load_format="dummy", max_model_len=max_len, seed=0,
              skip_tokenizer_init=True)
    results["engine_init_s"] = time.perf_counter() - t
    runner = llm.engine.core.executor.runner
    # the bytes a decode token reads: every weight but the embedding table (one row of it is
    # read), unless lm_head is tied to it (then the table is read once, as lm_head)
    params = dict(runner.model.named_parameters())  # tied parameters appear once
    wbytes = sum(p.numel() * p.element_size() for name, p in params.items()
                 if "embed_tokens" not in name or not any("lm_head" in n for n in params))
    results["weight_GB"] = wbytes / 1e9
    results["kv_blocks"] = llm.engine.core.scheduler.kv.num_blocks

    rows = [("copy bandwidth (TB/s)", f"{results['copy_bw_TBps']:.2f}", "")]
    hf = results.get("hf", {})
    if "B1" in only:  # batch-1 decode
        results["gpu_before_B1"] = gpu_state()
        sp = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
        llm.generate([b1_prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                     use_tqdm=False)
        runs = []
        for _ in range(3):
            o = llm.generate([b1_prompt], sp, use_tqdm=False)[0]
            m = o.metrics
            runs.append(255 / (m.last_token_time - m.first_token_time))
        b1 = statistics.median(runs)
        roofline = bw / wbytes
        results["B1"] = {"tok_s": b1, "runs": runs, "roofline_tok_s": roofline,
                         "pct_roofline": 100 * b1 / roofline}
        save(results, args.json)
        note = f"{results['B1']['pct_roofline']:.1f}% of roofline {roofline:.0f}"
        if hf:
            note += f"; HF {hf['b1_tok_s']:.1f} ({b1 / hf['b1_tok_s']:.1f}x)"
        rows.append(("B1 batch-1 decode tok/s", f"{b1:.1f}", note))

    benches = {"B2": lambda: (b2, [256] * len(b2)),
               "B2same": lambda: (b2[:args.hf_subset], [256] * args.hf_subset)}
    if "B3" in only:
        reqs = sharegpt_like_requests(args.num_requests, seed=0, vocab_size=V,
                                      max_model_len=max_len)
        benches["B3"] = lambda: ([r.prompt for r in reqs], [r.output_len for r in reqs])
    benches["B4"] = lambda: (random_prompts(32, [max_len - 256] * 32, 3, V), [256] * 32)
    for k, make in benches.items():
        if k not in only:
            continue
        results[f"gpu_before_{k}"] = gpu_state()
        results[k] = r = run_offline(llm, *make(), k)
        save(results, args.json)
        extra = f"host {r['host_ms_per_step']:.2f} ms / step {r['step_ms']:.2f} ms"
        if k == "B2same" and hf:
            extra += (f"; HF generate_batch on the same {hf['b2_subset_requests']} requests "
                      f"{hf['b2_subset_out_tok_s']:.0f} out tok/s -> "
                      f"{r['out_tok_s'] / hf['b2_subset_out_tok_s']:.1f}x")
        rows.append((f"{k} req/s | out tok/s", f"{r['req_s']:.2f} | {r['out_tok_s']:.0f}", extra))
    rows.append(("cold start to first token (s)",
                 f"{results.get('cold_start_s') or float('nan'):.1f}",
                 f"engine init in-process {results['engine_init_s']:.1f}s"))
    print("\n| metric | servelm | notes |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")


if __name__ == "__main__":
    main()
