"""One layer of the embedded SmolLM2-135M Q4_1 GGUF at prompt-sized M, two ways: the blocks
dequantized to fp32 for PyTorch's GEMM (MKL), against the C batched product over the blocks
(servelm/cpu/ops.NativeLinear); alternating, the median of 5 pairs, on the process's threads.
What servelm.cpu.ops.native_max_m's choice rests on.

    python benchmarks/cpu_prompt_gemm.py [--m 16,64,128,512]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="16,64,128,512")
    args = ap.parse_args()
    import torch
    import torch.nn.functional as F

    from servelm import LLM
    from servelm.quantization.gguf import dequantize_blocks
    llm = LLM(kv_cache_memory=1 << 28)
    layer = llm.engine.core.executor.runner.model.layers[0]
    mods = {"qkv": layer.self_attn.qkv_proj, "o": layer.self_attn.o_proj,
            "gate_up": layer.mlp.gate_up_proj, "down": layer.mlp.down_proj}
    print(f"threads {torch.get_num_threads()}; ms per matmul, median of 5 alternations")
    print("| M | layer [N x K] | dequantize + GEMM | C batched | GFLOP/s (C) | max rel. diff |")
    print("|---|---|---|---|---|---|")
    for M in (int(v) for v in args.m.split(",")):
        for name, lin in mods.items():
            method = lin.method
            x = torch.randn(M, lin.input_size_per_rank)

            def dense():
                return F.linear(x, dequantize_blocks(method.split_blocks(lin, 0), x.dtype))

            def native():
                return method.native(x)
            a, b = dense(), native()
            diff = ((a - b).abs().max() / a.abs().max()).item()
            ts: dict = {"dense": [], "native": []}
            for _ in range(5):
                for key, fn in (("dense", dense), ("native", native)):
                    t = time.perf_counter()
                    fn()
                    ts[key].append((time.perf_counter() - t) * 1e3)
            N, K = a.shape[1], x.shape[1]
            md, mc = statistics.median(ts["dense"]), statistics.median(ts["native"])
            print(f"| {M} | {name} [{N} x {K}] | {md:.2f} | {mc:.2f} | "
                  f"{2 * M * N * K / mc / 1e6:.0f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
