"""RMSNorm, optionally fused with the residual add."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Same arithmetic as HF Llama: normalise in fp32, cast back, then scale by the weight.

    With ``residual`` given, computes r = x + residual (in x's dtype) and returns
    (RMSNorm(r), r): the add and the norm in one pass on the fused kernel path.
    """

    def __init__(self, hidden_size: int, eps: float, use_kernel: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size))
        self.eps = eps
        self.use_kernel = use_kernel

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if self.use_kernel:
            from servelm.kernels import rmsnorm as k
            if residual is None:
                return k.rms_norm(x, self.weight, self.eps)
            return k.fused_add_rms_norm(x, residual, self.weight, self.eps)
        from servelm.cpu import ops as cpu_ops
        if (x.dim() == 2 and cpu_ops.takes_elementwise(x) and self.weight.dtype == torch.float32
                and (residual is None or residual.dtype == torch.float32)):
            return cpu_ops.rms_norm(x, self.weight, self.eps, residual)  # one C pass a row
        if residual is not None:
            x = x + residual
            residual = x
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(x.dtype)
        return out if residual is None else (out, residual)
