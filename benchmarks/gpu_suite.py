"""servelm on one GPU, side by side with Hugging Face transformers in the same run.

    python benchmarks/gpu_suite.py            # prints one table last; JSON to $OUT if set

Llama-3-8B-shaped dummy bf16 weights, random prompt token ids, fixed seeds, ignore_eos:
  B1 batch-1 decode (128 in / 256 out), tok/s and % of the copy-bandwidth roofline
  B2 1000 requests of 256 in / 256 out, all at once
  B3 1000 requests with sharegpt-like seeded lengths
  B4 32 requests of 7936 in / 256 out (8k context)
  HF transformers: batch-1 generate, and generate_batch on a subset of B2
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


def hf_baseline(cfg, b1_prompt, b2_prompts, out_len: int, b1_new: int) -> dict:
    import transformers as tf
    with torch.device("cuda"):
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
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


def save(results: dict) -> None:
    """Written after every stage, so a run cut short still leaves its numbers."""
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "gpu_suite.json"), "w") as f:
            json.dump(results, f, indent=2)
    print("RESULTS", json.dumps(results), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-cold", action="store_true")
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--hf-subset", type=int, default=100)
    args = ap.parse_args()
    from servelm.bench.datasets import sharegpt_like_requests
    from servelm.loader import preset_config
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
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
        save(results)
        if not line:
            print(p.stdout[-2000:], p.stderr[-4000:])

    bw = copy_bandwidth()
    results["copy_bw_TBps"] = bw / 1e12
    b1_prompt = random_prompts(1, [128], 0, V)[0]
    b2 = random_prompts(args.num_requests, [256] * args.num_requests, 1, V)
    if not args.skip_hf:
        results["hf"] = hf_baseline(cfg, b1_prompt, b2[:args.hf_subset], 256, 64)
        save(results)

    from servelm import LLM, SamplingParams
    t = time.perf_counter()
    # token ids in and out, as before dummy presets had a (synthetic) tokenizer
    llm = LLM(PRESET, load_format="dummy", max_model_len=max_len, seed=0,
              skip_tokenizer_init=True)
    results["engine_init_s"] = time.perf_counter() - t
    runner = llm.engine.core.executor.runner
    wbytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    results["weight_GB"] = wbytes / 1e9
    results["kv_blocks"] = llm.engine.core.scheduler.kv.num_blocks

    # B1: batch-1 decode
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
    save(results)

    results["B2"] = run_offline(llm, b2, [256] * len(b2), "B2")
    save(results)
    reqs = sharegpt_like_requests(args.num_requests, seed=0, vocab_size=V, max_model_len=max_len)
    results["B3"] = run_offline(llm, [r.prompt for r in reqs], [r.output_len for r in reqs], "B3")
    save(results)
    b4 = random_prompts(32, [max_len - 256] * 32, 3, V)
    results["B4"] = run_offline(llm, b4, [256] * 32, "B4")

    save(results)
    hf = results.get("hf", {})
    rows = [
        ("copy bandwidth (TB/s)", f"{results['copy_bw_TBps']:.2f}", ""),
        ("B1 batch-1 decode tok/s", f"{b1:.1f}",
         f"{results['B1']['pct_roofline']:.1f}% of roofline {roofline:.0f}; HF {hf.get('b1_tok_s', 0):.1f} "
         f"({b1 / hf['b1_tok_s']:.1f}x)" if hf else f"{results['B1']['pct_roofline']:.1f}% of roofline"),
    ]
    for k in ("B2", "B3", "B4"):
        r = results[k]
        extra = f"host {r['host_ms_per_step']:.2f} ms / step {r['step_ms']:.2f} ms"
        if k == "B2" and hf:
            extra += (f"; HF generate_batch ({hf['b2_subset_requests']} req) "
                      f"{hf['b2_subset_out_tok_s']:.0f} out tok/s -> "
                      f"{r['out_tok_s'] / hf['b2_subset_out_tok_s']:.1f}x")
        rows.append((f"{k} req/s | out tok/s", f"{r['req_s']:.2f} | {r['out_tok_s']:.0f}", extra))
    rows.append(("cold start to first token (s)", f"{results.get('cold_start_s') or float('nan'):.1f}",
                 f"engine init in-process {results['engine_init_s']:.1f}s"))
    print("\n| metric | servelm | notes |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")


if __name__ == "__main__":
    main()
