"""The embedded SmolLM2-135M GGUF (Q4_1) on the CPU: kept in its blocks (quantization="gguf")
against dequantized at load (the CPU default), one table.

    python benchmarks/quant_cpu.py [--configs none gguf int4] [--decode 64] [--prefill 512]

Each configuration runs in a fresh process (its memory is its own): the linear layers' bytes
(parameters and buffers of the model), the process's peak RSS, batch-1 decode tok/s (median of 3
runs of --decode greedy tokens after a warm-up) and prefill tok/s of one --prefill-token prompt.
With bf16 activations (the default on a CPU with native bf16) the Q4_1 blocks and int4 run
PyTorch's packed int4 kernel (quantization/cpu_int4.py); "default" is what the engine picks
without a quantization argument (for this GGUF and dtype: gguf).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child(config: str, decode: int, prefill: int) -> dict:
    import torch

    from servelm import LLM, SamplingParams
    kw = {} if config == "default" else {"quantization": config}
    t = time.perf_counter()
    llm = LLM(**kw)
    init = time.perf_counter() - t
    model = llm.engine.core.executor.runner.model
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    linear = sum(p.numel() * p.element_size() for n, p in tensors.items()
                 if "proj" in n or "lm_head" in n)
    total = sum(p.numel() * p.element_size() for p in tensors.values())
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 40000, (16,), generator=g).tolist()
    sp = SamplingParams(temperature=0, max_tokens=decode, ignore_eos=True)
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                 use_tqdm=False)
    runs = []
    for _ in range(3):
        o = llm.generate([prompt], sp, use_tqdm=False)[0]
        runs.append((decode - 1) / (o.metrics.last_token_time - o.metrics.first_token_time))
    long = torch.randint(100, 40000, (prefill,), generator=g).tolist()
    t = time.perf_counter()
    llm.generate([long], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    pre = prefill / (time.perf_counter() - t)
    return {"config": config, "dtype": str(llm.engine.config.model.dtype), "init_s": init,
            "linear_MB": linear / 1e6, "model_MB": total / 1e6,
            "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "decode_tok_s": statistics.median(runs), "decode_runs": runs, "prefill_tok_s": pre}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=["none", "gguf", "int4"])
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.decode, args.prefill)), flush=True)
        return
    rows = []
    for c in args.configs:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", c,
                            "--decode", str(args.decode), "--prefill", str(args.prefill)],
                           capture_output=True, text=True)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            print(p.stdout[-2000:], p.stderr[-3000:])
            continue
        rows.append(json.loads(line[0][7:]))
    print("| quantization | dtype | linear layers MB | model MB | peak RSS MB | decode tok/s "
          "(runs) | prefill tok/s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['dtype']} | {r['linear_MB']:.0f} | {r['model_MB']:.0f} | "
              f"{r['peak_rss_MB']:.0f} | {r['decode_tok_s']:.1f} ("
              f"{', '.join(f'{x:.1f}' for x in r['decode_runs'])}) | {r['prefill_tok_s']:.0f} |")


if __name__ == "__main__":
    main()
