"""int4 weight-only linear layers (W4A16): the GPTQ layout of quantization/ref.py, converted at
load from a dense checkpoint (``int4``: round-to-nearest, asymmetric, ``group_size`` columns per
scale), or loaded as stored (``gptq``, ``awq``: quantization/gptq.py, awq.py subclass this).

Parameters (K = input_size_per_rank, N = output_size_per_rank, G = group size):
``qweight`` int32 [K // 8, N], ``scales`` and ``zeros`` [ceil(K / G), N] in the model dtype.

Under tensor parallelism each rank quantizes its own rows (column-parallel) or its input
columns in the full tensor's groups (row-parallel: each rank's slice whole groups and whole
int32 words, else a ValueError); with group_size -1 the one group is the full row, so each rank
quantizes full rows and keeps its columns. ``quantize_int4`` works group by group, so every
rank holds exactly its slice of the world-size-1 weights.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from servelm.quantization import cpu_int4
from servelm.quantization.base import (LinearMethod, check_input_split, create_bias,
                                       dense_weight_part, input_columns, native_max_m,
                                       splits_input)
from servelm.quantization.ref import int4_linear_ref, num_groups, quantize_int4, unpack_int4

if TYPE_CHECKING:
    from servelm.layers.linear import Linear


# above this many rows, dequantize + cuBLAS beats the fused int4 GEMM (kernels/dequant_matmul.py;
# H100, Llama-3-8B layers x 32: M = 256 13.2 vs 16.7 ms, M = 512 16.9 vs 27.6, M = 2048 47.9 vs
# 94.2 (bf16 41.4); M = 64 11.9 vs 8.6)
DEQUANT_MATMUL_MIN_M = 128


def _param(*shape: int, dtype: Optional[torch.dtype] = None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class Int4LinearMethod(LinearMethod):
    def create_weights(self, layer: "Linear") -> None:
        K, N = layer.input_size_per_rank, layer.output_size_per_rank
        method, g = self.quant_config.method, self.quant_config.group_size
        check_input_split(layer, 8, f"{method} (8 input columns packed per int32)")
        if K % 8:
            raise ValueError(f"{layer.prefix}: int4 packs 8 input columns per int32; the input "
                             f"size {K} is not a multiple of 8")
        if g != -1:
            check_input_split(layer, g, f"{method} with groups of {g} input columns")
        self.group_size = self.quant_config.group_for(K, layer.prefix, layer.input_start)
        # group_size -1 split over ranks: the group spans the full row (load_weight)
        self.whole_rows = g == -1 and splits_input(layer)
        layer.qweight = _param(K // 8, N, dtype=torch.int32)
        groups = num_groups(K, self.group_size)
        layer.scales = _param(groups, N)  # the default dtype: the model's
        layer.zeros = _param(groups, N)
        create_bias(layer)
        self.checkpoint_names = ("weight", "bias") if layer.has_bias else ("weight",)

    def load_weight(self, layer: "Linear", name: str, full_tensor: torch.Tensor,
                    shard_id: int = 0) -> None:
        # w: [n, K] of this part (all input columns if whole_rows), in the model dtype (the
        # dense engine's weights), quantized here
        w = dense_weight_part(layer, name, full_tensor, shard_id, layer.qweight.device,
                              "an int4 layer converted at load", self.whole_rows)
        if w is None:
            return
        lo, hi = layer.part_range(shard_id)
        if self.whole_rows:
            q, s, z = quantize_int4(w.to(layer.scales.dtype), layer.input_size)  # one group
            c0, c1 = input_columns(layer)
            q = q[c0 // 8:c1 // 8]  # qweight rows: 8 input columns each
        else:
            q, s, z = quantize_int4(w.to(layer.scales.dtype), self.group_size)
        layer.qweight.data[:, lo:hi].copy_(q)
        layer.scales.data[:, lo:hi].copy_(s)
        layer.zeros.data[:, lo:hi].copy_(z)

    def process_after_loading(self, layer: "Linear") -> None:
        """On the CPU: a copy in the C kernels' Q4 layout (cpu/blocks.py) for small M where
        they are built, else (bf16/fp16 activations) PyTorch's packed int4 layout
        (quantization/cpu_int4.py); prefill keeps the reference path."""
        self.native = None
        if not self.use_kernel and layer.qweight.device.type == "cpu":
            from servelm.cpu import native
            if native.load() is not None and getattr(layer, "input_perm", None) is None:
                from servelm.cpu.blocks import int4_blocks
                blocks = int4_blocks(layer.qweight, layer.scales, layer.zeros, self.group_size)
                if blocks is not None:
                    layer.register_buffer("cpu_codes", blocks.codes)
                    layer.register_buffer("cpu_d", blocks.d)
                    layer.register_buffer("cpu_m", blocks.m)
                    from servelm.cpu.ops import native_linear_for
                    self.native = native_linear_for(layer)
                    return
        if self.use_kernel or not cpu_int4.usable(layer.qweight.device, layer.scales.dtype,
                                                   self.group_size, layer.qweight.shape[1]):
            return
        s, z = layer.scales.float(), layer.zeros.float()
        packed, sz = cpu_int4.pack(unpack_int4(layer.qweight).t(), s, (8.0 - z) * s,
                                   self.group_size, layer.scales.dtype)
        layer.register_buffer("cpu_packed", packed)
        layer.register_buffer("cpu_scales_zeros", sz)

    def apply(self, layer: "Linear", x: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        # x: [M, K] -> [M, N]
        native = getattr(self, "native", None)
        if native is not None and x.shape[0] <= native_max_m():
            y = native(x)  # the C GEMV (cpu/), all groups of this layer
            return y if bias is None else y + bias
        x = self._permute_input(layer, x)
        packed = getattr(layer, "cpu_packed", None)
        if packed is not None and x.shape[0] <= cpu_int4.MAX_M:
            return cpu_int4.linear(x, packed, layer.cpu_scales_zeros, self.group_size, bias)
        if self.use_kernel:
            from servelm.kernels.quant_matmul import int4_linear, use_quant_kernel
            if use_quant_kernel(x):
                if x.shape[0] > DEQUANT_MATMUL_MIN_M:
                    from servelm.kernels.dequant_matmul import int4_matmul_dequant
                    return int4_matmul_dequant(x, layer.qweight, layer.scales, layer.zeros,
                                               self.group_size, bias)
                return int4_linear(x, layer.qweight, layer.scales, layer.zeros, self.group_size, bias)
        return int4_linear_ref(x, layer.qweight, layer.scales, layer.zeros, self.group_size, bias)

    def cpu_blocks(self, layer: "Linear"):
        """The copy for the C kernels (cpu/blocks.SplitBlocks), or None where none was made."""
        if not hasattr(layer, "cpu_codes"):
            return None
        from servelm.cpu.blocks import SplitBlocks
        return SplitBlocks(3, layer.cpu_codes, layer.cpu_d, layer.cpu_m, self.group_size)

    def _permute_input(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        """GPTQ act-order layers keep their input columns sorted by group (gptq.py)."""
        perm = getattr(layer, "input_perm", None)
        return x if perm is None else x.index_select(1, perm)
