"""Gated activations."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor, use_kernel: bool = False) -> torch.Tensor:
    """x: [T, 2I] (gate | up) -> [T, I] = silu(gate) * up."""
    if use_kernel:
        from servelm.kernels.activation import silu_and_mul as k
        return k(x)
    from servelm.cpu import ops as cpu_ops
    if x.dim() == 2 and cpu_ops.takes_elementwise(x):  # the CPU's C pass (fp32 prompts)
        return cpu_ops.silu_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
