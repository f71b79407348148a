"""The quantized weight layouts servelm keeps in memory, and their plain-PyTorch references.

These functions are the CPU path of every method and the references the Triton kernels
(kernels/quant_matmul.py) are tested against. All run on any device.

Layouts (N output rows, K input columns, G the group size along K; ceil(K / G) groups, the
last one shorter when G does not divide K, as GPTQ and llama.cpp allow):

* int4 (``int4``, ``gptq``, ``awq``; GPTQ's own layout, AWQ repacked into it at load):
  ``qweight`` int32 [K // 8, N]: value (k, n) is nibble k % 8 (bits 4*(k%8) .. 4*(k%8)+3) of
  ``qweight[k // 8, n]``, unsigned 0..15; ``scales`` [ceil(K/G), N] and ``zeros`` [ceil(K/G), N] in
  the activation dtype; w[n, k] = (q - zeros[k // G, n]) * scales[k // G, n].
* int8 weight-only (``int8``): ``qweight`` int8 [N, K], symmetric; ``scales`` [N, ceil(K/G)] in the
  activation dtype; w[n, k] = q * scales[n, k // G].
* fp8 W8A8 (``fp8``): ``weight`` float8_e4m3fn [N, K]; ``weight_scale`` float32 [N] (one per
  output channel); activations are quantized per token at run time (``quantize_fp8_per_token``)
  and the product is y = (xq @ wq^T) * x_scale[:, None] * weight_scale[None, :].
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3fn value
# a row of zeros gets this scale (any positive value works: its quantized values are all 0)
_MIN_SCALE = 1e-12


# ---- int4 (GPTQ layout) ---------------------------------------------------------------------
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q: [K, N] integers 0..15 (K % 8 == 0) -> qweight int32 [K // 8, N] (GPTQ packing)."""
    K, N = q.shape
    if K % 8:
        raise ValueError(f"int4 packing needs K divisible by 8, got {K}")
    q = q.to(torch.int32).contiguous().reshape(K // 8, 8, N)
    packed = q[:, 0].contiguous()
    for i in range(1, 8):  # int32 shifts wrap: nibble 7 lands in the sign bit, as stored
        packed |= q[:, i] << (4 * i)
    return packed


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """qweight int32 [K // 8, N] -> q int32 [K, N] in 0..15."""
    shifts = (torch.arange(8, device=qweight.device, dtype=torch.int32) * 4).view(1, 8, 1)
    q = (qweight.unsqueeze(1) >> shifts) & 0xF  # arithmetic shift, masked: sign bits drop out
    return q.reshape(-1, qweight.shape[1])


def num_groups(k: int, group_size: int) -> int:
    return -(-k // group_size)


def _pad_k(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """w [N, K] -> [N, groups * G], zero columns appended (they change no group's range)."""
    pad = num_groups(w.shape[1], group_size) * group_size - w.shape[1]
    return F.pad(w, (0, pad)) if pad else w


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """-> w [N, K] in scales' dtype (computed in fp32, rounded once)."""
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    groups = scales.shape[0]
    q = F.pad(unpack_int4(qweight).float(), (0, 0, 0, groups * group_size - K))
    w = (q.view(groups, group_size, N) - zeros.float().unsqueeze(1)) * scales.float().unsqueeze(1)
    return w.view(groups * group_size, N)[:K].t().contiguous().to(scales.dtype)


def quantize_int4(w: torch.Tensor, group_size: int, hqq_iters: int = 20
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 of w [N, K] per group of ``group_size`` columns, no calibration data:
    -> (qweight [K // 8, N] int32, scales [groups, N], zeros [groups, N]) in w's dtype.

    Each group's range [min, max] (widened to include 0) maps onto 0..15 (round to nearest);
    then, with the scales fixed, the zero points are refined as HQQ does (Badri & Shaji 2023:
    half-quadratic minimisation of the l_0.7 norm of the error, closed-form zero updates),
    which keeps large weights closer than plain rounding; zeros become fractional. Every
    (group, output row) keeps the iterate with its smallest l1 error, so a group's result
    depends on its own weights only: a tensor-parallel shard of rows, or of whole groups of
    columns, quantizes exactly as that part of the full tensor does. Measured on SmolLM2-135M
    (fp32, G = 128, the first 1k tokens of the perplexity text, `servelm bench perplexity`):
    +29% perplexity with round-to-nearest, +21.0% with one stopping rule for the whole tensor
    (the rule before), +19.8% (mean KL 0.314 against 0.326) with each group's best iterate.
    ``hqq_iters=0``: plain round-to-nearest."""
    N, K = w.shape
    groups = num_groups(K, group_size)
    wf = _pad_k(w.float(), group_size).t().reshape(groups, group_size, N)  # [groups, G, N]
    # 1 for the real columns, 0 for the last group's padding (kept out of errors and zeros)
    valid = (torch.arange(groups * group_size, device=w.device) < K).float()
    valid = valid.view(groups, group_size, 1)
    count = valid.sum(dim=1, keepdim=True)
    lo = wf.amin(dim=1, keepdim=True).clamp(max=0.0)
    hi = wf.amax(dim=1, keepdim=True).clamp(min=0.0)
    # scales are kept in w's dtype: quantize against the rounded values the kernel uses
    s = ((hi - lo) / 15.0).clamp(min=_MIN_SCALE).to(w.dtype).float()
    z = torch.round(-lo / s).clamp(0, 15)
    best_z, best_err, beta = z, None, 10.0
    for _ in range(hqq_iters):
        q = torch.round(wf / s + z).clamp(0, 15)
        err = wf - (q - z) * s
        e = err.abs()
        total = (e * valid).sum(dim=1, keepdim=True)  # [groups, 1, N]
        if best_err is None:
            best_err = total
        else:
            better = total < best_err
            best_err, best_z = torch.where(better, total, best_err), torch.where(better, z, best_z)
        # shrink the error towards 0 under the l_0.7 penalty, then the zero that fits the rest
        err = torch.sign(err) * torch.relu(e - (e + 1e-8).pow(0.7 - 1.0) / beta)
        z = ((q - (wf - err) / s) * valid).sum(dim=1, keepdim=True) / count
        beta *= 1.01
    z = best_z.to(w.dtype).float()
    q = torch.round(wf / s + z).clamp(0, 15)
    qweight = pack_int4(q.reshape(groups * group_size, N)[:K].to(torch.int32))
    return (qweight, s.squeeze(1).to(w.dtype).contiguous(),
            z.squeeze(1).to(w.dtype).contiguous())


def int4_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    zeros: torch.Tensor, group_size: int,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x: [M, K] -> [M, N] in x's dtype: F.linear with the dequantized weight."""
    return F.linear(x, dequantize_int4(qweight, scales, zeros, group_size).to(x.dtype), bias)


# ---- int8 weight-only -------------------------------------------------------------------------
def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """qweight int8 [N, K], scales [N, groups] -> w [N, K] in scales' dtype."""
    s = scales.float().repeat_interleave(group_size, dim=1)[:, :qweight.shape[1]]
    return (qweight.float() * s).to(scales.dtype)


def quantize_int8(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest int8 of w [N, K] per group along K:
    -> (qweight int8 [N, K], scales [N, groups] in w's dtype)."""
    N, K = w.shape
    groups = num_groups(K, group_size)
    wf = _pad_k(w.float(), group_size).reshape(N, groups, group_size)
    scales = (wf.abs().amax(dim=2) / 127.0).clamp(min=_MIN_SCALE).to(w.dtype)
    q = torch.round(wf / scales.float().unsqueeze(2)).clamp(-127, 127)
    return q.reshape(N, groups * group_size)[:, :K].to(torch.int8).contiguous(), scales


def int8_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    group_size: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return F.linear(x, dequantize_int8(qweight, scales, group_size).to(x.dtype), bias)


# ---- fp8 W8A8 ---------------------------------------------------------------------------------
def quantize_fp8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (weight e4m3 [N, K], weight_scale fp32 [N]): each row's max maps to 448."""
    scale = (w.float().abs().amax(dim=1) * (1.0 / FP8_MAX)).clamp(min=_MIN_SCALE)
    q = (w.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (xq e4m3 [M, K], x_scale fp32 [M]): dynamic, each row's max maps to 448.
    The scale is amax times fp32(1/448), one multiply: the same bits on every device (torch on
    CUDA divides by a scalar through its reciprocal, the CPU divides), as the kernel does."""
    scale = (x.float().abs().amax(dim=1) * (1.0 / FP8_MAX)).clamp(min=_MIN_SCALE)
    q = (x.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def fp8_linear_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x: [M, K] (bf16/fp16/fp32) -> [M, N] in x's dtype: x quantized per token, the e4m3
    product accumulated in fp32, both scales applied, rounded once (+ bias)."""
    xq, xs = quantize_fp8_per_token(x)
    y = (xq.float() @ weight.float().t()) * xs[:, None] * weight_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
