"""Quantized weights and KV cache on one GPU, bf16 side by side in the same run.

    python benchmarks/quant_gpu.py --repeat 3                       # all parts
    python benchmarks/quant_gpu.py --parts b1 --configs bf16 fp8 int4 --repeat 3

Llama-3-8B-shaped dummy weights (load_format="dummy"; quantized methods quantize the random
weights as they load), random prompt ids, ignore_eos. Every (repeat, configuration) runs in a
fresh process, configurations interleaved, so drift of the shared machine hits all alike;
the table gives medians and each one's ratio to bf16's median.

  b1  batch-1 decode: 128 prompt tokens, 256 generated, tok/s (median of 3 in the process),
      and the roofline: copy bandwidth / bytes a decode token reads (weights but the
      embedding table; the lm_head counted at its stored size)
  b2  1000 requests of 256 in / 256 out, all at once: req/s and output tok/s
  kv  a decode-heavy run bounded by KV capacity: bf16 weights, the KV cache capped at
      --kv-gib GiB for both kv_cache_dtype=auto and fp8; --kv-requests requests of
      --kv-in in / --kv-out out: output tok/s and the number of KV blocks
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PRESET = "llama-3-8b"
CONFIGS = {"bf16": {}, "fp8": {"quantization": "fp8"}, "int8": {"quantization": "int8"},
           "int4": {"quantization": "int4"},
           "int4+head": {"quantization": "int4", "quantize_lm_head": True},
           "fp8+head": {"quantization": "fp8", "quantize_lm_head": True},
           "kv-auto": {"kv_cache_dtype": "auto"}, "kv-fp8": {"kv_cache_dtype": "fp8"}}


def prompts(n: int, length: int, seed: int, vocab: int) -> list[list[int]]:
    import torch
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(n)]


def child(args: argparse.Namespace) -> dict:
    """One configuration in this process: the parts asked for; returns its figures."""
    import torch

    from servelm import LLM, SamplingParams
    from servelm.loader import preset_config
    cfg = preset_config(PRESET)
    over = CONFIGS[args.config]
    kv_part = args.config.startswith("kv-")
    extra = dict(kv_cache_memory=int(args.kv_gib * 1024**3)) if kv_part else {}
    t = time.perf_counter()
    llm = LLM(PRESET, load_format="dummy", max_model_len=args.max_model_len, seed=0,
              skip_tokenizer_init=True, **over, **extra)
    r: dict = {"config": args.config, "init_s": time.perf_counter() - t,
               "device": torch.cuda.get_device_name()}
    runner = llm.engine.core.executor.runner
    params = dict(runner.model.named_parameters())
    buffers = dict(runner.model.named_buffers())
    tied = not any("lm_head" in n for n in params)
    r["weight_GB"] = sum(p.numel() * p.element_size() for n, p in {**params, **buffers}.items()
                         if "embed_tokens" not in n or tied) / 1e9
    r["kv_blocks"] = llm.engine.core.scheduler.kv.num_blocks
    if kv_part:
        ps = prompts(args.kv_requests, args.kv_in, 5, cfg.vocab_size)
        sp = SamplingParams(temperature=0, max_tokens=args.kv_out, ignore_eos=True)
        t = time.perf_counter()
        outs = llm.generate(ps, sp, use_tqdm=False)
        dt = time.perf_counter() - t
        r["kv_out_tok_s"] = sum(len(o.outputs[0].token_ids) for o in outs) / dt
        r["kv_seconds"] = dt
        return r
    if "b1" in args.parts:
        p = prompts(1, 128, 0, cfg.vocab_size)
        llm.generate(p, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                     use_tqdm=False)
        runs = []
        for _ in range(3):
            o = llm.generate(p, SamplingParams(temperature=0, max_tokens=256, ignore_eos=True),
                             use_tqdm=False)[0]
            runs.append(255 / (o.metrics.last_token_time - o.metrics.first_token_time))
        r["b1_tok_s"] = statistics.median(runs)
        r["b1_runs"] = runs
    if "b2" in args.parts and args.config in args.b2_configs:
        ps = prompts(args.b2_requests, 256, 1, cfg.vocab_size)
        sp = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
        t = time.perf_counter()
        outs = llm.generate(ps, sp, use_tqdm=False)
        dt = time.perf_counter() - t
        r["b2_req_s"] = len(ps) / dt
        r["b2_out_tok_s"] = sum(len(o.outputs[0].token_ids) for o in outs) / dt
    return r


def copy_bandwidth() -> float:
    import torch
    import triton.testing
    n = 1 << 30
    x = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    return 2 * n * 2 / (ms / 1e3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=["bf16", "fp8", "int4", "int8"])
    ap.add_argument("--parts", nargs="+", default=["b1", "b2", "kv"], choices=["b1", "b2", "kv"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--b2-requests", type=int, default=1000)
    ap.add_argument("--b2-configs", nargs="+", default=["bf16", "fp8"],
                    help="the configurations that also run b2 (it takes ~30 s each)")
    ap.add_argument("--kv-requests", type=int, default=64)
    ap.add_argument("--kv-in", type=int, default=2048)
    ap.add_argument("--kv-out", type=int, default=512)
    ap.add_argument("--kv-gib", type=float, default=4.0)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.config:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    out_dir = os.environ.get("OUT") or "."
    bw = copy_bandwidth()
    configs = [c for c in args.configs if not c.startswith("kv-")]
    if "kv" in args.parts:
        configs += ["kv-auto", "kv-fp8"]
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    base = sys.argv[1:]
    for i in range(args.repeat):
        for c in configs:
            cmd = [sys.executable, os.path.abspath(__file__), *base, "--config", c]
            p = subprocess.run(cmd, capture_output=True, text=True)
            with open(os.path.join(out_dir, f"quant_{c}_run{i}.log"), "w") as f:
                f.write(p.stdout + p.stderr)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if line:
                runs[c].append(json.loads(line[0][7:]))
            short = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in
                     (runs[c][-1] if line else {}).items() if k not in ("device", "b1_runs")}
            print(f"run {i} {c}: rc {p.returncode} {short}", flush=True)
    with open(args.json or os.path.join(out_dir, "quant_gpu.json"), "w") as f:
        json.dump({"copy_bw_TBps": bw / 1e12, "runs": runs}, f, indent=2)

    def med(c: str, key: str):
        vals = [r[key] for r in runs.get(c, []) if key in r]
        return (statistics.median(vals), vals) if vals else (None, [])

    print(f"\ncopy bandwidth {bw / 1e12:.2f} TB/s; {args.repeat} fresh processes per "
          f"configuration; device {next((r[0]['device'] for r in runs.values() if r), '?')}")
    print("| config | weights GB | b1 tok/s (runs) | b1 vs bf16 | roofline tok/s | % roofline |"
          " b2 req/s (runs) | b2 vs bf16 |\n|---|---|---|---|---|---|---|---|")
    b1_base, _ = med("bf16", "b1_tok_s")
    b2_base, _ = med("bf16", "b2_req_s")
    for c in configs:
        if c.startswith("kv-"):
            continue
        gb, _ = med(c, "weight_GB")
        b1, b1v = med(c, "b1_tok_s")
        b2, b2v = med(c, "b2_req_s")
        roof = bw / (gb * 1e9) if gb else None
        fmt = lambda v, vs: (f"{v:.1f} ({', '.join(f'{x:.1f}' for x in vs)})" if v else "-")
        print(f"| {c} | {gb or 0:.2f} | {fmt(b1, b1v)} | "
              f"{b1 / b1_base if b1 and b1_base else float('nan'):.2f}x | "
              f"{roof or 0:.0f} | {100 * b1 / roof if b1 and roof else float('nan'):.0f}% | "
              f"{fmt(b2, b2v)} | {b2 / b2_base if b2 and b2_base else float('nan'):.2f}x |")
    if "kv" in args.parts:
        a, av = med("kv-auto", "kv_out_tok_s")
        f8, fv = med("kv-fp8", "kv_out_tok_s")
        ba, _ = med("kv-auto", "kv_blocks")
        bf, _ = med("kv-fp8", "kv_blocks")
        print(f"\nKV-bound: {args.kv_requests} x {args.kv_in} in / {args.kv_out} out, KV cache "
              f"capped at {args.kv_gib} GiB, bf16 weights\n| kv_cache_dtype | KV blocks | out tok/s"
              " (runs) | vs auto |\n|---|---|---|---|")
        for name, v, vs, b in (("auto", a, av, ba), ("fp8", f8, fv, bf)):
            print(f"| {name} | {b or 0:.0f} | {v or 0:.0f} ({', '.join(f'{x:.0f}' for x in vs)}) |"
                  f" {v / a if v and a else float('nan'):.2f}x |")


if __name__ == "__main__":
    main()
