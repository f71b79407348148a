"""RMSNorm and fused residual-add + RMSNorm, with the rounding of Hugging Face's LlamaRMSNorm:
``h = r.float(); h = h * rsqrt(mean(h^2) + eps); out = weight * h.to(dtype)`` where the last
product rounds once to the activation dtype (torch computes bf16 * bf16 in fp32 and rounds)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., H], weight: [H] -> [..., H] in x's dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h.to(x.dtype)).to(x.dtype)


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual), the sum rounded to x's dtype."""
    r = (x + residual).to(x.dtype)
    return rms_norm_ref(r, weight, eps), r


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, eps,
                     stride_x, stride_r, stride_o, stride_ro,
                     HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    h = x.to(tl.float32)
    var = tl.sum(h * h, 0) / HIDDEN
    h = h * tl.rsqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = w * h.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, residual, weight, eps):
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    assert x2.stride(1) == 1 and weight.is_contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else out
    r2 = residual.reshape(-1, hidden) if residual is not None else x2
    assert r2.stride(1) == 1
    block = triton.next_power_of_2(hidden)
    num_warps = min(max(block // 512, 1), 16)
    if x2.shape[0] > 0:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, res_out, eps,
            x2.stride(0), r2.stride(0), out.stride(0), res_out.stride(0),
            HIDDEN=hidden, BLOCK=block, HAS_RES=residual is not None, num_warps=num_warps)
    return out.view(x.shape), res_out.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [T, H] (or [..., H], last dim contiguous), weight: [H] -> [T, H] in x's dtype."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, H] -> (normed [T, H], new_residual = x + residual [T, H]), x's dtype."""
    return _launch(x, residual, weight, eps)
