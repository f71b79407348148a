"""GGUF linear layers kept in llama.cpp's block formats (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K):
each weight stays the file's bytes, uint8 [N, row_bytes], dequantized inside the matmul
(kernels/gguf_matmul.py on CUDA; quantization/gguf_formats.py's reference elsewhere).

The loader hands a quantized tensor over as a ``GGUFWeight``; tensors the file stores as
F32/F16/BF16 (or in a block format without a kernel here) arrive dense. The parts of a merged
layer (q|k|v, gate|up) may differ in type (Q4_K_M files keep v and down in Q6_K): parts of one
type are concatenated into one [N, row_bytes] tensor (one matmul); otherwise each part keeps
its own tensor and matmul, and the outputs are concatenated.

Tensor parallelism: rows are independent, so a column-parallel rank keeps its rows' bytes; a
row-parallel rank keeps the bytes of its input columns in every row, which needs its slice to
be whole blocks (32 values for Q4_0/Q4_1/Q8_0, 256 for K-quants), else a ValueError.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from servelm.cpu.blocks import BLOCK_FORMATS, split_blocks
from servelm.quantization import cpu_int4
from servelm.quantization.base import (LinearMethod, check_input_split, create_bias,
                                       input_columns, load_bias, load_rows, native_max_m)
from servelm.quantization.gguf_formats import (GGUF_BLOCK_SIZES, gguf_row_bytes,
                                               gguf_type_name)
from servelm.quantization.unquantized import dense_linear

if TYPE_CHECKING:
    from servelm.layers.linear import Linear


Q4_0, Q4_1 = 2, 3  # ggml type ids


def _native_lib():
    from servelm.cpu import native
    return native.load()


def dequantize_blocks(blocks, dtype: torch.dtype) -> torch.Tensor:
    from servelm.cpu.blocks import dequantize
    return dequantize(blocks, dtype)




def _q4_fields(raw: torch.Tensor, ggml_type: int, k: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1 blocks [N, row_bytes] -> (codes [N, K] 0..15, scales [K / 32, N],
    offsets [K / 32, N]) with w = (q - 8) * scale + offset: Q4_0 d * (q - 8) has offset 0,
    Q4_1 d * q + m has offset m + 8 d. Element j < 16 of a block is qs[j] & 15, 16 + j qs[j] >> 4."""
    n, nb = raw.shape[0], k // 32
    ts = 18 if ggml_type == Q4_0 else 20
    blocks = raw.reshape(n, nb, ts)
    d = blocks[..., 0:2].contiguous().view(torch.float16).float().squeeze(-1)  # [N, nb]
    qs = blocks[..., ts - 16:].to(torch.int32)  # [N, nb, 16]
    q = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(n, k)
    if ggml_type == Q4_0:
        offsets = torch.zeros_like(d)
    else:
        m = blocks[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1)
        offsets = m + 8.0 * d
    return q, d.t(), offsets.t()


def _owned(t: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """t, a slice of ``full`` kept beyond loading: a copy when it still views a larger
    ``full``'s memory (a tensor-parallel shard), so the full tensor can be freed."""
    shares = t.untyped_storage().data_ptr() == full.untyped_storage().data_ptr()
    if shares and t.numel() < full.numel():
        return t.clone(memory_format=torch.contiguous_format)
    return t


@dataclass(frozen=True)
class GGUFWeight:
    """A quantized GGUF tensor as stored: raw [N, row_bytes] uint8 (row n = row n's blocks),
    its ggml type, and its logical shape (N, K)."""

    raw: torch.Tensor
    ggml_type: int
    shape: tuple[int, int]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from servelm.quantization.gguf_formats import dequantize_gguf
        return dequantize_gguf(self.raw, self.ggml_type, self.shape[1], dtype)


class GGUFLinearMethod(LinearMethod):
    def create_weights(self, layer: "Linear") -> None:
        self.dtype = torch.get_default_dtype()
        self.device = torch.empty(0).device  # the model is built under its device's context
        # per part: (ggml type or None for dense, tensor); the layout is known only once loaded
        self.parts: list[Optional[tuple[Optional[int], torch.Tensor]]] = [None] * layer.num_parts
        self.groups: list[tuple[Optional[int], int, int]] = []  # (type, row lo, row hi) per matmul
        create_bias(layer)
        self.checkpoint_names = ("weight", "bias") if layer.has_bias else ("weight",)

    def load_weight(self, layer: "Linear", name: str, full_tensor: Union[torch.Tensor, GGUFWeight],
                    shard_id: int = 0) -> None:
        if name == "bias":
            return load_bias(layer, full_tensor, shard_id)
        if name != "weight":
            raise ValueError(f"{layer.prefix}: GGUF linear layers take 'weight' and 'bias', not "
                             f"{name!r}")
        if isinstance(full_tensor, GGUFWeight):
            self.parts[shard_id] = (full_tensor.ggml_type, self._shard_blocks(layer, full_tensor,
                                                                              shard_id))
        else:
            w = load_rows(layer, name, full_tensor, shard_id, self.device).to(self.dtype)
            self.parts[shard_id] = (None, _owned(w, full_tensor))

    def _shard_blocks(self, layer: "Linear", weight: GGUFWeight, shard_id: int) -> torch.Tensor:
        """A part's blocks [N, row_bytes] as stored -> this rank's: uint8 [n, row_bytes of its
        input columns] on the layer's device."""
        n, k = weight.shape
        if k != layer.input_size or n != layer.output_sizes[shard_id]:
            raise ValueError(f"{layer.prefix}: GGUF weight part {shard_id} is {n} x {k}, "
                             f"expected {layer.output_sizes[shard_id]} x {layer.input_size}")
        row_bytes = gguf_row_bytes(weight.ggml_type, k)  # a ValueError for unknown types
        qk = GGUF_BLOCK_SIZES[int(weight.ggml_type)][0]
        if tuple(weight.raw.shape) != (n, row_bytes):
            raise ValueError(f"{layer.prefix}: GGUF weight part {shard_id} holds "
                             f"{tuple(weight.raw.shape)} bytes, expected ({n}, {row_bytes})")
        check_input_split(layer, qk, f"GGUF {gguf_type_name(weight.ggml_type)} blocks ({qk} "
                                     "input values each)")
        r0, r1 = layer.row_shard(shard_id)
        c0, c1 = input_columns(layer)
        raw = weight.raw[r0:r1, c0 * row_bytes // k:c1 * row_bytes // k]
        return _owned(raw.to(self.device), weight.raw).contiguous()

    def process_after_loading(self, layer: "Linear") -> None:
        if any(p is None for p in self.parts):
            raise ValueError(f"{layer.prefix}: GGUF weight parts missing")
        # consecutive parts of one type share a tensor (one matmul)
        tensors, self.groups = [], []
        for i, (kind, t) in enumerate(self.parts):
            lo, hi = layer.part_offsets[i], layer.part_offsets[i + 1]
            if self.groups and self.groups[-1][0] == kind:
                tensors[-1].append(t)
                self.groups[-1] = (kind, self.groups[-1][1], hi)
            else:
                tensors.append([t])
                self.groups.append((kind, lo, hi))
        # on the CPU the C kernels read Q4_0 / Q4_1 / Q8_0 (their scales moved beside the
        # blocks); without them (no compiler) Q4_0/Q4_1 get a packed int4 copy for PyTorch
        native = self.device.type == "cpu" and _native_lib() is not None
        for j, ts in enumerate(tensors):
            merged = torch.cat(ts) if len(ts) > 1 else ts[0]
            kind = self.groups[j][0]
            if native and kind in BLOCK_FORMATS:
                # the scales moved out of the blocks (cpu/blocks.py): the same bytes, no copy
                blocks = split_blocks(merged, kind)
                layer.register_buffer(f"weight_{j}_codes", blocks.codes)
                layer.register_buffer(f"weight_{j}_d", blocks.d)
                if blocks.m is not None:
                    layer.register_buffer(f"weight_{j}_m", blocks.m)
                continue
            if kind in (Q4_0, Q4_1) and cpu_int4.usable(merged.device, self.dtype, 32,
                                                        merged.shape[0]):
                # small M: the packed int4 kernel reads Q4_0/Q4_1 exactly (cpu_int4.py); prefill
                # dequantizes the blocks, kept as well
                k = layer.input_size_per_rank
                q, scales, offsets = _q4_fields(merged, kind, k)
                packed, sz = cpu_int4.pack(q, scales, offsets, 32, self.dtype)
                layer.register_buffer(f"weight_{j}_packed", packed)
                layer.register_buffer(f"weight_{j}_scales_zeros", sz)
            setattr(layer, f"weight_{j}", nn.Parameter(merged, requires_grad=False))
        self.parts = []  # the parameters hold them now
        self.native = None
        if native:
            from servelm.cpu.ops import native_linear_for
            self.native = native_linear_for(layer)

    def apply(self, layer: "Linear", x: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        # x: [M, K] -> [M, N]: one matmul per run of same-typed parts
        native = getattr(self, "native", None)
        if native is not None and x.shape[0] <= native_max_m():
            y = native(x)  # the C GEMV over the blocks as stored, all parts at once
            return y if bias is None else y + bias
        small = x.shape[0] <= cpu_int4.MAX_M
        outs = [cpu_int4.linear(x, getattr(layer, f"weight_{j}_packed"),
                                getattr(layer, f"weight_{j}_scales_zeros"), 32)
                if small and hasattr(layer, f"weight_{j}_packed")
                else F.linear(x, dequantize_blocks(self.split_blocks(layer, j), x.dtype))
                if hasattr(layer, f"weight_{j}_codes")
                else self._matmul(getattr(layer, f"weight_{j}"), kind, x)
                for j, (kind, _, _) in enumerate(self.groups)]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return y if bias is None else y + bias

    def split_blocks(self, layer: "Linear", j: int):
        """Group j's blocks in the CPU kernels' layout (cpu/blocks.SplitBlocks), or None where
        the group keeps the file's bytes (other formats, other devices)."""
        if not hasattr(layer, f"weight_{j}_codes"):
            return None
        from servelm.cpu.blocks import SplitBlocks
        return SplitBlocks(self.groups[j][0], getattr(layer, f"weight_{j}_codes"),
                           getattr(layer, f"weight_{j}_d"), getattr(layer, f"weight_{j}_m", None))

    def _matmul(self, w: torch.Tensor, kind: Optional[int], x: torch.Tensor) -> torch.Tensor:
        if kind is None:
            return dense_linear(x, w, None, self.use_kernel)
        k = x.shape[1]
        if self.use_kernel:
            from servelm.kernels.gguf_matmul import gguf_linear, use_gguf_kernel
            if use_gguf_kernel(x, kind):
                return gguf_linear(x, w, kind, k)
        from servelm.quantization.gguf_formats import gguf_linear_ref
        return gguf_linear_ref(x, w, kind)
