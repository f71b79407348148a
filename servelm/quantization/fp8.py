"""fp8 W8A8 linear layers: e4m3 weights with one float32 scale per output channel, activations
quantized per token at run time (quantization/ref.py's layout): ``weight`` float8_e4m3fn [N, K],
``weight_scale`` float32 [N].

Weights come either dense (bf16/fp16/fp32: quantized per channel as they load) or already fp8
(``quant_method: fp8`` checkpoints, compressed-tensors' float-quantized layout): their
``weight_scale`` is one value per tensor (a [] or [1] tensor, per part of a merged layer) or one
per channel ([N] or [N, 1]) and is broadcast to channels here. A checkpoint's static
``input_scale`` is not used: activations are always scaled per token, dynamically, which is at
least as accurate as one static scale.

Under tensor parallelism a rank keeps its rows (column-parallel) or its input columns (row-
parallel) of the world-size-1 weights: a dense weight is quantized over full rows (the scale
spans the row) before the columns are sliced, as a pre-quantized checkpoint's scales do. A
row-parallel rank quantizes the activations of its own input columns per token, so the sum of
the ranks' outputs differs from world size 1 by that rounding, not by the weights.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from servelm.quantization.base import (LinearMethod, create_bias, input_columns, load_bias,
                                       load_rows)
from servelm.quantization.ref import FP8_DTYPE, fp8_linear_ref, quantize_fp8_per_channel

if TYPE_CHECKING:
    from servelm.layers.linear import Linear


class Fp8LinearMethod(LinearMethod):
    def create_weights(self, layer: "Linear") -> None:
        K, N = layer.input_size_per_rank, layer.output_size_per_rank
        self.dtype = torch.get_default_dtype()  # the model's (the runner builds under it)
        layer.weight = nn.Parameter(torch.empty(N, K, dtype=FP8_DTYPE), requires_grad=False)
        layer.weight_scale = nn.Parameter(torch.empty(N, dtype=torch.float32), requires_grad=False)
        create_bias(layer)
        names = ("weight", "weight_scale") if self.quant_config.prequantized else ("weight",)
        self.checkpoint_names = names + (("bias",) if layer.has_bias else ())

    def load_weight(self, layer: "Linear", name: str, full_tensor: torch.Tensor,
                    shard_id: int = 0) -> None:
        lo, hi = layer.part_range(shard_id)
        if name == "bias":
            return load_bias(layer, full_tensor, shard_id)
        if name == "input_scale":
            return  # static activation scale: activations are scaled per token (docstring)
        if name == "weight_scale":
            s = full_tensor.float().reshape(-1)
            if s.numel() == 1:  # per tensor (this part)
                layer.weight_scale.data[lo:hi].fill_(float(s))
            else:
                rows = layer.shard_rows(s, shard_id, f"weight_scale part {shard_id}")
                layer.weight_scale.data[lo:hi].copy_(rows)
            return
        if name != "weight":
            raise ValueError(f"{layer.prefix}: checkpoint tensor {name!r} has no place in an fp8 "
                             "linear layer (weight, weight_scale, input_scale, bias)")
        # w: [n, input_size], this rank's rows of the part, every input column
        w = load_rows(layer, name, full_tensor, shard_id, layer.weight.device, all_columns=True)
        c0, c1 = input_columns(layer)
        if w.dtype == FP8_DTYPE:
            if not self.quant_config.prequantized:
                raise ValueError(f"{layer.prefix}: an fp8 weight in a checkpoint without an fp8 "
                                 "quantization_config: its scales are unknown")
            layer.weight.data[lo:hi].copy_(w[:, c0:c1])
            return
        if not w.is_floating_point() or w.element_size() == 1:
            raise ValueError(f"{layer.prefix}: fp8 loads dense float or e4m3 weights, got {w.dtype}")
        # the dense engine's weights (model dtype), quantized per output channel (full rows)
        q, s = quantize_fp8_per_channel(w.to(self.dtype))
        layer.weight.data[lo:hi].copy_(q[:, c0:c1])
        layer.weight_scale.data[lo:hi].copy_(s)

    def apply(self, layer: "Linear", x: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        # x: [M, K] -> [M, N] in x's dtype
        if self.use_kernel:
            from servelm.kernels.quant_matmul import fp8_linear, use_quant_kernel
            if use_quant_kernel(x):
                return fp8_linear(x, layer.weight, layer.weight_scale, bias)
        return fp8_linear_ref(x, layer.weight, layer.weight_scale, bias)
