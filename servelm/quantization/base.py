"""LinearMethod: how one linear layer stores its weights and computes ``x @ W^T + b``.

The layer (``layers.linear.Linear``) knows its logical shape and how it is split over tensor-
parallel ranks; the method owns everything about the weights' layout: which parameters exist
(``create_weights``), how a checkpoint tensor becomes this rank's share of them (``load_weight``
receives the whole checkpoint tensor and slices its own shard, so quantized layouts and tensor
parallelism meet in one place), any repacking once all are loaded (``process_after_loading``),
and the matmul (``apply``; ``apply_silu_mul`` for a down projection whose input is still the
gate | up pair, so a method can fuse the activation into its matmul). One method object per
layer, chosen once from the registry; model files never branch on it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Optional

import torch

from servelm.layers.activation import silu_and_mul

if TYPE_CHECKING:
    from servelm.layers.linear import Linear


class LinearMethod(ABC):
    # the checkpoint tensors one part of a layer needs (each loaded once per part), set by
    # create_weights: the model's loader checks them all present
    checkpoint_names: tuple[str, ...] = ("weight",)
    # converting methods take a dense "weight" and quantize it as it loads; dummy weights reach
    # them that way (loader/dummy.py)
    accepts_dense: bool = True

    def __init__(self, quant_config=None, prefix: str = "", use_kernel: bool = False) -> None:
        self.quant_config = quant_config  # a quantization.config.QuantConfig, or None
        self.prefix = prefix
        self.use_kernel = use_kernel

    @abstractmethod
    def create_weights(self, layer: "Linear") -> None:
        """Register the layer's parameters (uninitialised) for this rank's shard:
        ``layer.output_size_per_rank`` x ``layer.input_size_per_rank`` logical elements, and
        ``layer.bias`` ([output_size_per_rank]) or None as ``layer.has_bias`` says."""

    @abstractmethod
    def load_weight(self, layer: "Linear", name: str, full_tensor: torch.Tensor,
                    shard_id: int = 0) -> None:
        """Copy checkpoint tensor ``name`` ("weight", "bias", or a quantized layout's own names)
        of part ``shard_id`` (q/k/v or gate/up of a merged layer; 0 for a plain one) into the
        layer, slicing this rank's shard out of the unsharded ``full_tensor``. Wrong shapes
        raise ValueError."""

    @abstractmethod
    def apply(self, layer: "Linear", x: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [M, input_size_per_rank] -> [M, output_size_per_rank] in x's dtype (+ bias)."""

    def apply_silu_mul(self, layer: "Linear", gate_up: torch.Tensor,
                       bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """gate_up: [M, 2 * input_size_per_rank] (gate | up, a gate_up projection's output) ->
        ``apply(layer, silu(gate) * up, bias)``. Methods whose matmul can compute the activation
        as it loads x override this (the unquantized small-M GEMV); the result must equal this
        default's in the activation dtype."""
        return self.apply(layer, silu_and_mul(gate_up, layer.use_kernel), bias)

    def process_after_loading(self, layer: "Linear") -> None:
        """Repack or convert once every weight is loaded (dummy weights included)."""


def load_rows(layer: "Linear", name: str, full: torch.Tensor, shard_id: int,
              device: torch.device, all_columns: bool = False) -> torch.Tensor:
    """This rank's slice of checkpoint part ``shard_id`` of a dense weight [out, in] (rows of
    the part; input columns too in a row-parallel layer, unless ``all_columns``: then every
    input column, [rows, input_size], for a method whose scales span whole rows) or bias
    [out], shape-checked, moved to ``device``; not yet copied anywhere."""
    rows = layer.shard_rows(full, shard_id, f"{name} part {shard_id}")
    if not all_columns:
        rows = layer.shard_cols(rows, name)
    lo, hi = layer.part_range(shard_id)
    k = layer.input_size if all_columns else layer.input_size_per_rank
    want = (hi - lo, k) if full.dim() == 2 else (hi - lo,)
    if tuple(rows.shape) != want:
        raise ValueError(f"{layer.prefix}: checkpoint {name} part {shard_id} has shape "
                         f"{tuple(full.shape)}, which gives a shard of {tuple(rows.shape)}; this "
                         f"rank expects {want}")
    return rows.to(device)


def dense_weight_part(layer: "Linear", name: str, full: torch.Tensor, shard_id: int,
                      device: torch.device, what: str,
                      all_columns: bool = False) -> Optional[torch.Tensor]:
    """The shared start of ``load_weight`` for methods fed dense checkpoints: a "bias" is
    loaded here (None returned); a "weight" gives this rank's rows of part ``shard_id`` on
    ``device`` (its input columns, or all of them with ``all_columns``) for the method to store
    or quantize; any other name is a ValueError naming ``what`` layer this is."""
    if name == "bias":
        load_bias(layer, full, shard_id)
        return None
    if name != "weight":
        raise ValueError(f"{layer.prefix}: checkpoint tensor {name!r} has no place in {what} "
                         "(it takes a dense 'weight' and 'bias')")
    return load_rows(layer, name, full, shard_id, device, all_columns)


def splits_input(layer: "Linear") -> bool:
    """Whether this layer's ranks each hold a slice of the input columns (row-parallel)."""
    return layer.parallel == "row" and layer.tp.world_size > 1


def input_columns(layer: "Linear") -> tuple[int, int]:
    """[lo, hi) of the full tensor's input columns this rank holds."""
    return layer.input_start, layer.input_start + layer.input_size_per_rank


def check_input_split(layer: "Linear", unit: int, what: str) -> None:
    """A row-parallel layer's input columns split where ``what`` allows: every rank's slice a
    whole number of ``unit`` columns of the full tensor (a GGUF block, a quantization group, 8
    columns packed in an int32). The condition is the same on every rank, so all raise."""
    ws, k = layer.tp.world_size, layer.input_size_per_rank
    if not splits_input(layer) or k % unit == 0:
        return
    fits = [1] + [d for d in range(2, max(8, ws) + 1) if layer.input_size % (d * unit) == 0]
    sizes = ", ".join(map(str, fits[:-1])) + " or " + str(fits[-1]) if len(fits) > 1 else "1"
    raise ValueError(f"{layer.prefix or 'linear'}: {what} cannot be split over {ws} tensor-"
                     f"parallel ranks: the input size {layer.input_size} / {ws} ranks = {k} "
                     f"columns per rank, not a multiple of {unit}. Use tensor_parallel_size "
                     f"{sizes} for this layer.")


def load_bias(layer: "Linear", full: torch.Tensor, shard_id: int) -> None:
    if layer.bias is None:
        raise ValueError(f"{layer.prefix}: checkpoint has a bias this layer was built without")
    lo, hi = layer.part_range(shard_id)
    layer.bias.data[lo:hi].copy_(load_rows(layer, "bias", full, shard_id, layer.bias.device))


def create_bias(layer: "Linear", dtype: Optional[torch.dtype] = None) -> None:
    from torch import nn
    layer.bias = (nn.Parameter(torch.empty(layer.output_size_per_rank, dtype=dtype),
                               requires_grad=False) if layer.has_bias else None)


def native_max_m() -> int:
    """Rows up to which the CPU's C GEMV (servelm/cpu/ops.py) takes a layer's matmul."""
    from servelm.cpu.ops import native_max_m as for_this_cpu
    return for_this_cpu()
