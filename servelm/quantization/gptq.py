"""GPTQ and AWQ 4-bit checkpoints, loaded as stored into the int4 layout (quantization/int4.py,
whose kernels they share).

GPTQ (AutoGPTQ / GPTQModel, ``quant_method: gptq``, bits 4): ``qweight`` int32 [K // 8, N]
(8 input rows per int32, low nibble first), ``qzeros`` int32 [K // G, N // 8] (8 output columns
per int32, low nibble first), ``scales`` fp16 [K // G, N], ``g_idx`` int32 [K] (the group of each
input column). w = (q - zero) * scale, where checkpoint_format "gptq" (v1) stores zero - 1 and
"gptq_v2" the zero itself. With act-order (desc_act) g_idx is a permutation of groups: the input
columns are sorted by group once at load and x is gathered in that order at run time.

AWQ (AutoAWQ GEMM, ``quant_method: awq``): ``qweight`` int32 [K, N // 8] and ``qzeros`` int32
[K // G, N // 8], both packing 8 output columns per int32 in the order 0, 2, 4, 6, 1, 3, 5, 7
(nibble i holds column AWQ_ORDER[i]); ``scales`` fp16 [K // G, N]; w = (q - zero) * scale.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from servelm.quantization.int4 import Int4LinearMethod
from servelm.quantization.ref import num_groups, pack_int4, unpack_int4

if TYPE_CHECKING:
    from servelm.layers.linear import Linear

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def unpack_cols(packed: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """int32 [R, C // 8] with 8 nibbles per value along the columns -> int32 [R, C] in 0..15;
    nibble i of packed[:, c] is column c * 8 + order[i]."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32) * 4
    nib = (packed.unsqueeze(2) >> shifts) & 0xF  # [R, C // 8, 8]: nibble i
    out = torch.empty_like(nib)
    out[:, :, list(order)] = nib
    return out.reshape(packed.shape[0], -1)


class GPTQLinearMethod(Int4LinearMethod):
    accepts_dense = False
    def create_weights(self, layer: "Linear") -> None:
        if layer.tp.world_size > 1 and layer.parallel != "replicated":
            raise ValueError(f"{layer.prefix}: pre-quantized int4 checkpoints under tensor "
                             "parallelism are not supported yet; use tensor_parallel_size=1")
        super().create_weights(layer)
        K = layer.input_size_per_rank
        layer.register_buffer("g_idx", torch.arange(K, dtype=torch.int32) // self.group_size)
        self.g_idx_loaded = False
        names = ("qweight", "qzeros", "scales")
        self.checkpoint_names = names + (("bias",) if layer.has_bias else ())

    def _part_n(self, layer: "Linear", t: torch.Tensor, shard_id: int, what: str) -> torch.Tensor:
        """Check that ``t`` [*, n] has this part's n output columns; on the layer's device."""
        lo, hi = layer.part_range(shard_id)
        if t.dim() != 2 or t.shape[1] != hi - lo:
            raise ValueError(f"{layer.prefix}: checkpoint {what} part {shard_id} gives shape "
                             f"{tuple(t.shape)}, expected [*, {hi - lo}] columns")
        return t.to(layer.qweight.device)

    def _check_rows(self, layer: "Linear", t: torch.Tensor, rows: int, what: str) -> None:
        if t.shape[0] != rows:
            raise ValueError(f"{layer.prefix}: checkpoint {what} has {t.shape[0]} rows, expected "
                             f"{rows} (input size {layer.input_size_per_rank}, group size "
                             f"{self.group_size})")

    def load_weight(self, layer: "Linear", name: str, full_tensor: torch.Tensor,
                    shard_id: int = 0) -> None:
        if name == "bias":
            return super().load_weight(layer, name, full_tensor, shard_id)
        if name not in ("qweight", "qzeros", "scales", "g_idx"):
            raise ValueError(f"{layer.prefix}: checkpoint tensor {name!r} has no place in a "
                             f"{self.quant_config.method} layer (qweight, qzeros, scales, "
                             "g_idx, bias)")
        lo, hi = layer.part_range(shard_id)
        K = layer.input_size_per_rank
        groups = num_groups(K, self.group_size)
        t = full_tensor
        if name == "g_idx":
            g = t.to(device=layer.g_idx.device, dtype=torch.int32).reshape(-1)
            if g.numel() != K:
                raise ValueError(f"{layer.prefix}: g_idx has {g.numel()} entries, expected {K}")
            if self.g_idx_loaded and not torch.equal(g, layer.g_idx):
                raise ValueError(f"{layer.prefix}: the parts of this merged layer have different "
                                 "g_idx (act-order permutations); they must share one")
            layer.g_idx.copy_(g)
            self.g_idx_loaded = True
            return
        if name == "scales":
            self._check_rows(layer, t, groups, name)
            layer.scales.data[:, lo:hi].copy_(self._part_n(layer, t, shard_id, name))
            return
        q = self._unpack(t.to(layer.qweight.device), name)  # [K or groups, n] values 0..15
        q = self._part_n(layer, q, shard_id, name)
        if name == "qweight":
            self._check_rows(layer, q, K, name)
            layer.qweight.data[:, lo:hi].copy_(pack_int4(q))
        else:
            self._check_rows(layer, q, groups, name)
            offset = self.quant_config.zero_offset
            layer.zeros.data[:, lo:hi].copy_((q + offset).to(layer.zeros.dtype))

    def _unpack(self, t: torch.Tensor, name: str) -> torch.Tensor:
        """A stored qweight/qzeros -> int values [rows, n] (rows: K for qweight, groups)."""
        if t.dtype != torch.int32:
            raise ValueError(f"checkpoint {name} is {t.dtype}, expected int32 (4-bit packed)")
        return unpack_int4(t) if name == "qweight" else unpack_cols(t)

    def process_after_loading(self, layer: "Linear") -> None:
        K = layer.input_size_per_rank
        natural = torch.arange(K, dtype=torch.int32, device=layer.g_idx.device) // self.group_size
        if not torch.equal(layer.g_idx, natural):
            # act-order: sort the input columns by group; each group must then be G columns
            perm = torch.argsort(layer.g_idx, stable=True)
            if not torch.equal(layer.g_idx[perm], natural):
                raise ValueError(f"{layer.prefix}: g_idx does not assign {self.group_size} input "
                                 "columns to each group")
            layer.qweight.data.copy_(pack_int4(unpack_int4(layer.qweight.data)[perm]))
            layer.register_buffer("input_perm", perm)  # x[:, perm] matches the sorted rows
        super().process_after_loading(layer)


class AWQLinearMethod(GPTQLinearMethod):
    def _unpack(self, t: torch.Tensor, name: str) -> torch.Tensor:
        if t.dtype != torch.int32:
            raise ValueError(f"checkpoint {name} is {t.dtype}, expected int32 (4-bit packed)")
        return unpack_cols(t, AWQ_ORDER)  # qweight [K, n] and qzeros [groups, n] alike

    def load_weight(self, layer: "Linear", name: str, full_tensor: torch.Tensor,
                    shard_id: int = 0) -> None:
        if name == "g_idx":
            raise ValueError(f"{layer.prefix}: AWQ checkpoints have no g_idx")
        super().load_weight(layer, name, full_tensor, shard_id)
