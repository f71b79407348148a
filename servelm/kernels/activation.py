"""SiLU-gated MLP activation: silu(gate) * up, rounded like Hugging Face's
``act_fn(gate_proj(x)) * up_proj(x)`` (silu rounds to the dtype, then the product rounds).

``silu_mul_rounded`` is that arithmetic on register tiles; the standalone kernel here and the
small-M GEMV's fused prologue (kernels/gemv.py, ``silu_mul=True``) both call it, so the fused
down projection reads bit-for-bit the activation the unfused kernels would have stored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] -> [T, I] = silu(x[:, :I]) * x[:, I:]."""
    i = x.shape[-1] // 2
    return F.silu(x[..., :i]) * x[..., i:]


@triton.jit
def silu_mul_rounded(gate, up):
    """gate, up: tiles of one shape in the activation dtype -> silu(gate) * up in that dtype:
    silu in fp32 rounded to the dtype, then the product in fp32 rounded again."""
    dt = gate.dtype
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dt)
    return (act.to(tl.float32) * up.to(tl.float32)).to(dt)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, INTER: tl.constexpr,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + INTER + cols, mask=mask, other=0.0)
    out = silu_mul_rounded(gate, up)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] (last dim contiguous) -> [T, I] in x's dtype."""
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    assert x2.stride(1) == 1
    out = torch.empty(x2.shape[0], inter, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(inter))
    if x2.shape[0] > 0:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](
            x2, out, x2.stride(0), out.stride(0), INTER=inter, BLOCK=block, num_warps=4)
    return out.view(*x.shape[:-1], inter)
