"""Large-M int4/int8 matmuls (prefill, big decode batches): the quantized weight
(quantization/ref.py's layouts) dequantized by one Triton kernel into a dense buffer (int4:
[K, N], the transposed layout qweight already has; int8: [N, K]), then one cuBLAS matmul.

Measured on one H100 (benchmarks/dequant_bench.py: Llama-3-8B layers x 32 without the head,
CUDA-graph replays): int4 at M = 512 takes 16.9 ms this way against 27.6 ms for quant_matmul's
fused int4 GEMM (bf16: 10.0 ms); at M = 64 the fused GEMM wins (8.6 vs 11.9 ms).
quantization/int4.py and int8.py pick by M. References: ``ref.dequantize_int4``,
``ref.dequantize_int8``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _int4_dequant_t_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, K, G,
                           BLOCK_N: tl.constexpr, R: tl.constexpr):
    # qweight [K // 8, N] int32 -> out [K, N] (w transposed: the layout qweight already has, so
    # every load and store is contiguous along N); one program: R packed rows x BLOCK_N columns
    offs_r = tl.program_id(0) * R + tl.arange(0, R)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_r < K // 8)[:, None] & (offs_n < N)[None, :]
    p = tl.load(qw_ptr + offs_r.to(tl.int64)[:, None] * N + offs_n[None, :], mask=mask, other=0)
    for j in tl.static_range(8):
        k = offs_r * 8 + j  # [R]
        g = (k // G).to(tl.int64)[:, None] * N + offs_n[None, :]
        s = tl.load(s_ptr + g, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g, mask=mask, other=0.0).to(tl.float32)
        w = (((p >> (4 * j)) & 0xF).to(tl.float32) - z) * s
        tl.store(out_ptr + k.to(tl.int64)[:, None] * N + offs_n[None, :],
                 w.to(out_ptr.dtype.element_ty), mask=mask)


def int4_dequantize_t(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      group_size: int) -> torch.Tensor:
    """-> w.T [K, N] in scales' dtype (= ref.dequantize_int4(...).t())."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    out = torch.empty((k, n), dtype=scales.dtype, device=qweight.device)
    r, block_n = 16, 256
    _int4_dequant_t_kernel[(triton.cdiv(k // 8, r), triton.cdiv(n, block_n))](
        qweight, scales, zeros, out, n, k, group_size, BLOCK_N=block_n, R=r, num_warps=4)
    return out


def int4_matmul_dequant(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                        zeros: torch.Tensor, group_size: int,
                        bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Large M (prefill, big decode batches): dequantize once into a [K, N] buffer, then one
    cuBLAS matmul, x [M, K] @ w.T [K, N] (+ bias)."""
    wt = int4_dequantize_t(qweight, scales, zeros, group_size)
    return torch.addmm(bias, x, wt) if bias is not None else x @ wt


@triton.jit
def _int8_dequant_kernel(qw_ptr, s_ptr, out_ptr, N, K, G, NG,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # qweight [N, K] int8, scales [N, groups] -> out [N, K]: loads and stores contiguous along K
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    rows = offs_n.to(tl.int64)[:, None]
    q = tl.load(qw_ptr + rows * K + offs_k[None, :], mask=mask, other=0).to(tl.float32)
    s = tl.load(s_ptr + rows * NG + (offs_k // G)[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows * K + offs_k[None, :], (q * s).to(out_ptr.dtype.element_ty), mask=mask)


def int8_dequantize(qweight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """-> w [N, K] in scales' dtype (= ref.dequantize_int8)."""
    n, k = qweight.shape
    out = torch.empty((n, k), dtype=scales.dtype, device=qweight.device)
    block_n, block_k = 16, 256
    _int8_dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        qweight, scales, out, n, k, group_size, scales.shape[1], BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=4)
    return out


def int8_matmul_dequant(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                        group_size: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Large M: dequantize once into [N, K], then one cuBLAS matmul (+ bias)."""
    return torch.nn.functional.linear(x, int8_dequantize(qweight, scales, group_size), bias)
