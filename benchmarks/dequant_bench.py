"""Large-M quantized matmuls: dequantize-once + cuBLAS (kernels/dequant_matmul.py) against the
fused int4/int8 GEMMs (kernels/quant_matmul.py) and bf16 cuBLAS, on one GPU.

    python benchmarks/dequant_bench.py

Llama-3-8B layer shapes (qkv, o, gate_up, down) x 32 layers, M in 64, 256, 512, 2048, G = 128;
per-call times of back-to-back calls in a CUDA graph (quant_gemv_bench.graph_us over rotated
weight pools), summed over the stack; prints the int8 dequantize path's error against the
reference per shape, then one line per M. The crossovers set the M thresholds in
quantization/int4.py and int8.py.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import quant_gemv_bench as B  # noqa: E402  (graph_us, weight_pool)

import servelm.kernels.quant_matmul as qm  # noqa: E402
from servelm.kernels.dequant_matmul import int4_matmul_dequant, int8_matmul_dequant  # noqa: E402
from servelm.quantization import ref  # noqa: E402

SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
MS = (64, 256, 512, 2048)
G = 128


def main() -> None:
    total: dict[tuple[int, str], float] = {}  # (M, implementation) -> us over the 32 layers
    for name, n, k in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
        p8, p4, pb = (B.weight_pool(f, w) for f in ("int8", "int4", "bf16"))
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            impls = {"bf16": (lambda t: F.linear(x, t[0]), pb),
                     "int8 fused": (lambda t: qm.int8_linear(x, t[0], t[1], G), p8),
                     "int8 deq+mm": (lambda t: int8_matmul_dequant(x, t[0], t[1], G), p8),
                     "int4 fused": (lambda t: qm.int4_linear(x, t[0], t[1], t[2], G), p4),
                     "int4 deq+mm": (lambda t: int4_matmul_dequant(x, t[0], t[1], t[2], G), p4)}
            for impl, (fn, pool) in impls.items():
                total[(m, impl)] = total.get((m, impl), 0.0) + 32 * B.graph_us(fn, pool)
        y, want = int8_matmul_dequant(x, *p8[0], G), ref.int8_linear_ref(x, *p8[0], G)
        err = ((y.float() - want.float()).norm() / want.float().norm()).item()
        print(f"{name} int8 deq+mm rel err vs reference {err:.1e}", flush=True)
        del p8, p4, pb, w
        torch.cuda.empty_cache()
    for m in MS:
        print(f"M={m}: " + "  ".join(f"{impl} {us / 1e3:.2f}ms" for (mm, impl), us in
                                     total.items() if mm == m), flush=True)


if __name__ == "__main__":
    main()
