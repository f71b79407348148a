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

Tensor parallelism: each rank takes its output columns (column-parallel; the int32 words that
hold them are unpacked, so a split needs no word boundary) or its input rows and their groups
(row-parallel: each rank's slice whole groups and, for the int4 layout, whole words of 8 rows,
else a ValueError). An act-order checkpoint splits by rows only where each rank's input columns
make up whole groups of their own (g_idx's groups are otherwise scattered over the ranks, and
the int4 layout keeps G consecutive columns per group); otherwise a ValueError.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING

import torch

from servelm.quantization.base import input_columns, splits_input
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
    # each checkpoint tensor's layout: (its rows: "k" an input column each, or "group";
    # whether 8 rows pack into an int32; the nibble order of 8 output columns packed into an
    # int32, or None where the columns are plain)
    layouts = MappingProxyType({"qweight": ("k", True, None),
                                "qzeros": ("group", False, tuple(range(8))),
                                "scales": ("group", False, None)})

    def create_weights(self, layer: "Linear") -> None:
        super().create_weights(layer)  # checks a row split against words and groups
        K = layer.input_size_per_rank
        # the checkpoint's groups over the full input (-1: one group, the whole row), and the
        # [lo, hi) of them this rank's input columns fall in
        whole_row = self.quant_config.group_size == -1
        self.full_group = layer.input_size if whole_row else self.group_size
        c0, c1 = input_columns(layer)
        self.group_rows = (c0 // self.full_group, num_groups(c1, self.full_group))
        layer.register_buffer("g_idx", torch.arange(K, dtype=torch.int32) // self.group_size)
        self.g_idx_loaded = False
        names = ("qweight", "qzeros", "scales")
        self.checkpoint_names = names + (("bias",) if layer.has_bias else ())

    def load_weight(self, layer: "Linear", name: str, full_tensor: torch.Tensor,
                    shard_id: int = 0) -> None:
        if name == "bias":
            return super().load_weight(layer, name, full_tensor, shard_id)
        if name == "g_idx":
            return self._load_g_idx(layer, full_tensor)
        if name not in self.layouts:
            raise ValueError(f"{layer.prefix}: checkpoint tensor {name!r} has no place in a "
                             f"{self.quant_config.method} layer (qweight, qzeros, scales, "
                             "g_idx, bias)")
        t = self._take(layer, name, full_tensor, shard_id)  # [K or groups of this rank, n]
        lo, hi = layer.part_range(shard_id)
        if name == "qweight":
            layer.qweight.data[:, lo:hi].copy_(pack_int4(t))
        elif name == "scales":
            layer.scales.data[:, lo:hi].copy_(t)
        else:
            offset = self.quant_config.zero_offset
            layer.zeros.data[:, lo:hi].copy_((t + offset).to(layer.zeros.dtype))

    def _take(self, layer: "Linear", name: str, t: torch.Tensor, shard_id: int) -> torch.Tensor:
        """Checkpoint tensor ``name`` of part ``shard_id`` (the full one, as stored) -> this
        rank's values, unpacked, on the layer's device: [input_size_per_rank or this rank's
        groups, this rank's rows of the part]."""
        rows_of, packed_rows, order = self.layouts[name]
        n = layer.output_sizes[shard_id]
        full_rows = (layer.input_size if rows_of == "k" else
                     num_groups(layer.input_size, self.full_group))
        r0, r1 = input_columns(layer) if rows_of == "k" else self.group_rows
        want = (full_rows // 8 if packed_rows else full_rows, n // 8 if order else n)
        packed = packed_rows or order is not None
        if packed and t.dtype != torch.int32:
            raise ValueError(f"{layer.prefix}: checkpoint {name} is {t.dtype}, expected int32 "
                             "(4-bit packed)")
        if order is not None and n % 8:
            raise ValueError(f"{layer.prefix}: part {shard_id} has {n} outputs; "
                             f"{self.quant_config.method} packs 8 output columns per int32")
        if t.dim() != 2 or tuple(t.shape) != want:
            raise ValueError(f"{layer.prefix}: checkpoint {name} part {shard_id} has shape "
                             f"{tuple(t.shape)}, expected {want} (input size {layer.input_size}"
                             f", {n} outputs, group size {self.full_group})")
        t = t[r0 // 8:r1 // 8] if packed_rows else t[r0:r1]
        c0, c1 = layer.row_shard(shard_id)  # this rank's output columns of the part
        device = layer.qweight.device
        if order is not None:  # unpack just the words that hold columns c0..c1
            w0 = c0 // 8
            return unpack_cols(t[:, w0:-(-c1 // 8)].to(device), order)[:, c0 - 8 * w0:c1 - 8 * w0]
        t = t[:, c0:c1].to(device)
        return unpack_int4(t) if packed_rows else t

    def _load_g_idx(self, layer: "Linear", full: torch.Tensor) -> None:
        g = full.reshape(-1)
        if g.numel() != layer.input_size:
            raise ValueError(f"{layer.prefix}: g_idx has {g.numel()} entries, expected "
                             f"{layer.input_size}")
        # this rank's input columns, numbered by its own groups
        c0, c1 = input_columns(layer)
        g = g[c0:c1].to(device=layer.g_idx.device, dtype=torch.int32) - self.group_rows[0]
        if splits_input(layer) and not torch.equal(torch.sort(g).values, self._natural(layer)):
            raise ValueError(
                f"{layer.prefix}: this act-order (desc_act) checkpoint puts input columns "
                f"{c0}..{c1 - 1} (rank {layer.tp.rank} of {layer.tp.world_size}) in groups that "
                "other ranks' columns share, and a row-parallel shard must hold whole groups. "
                "Use tensor_parallel_size 1, or a checkpoint quantized without desc_act (or "
                "with static_groups).")
        if self.g_idx_loaded and not torch.equal(g, layer.g_idx):
            raise ValueError(f"{layer.prefix}: the parts of this merged layer have different "
                             "g_idx (act-order permutations); they must share one")
        layer.g_idx.copy_(g)
        self.g_idx_loaded = True

    def _natural(self, layer: "Linear") -> torch.Tensor:
        """g_idx without act-order: [input_size_per_rank], G consecutive columns per group."""
        K = layer.input_size_per_rank
        return torch.arange(K, dtype=torch.int32, device=layer.g_idx.device) // self.group_size

    def process_after_loading(self, layer: "Linear") -> None:
        natural = self._natural(layer)
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
    layouts = MappingProxyType({"qweight": ("k", False, AWQ_ORDER),
                                "qzeros": ("group", False, AWQ_ORDER),
                                "scales": ("group", False, None)})

    def load_weight(self, layer: "Linear", name: str, full_tensor: torch.Tensor,
                    shard_id: int = 0) -> None:
        if name == "g_idx":
            raise ValueError(f"{layer.prefix}: AWQ checkpoints have no g_idx")
        super().load_weight(layer, name, full_tensor, shard_id)
