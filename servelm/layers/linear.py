"""Linear layers whose weights are loaded by name, including merged projections (QKV, gate/up)
that take several checkpoint tensors as row slices."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x W^T (+ b). Parameters are allocated uninitialised: loaders fill them."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dim, e.g. q|k|v.

    ``shard_sizes`` names each part's output size in order; ``load_shard(i, w)`` copies a
    checkpoint tensor into its rows.
    """

    def __init__(self, in_features: int, shard_sizes: Sequence[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(shard_sizes), bias)
        self.offsets = [sum(shard_sizes[:i]) for i in range(len(shard_sizes) + 1)]

    def load_shard(self, index: int, tensor: torch.Tensor, is_bias: bool = False) -> None:
        param: Optional[nn.Parameter] = self.bias if is_bias else self.weight
        assert param is not None
        lo, hi = self.offsets[index], self.offsets[index + 1]
        if tensor.shape[0] != hi - lo:
            raise ValueError(f"checkpoint shard has {tensor.shape[0]} rows, expected {hi - lo}")
        param.data[lo:hi].copy_(tensor)
