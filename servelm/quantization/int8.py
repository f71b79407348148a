"""int8 weight-only linear layers (W8A16), converted at load: symmetric round-to-nearest,
``group_size`` input columns per scale (quantization/ref.py's layout):
``qweight`` int8 [N, K], ``scales`` [N, ceil(K / G)] in the model dtype.

Under tensor parallelism each rank quantizes its own rows (column-parallel) or its columns, in
the full tensor's groups (row-parallel: every rank's slice whole groups, else a ValueError);
with group_size -1 the one group is the full row, so each rank quantizes full rows and keeps
its columns. Either way every rank holds exactly its slice of the world-size-1 weights."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from servelm.quantization.base import (LinearMethod, check_input_split, create_bias,
                                       dense_weight_part, input_columns, native_max_m,
                                       splits_input)
from servelm.quantization.ref import int8_linear_ref, num_groups, quantize_int8

if TYPE_CHECKING:
    from servelm.layers.linear import Linear


# above this many rows, dequantize + cuBLAS beats the fused int8 GEMM (kernels/dequant_matmul.py;
# H100, Llama-3-8B layers x 32: M = 512 21.4 vs 22.7 ms, M = 2048 54.8 vs 81.5, M = 256 18.1 vs
# 14.3: the dequantize pass writes only ~0.6 TB/s)
INT8_DEQUANT_MATMUL_MIN_M = 384


class Int8LinearMethod(LinearMethod):
    def create_weights(self, layer: "Linear") -> None:
        K, N = layer.input_size_per_rank, layer.output_size_per_rank
        g = self.quant_config.group_size
        if g != -1:
            check_input_split(layer, g, f"int8 with groups of {g} input columns")
        self.group_size = self.quant_config.group_for(K, layer.prefix, layer.input_start)
        # group_size -1 split over ranks: the scale spans the full row (load_weight)
        self.whole_rows = g == -1 and splits_input(layer)
        layer.qweight = nn.Parameter(torch.empty(N, K, dtype=torch.int8), requires_grad=False)
        layer.scales = nn.Parameter(torch.empty(N, num_groups(K, self.group_size)),
                                    requires_grad=False)
        create_bias(layer)
        self.checkpoint_names = ("weight", "bias") if layer.has_bias else ("weight",)

    def load_weight(self, layer: "Linear", name: str, full_tensor: torch.Tensor,
                    shard_id: int = 0) -> None:
        # w: [n, K] of this part (all input columns if whole_rows), in the model dtype
        w = dense_weight_part(layer, name, full_tensor, shard_id, layer.qweight.device,
                              "an int8 layer converted at load", self.whole_rows)
        if w is None:
            return
        lo, hi = layer.part_range(shard_id)
        if self.whole_rows:
            q, s = quantize_int8(w.to(layer.scales.dtype), layer.input_size)  # s: [n, 1]
            c0, c1 = input_columns(layer)
            q = q[:, c0:c1]
        else:
            q, s = quantize_int8(w.to(layer.scales.dtype), self.group_size)
        layer.qweight.data[lo:hi].copy_(q)
        layer.scales.data[lo:hi].copy_(s)

    def process_after_loading(self, layer: "Linear") -> None:
        """On the CPU: the C kernels read qweight and scales in place for small M (cpu/)."""
        self.native = None
        if not self.use_kernel and layer.qweight.device.type == "cpu":
            from servelm.cpu.ops import native_linear_for
            self.native = native_linear_for(layer)

    def apply(self, layer: "Linear", x: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        native = getattr(self, "native", None)
        if native is not None and x.shape[0] <= native_max_m():
            y = native(x)  # the C GEMV over the int8 codes and group scales
            return y if bias is None else y + bias
        if self.use_kernel:
            from servelm.kernels.quant_matmul import int8_linear, use_quant_kernel
            if use_quant_kernel(x):
                if x.shape[0] > INT8_DEQUANT_MATMUL_MIN_M:
                    from servelm.kernels.dequant_matmul import int8_matmul_dequant
                    return int8_matmul_dequant(x, layer.qweight, layer.scales,
                                               self.group_size, bias)
                return int8_linear(x, layer.qweight, layer.scales, self.group_size, bias)
        return int8_linear_ref(x, layer.qweight, layer.scales, self.group_size, bias)
