"""Linear layers whose weights are loaded by name, including merged projections (QKV, gate/up)
that take several checkpoint tensors as row slices."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           use_kernel: bool = False) -> torch.Tensor:
    """x: [M, K] @ weight [N, K]^T. With use_kernel on CUDA, small M (decode batches) goes to the
    Triton GEMV that streams the weights closer to HBM bandwidth than cuBLAS does at M <= 8."""
    if use_kernel:
        from servelm.kernels.gemv import linear_small_m, use_small_m_kernel
        if use_small_m_kernel(x.shape[0], weight.shape[0], weight.shape[1], weight.dtype, x.device):
            return linear_small_m(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Module):
    """y = x W^T (+ b). Parameters are allocated uninitialised: loaders fill them."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 use_kernel: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.use_kernel = use_kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.use_kernel)


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dim, e.g. q|k|v.

    ``shard_sizes`` names each part's output size in order; ``load_shard(i, w)`` copies a
    checkpoint tensor into its rows.
    """

    def __init__(self, in_features: int, shard_sizes: Sequence[int], bias: bool = False,
                 use_kernel: bool = False) -> None:
        super().__init__(in_features, sum(shard_sizes), bias, use_kernel)
        self.offsets = [sum(shard_sizes[:i]) for i in range(len(shard_sizes) + 1)]

    def load_shard(self, index: int, tensor: torch.Tensor, is_bias: bool = False) -> None:
        param: Optional[nn.Parameter] = self.bias if is_bias else self.weight
        assert param is not None
        lo, hi = self.offsets[index], self.offsets[index + 1]
        if tensor.shape[0] != hi - lo:
            raise ValueError(f"checkpoint shard has {tensor.shape[0]} rows, expected {hi - lo}")
        param.data[lo:hi].copy_(tensor)
