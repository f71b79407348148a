"""int4 matmuls on the CPU through PyTorch's packed int4 kernel (``_weight_int4pack_mm_for_cpu``),
for bf16/fp16 activations: weights stay 4-bit in memory and are unpacked inside the matmul.

That kernel computes w = (q - 8) * scale + zero per group of G input columns (G in 32, 64, 128,
256), q unsigned 0..15; the layouts here map onto it exactly in fp32: the int4 layout's
(q - z) * s is (q - 8) * s + (8 - z) * s, GGUF Q4_0's d * (q - 8) has zero 0 and Q4_1's d * q + m
has zero m + 8 d. The scales and zeros are rounded once to the activation dtype (a relative 2^-9
in bf16 on the zero term, well inside the 4-bit step). Measured on the 2-core CPU machine with
SmolLM2-135M's shapes at batch 1: the linear layers of one token take 3.4 ms against 10.0 ms for
bf16 ``F.linear``. fp32 activations keep the exact reference path (quantization/ref.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

GROUPS = (32, 64, 128, 256)
# above this many rows (prefill) the packed kernel loses to dequantizing the weight once and
# calling the dense bf16 GEMM (SmolLM2, 512-token prompt on the 2-core machine: 345 tok/s
# packed against 488 dense), so the methods keep their own layout for that path too
MAX_M = 32
_INNER_K_TILES = 2


def available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def usable(device: torch.device, dtype: torch.dtype, group_size: int, n: int) -> bool:
    """The kernel takes N (output rows) in multiples of 16."""
    return (device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)
            and group_size in GROUPS and n % 16 == 0 and available())


def pack(q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group_size: int,
         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [N, K] codes 0..15; scales, offsets: [ceil(K / G), N] (fp32) with
    w = (q - 8) * scales + offsets -> (packed weight, scales_and_zeros [Kp / G, N, 2] in dtype),
    K padded to Kp, a multiple of G and of the kernel's K tile (x is zero-padded to match)."""
    n, k = q.shape
    tile = max(group_size, 16 * _INNER_K_TILES)
    kp = -(-k // tile) * tile
    q = F.pad(q.to(torch.int32), (0, kp - k), value=8)  # padded columns: code 8, weight 0
    groups = kp // group_size
    s = F.pad(scales.float(), (0, 0, 0, groups - scales.shape[0]))
    o = F.pad(offsets.float(), (0, 0, 0, groups - offsets.shape[0]))
    sz = torch.stack([s, o], dim=2).to(dtype).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), _INNER_K_TILES), sz


def linear(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group_size: int,
           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x: [M, K] -> [M, N] in x's dtype; x is zero-padded to the packed K."""
    kp = sz.shape[0] * group_size
    if x.shape[1] != kp:
        x = F.pad(x, (0, kp - x.shape[1]))
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, group_size, sz)
    return y if bias is None else y + bias
