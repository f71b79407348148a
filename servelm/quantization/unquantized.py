"""The dense path: weights as stored (bf16/fp16/fp32), ``F.linear``, or on CUDA for small M the
Triton GEMV that streams weights closer to HBM bandwidth than cuBLAS (kernels/gemv.py)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn

from servelm.quantization.base import LinearMethod, create_bias, dense_weight_part

if TYPE_CHECKING:
    from servelm.layers.linear import Linear


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 use_kernel: bool = False) -> torch.Tensor:
    """x: [M, K] @ weight [N, K]^T (+ bias [N]) -> [M, N]. With use_kernel on CUDA, small M
    (decode batches) goes to the Triton GEMV."""
    if use_kernel:
        from servelm.kernels.gemv import linear_small_m, use_small_m_kernel
        if use_small_m_kernel(x.shape[0], weight.shape[0], weight.shape[1], weight.dtype, x.device):
            return linear_small_m(x, weight, bias)
    return F.linear(x, weight, bias)


# the fused SiLU-and-mul GEMV only where it was measured faster (H100, Llama-3-8B down_proj,
# graph replays): M=1 40.9 vs 41.8 us for the two launches; M=8 186.8 vs 45.2 us (slower)
SILU_MUL_MAX_M = 1


class UnquantizedLinearMethod(LinearMethod):
    def create_weights(self, layer: "Linear") -> None:
        # weight: [output_size_per_rank, input_size_per_rank]
        layer.weight = nn.Parameter(torch.empty(layer.output_size_per_rank,
                                                layer.input_size_per_rank), requires_grad=False)
        create_bias(layer)
        self.checkpoint_names = ("weight", "bias") if layer.has_bias else ("weight",)

    def load_weight(self, layer: "Linear", name: str, full_tensor: torch.Tensor,
                    shard_id: int = 0) -> None:
        rows = dense_weight_part(layer, name, full_tensor, shard_id, layer.weight.device,
                                 "an unquantized linear layer")
        if rows is None:
            return
        lo, hi = layer.part_range(shard_id)
        layer.weight.data[lo:hi].copy_(rows)

    def apply(self, layer: "Linear", x: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return dense_linear(x, layer.weight, bias, self.use_kernel)

    def apply_silu_mul(self, layer: "Linear", gate_up: torch.Tensor,
                       bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        # gate_up: [M, 2K] -> [M, N]; where the small-M GEMV runs (decode batches on CUDA) it
        # computes silu(gate) * up as it loads x: one launch instead of two, the same bits
        w = layer.weight  # [N, K]
        if self.use_kernel and gate_up.shape[0] <= SILU_MUL_MAX_M:
            from servelm.kernels.gemv import linear_small_m, use_small_m_kernel
            if use_small_m_kernel(gate_up.shape[0], w.shape[0], w.shape[1], w.dtype,
                                  gate_up.device):
                return linear_small_m(gate_up, w, bias, silu_mul=True)
        return super().apply_silu_mul(layer, gate_up, bias)
