"""Linear layers: the logical shape, the tensor-parallel split and the checkpoint parts of one
projection; the weights' layout and the matmul belong to its LinearMethod (servelm.quantization).

Merged projections (q|k|v, gate|up) stack several checkpoint tensors ("parts") along the output
dimension; each part is loaded on its own with ``shard_id`` = its index. Under tensor parallelism
a "column" layer holds this rank's slice of every part's rows (and the output stays split), a
"row" layer this rank's slice of the input columns (and its outputs are summed over the group).
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence, Union

import torch
from torch import nn

from servelm.distributed import ParallelGroup, shard_range
from servelm.quantization import get_linear_method

Parallel = Literal["replicated", "column", "row"]


class Linear(nn.Module):
    """y = x W^T (+ b), W logically [sum(output_sizes), input_size]. Parameters are created
    uninitialised by the method; loaders fill them."""

    def __init__(self, input_size: int, output_sizes: Union[int, Sequence[int]],
                 bias: bool = False, *, quantization=None, prefix: str = "",
                 use_kernel: bool = False, tp: ParallelGroup = ParallelGroup(),
                 parallel: Parallel = "replicated",
                 part_shards: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        parts = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        ws = tp.world_size if parallel != "replicated" else 1
        self.input_size, self.output_sizes = input_size, parts
        self.tp, self.parallel, self.prefix = tp, parallel, prefix
        # column-parallel: into how many equal shards each part splits (the world size, or
        # fewer where ranks share one: KV heads replicated when there are fewer than ranks);
        # rank r holds shard r * n // world_size of a part split n ways
        self.part_shards = ([1] * len(parts) if parallel != "column" else
                            [ws] * len(parts) if part_shards is None else list(part_shards))
        if parallel != "column" and part_shards is not None:
            raise ValueError(f"{prefix or 'linear'}: part_shards applies to column-parallel layers")
        if len(self.part_shards) != len(parts):
            raise ValueError(f"{prefix or 'linear'}: {len(self.part_shards)} part_shards for "
                             f"{len(parts)} parts")
        for p, n in zip(parts, self.part_shards):
            if n < 1 or ws % n or p % n:
                raise ValueError(f"{prefix or 'linear'} output part of size {p} does not split "
                                 f"evenly over {ws} ranks ({n} shards).")
        self.part_sizes = [p // n for p, n in zip(parts, self.part_shards)]
        self.part_offsets = [sum(self.part_sizes[:i]) for i in range(len(parts) + 1)]
        self.output_size_per_rank = self.part_offsets[-1]
        self.input_size_per_rank, self.input_start = input_size, 0
        if parallel == "row":
            lo, hi = shard_range(input_size, tp, f"{prefix or 'linear'} input")
            self.input_size_per_rank, self.input_start = hi - lo, lo
        self.has_bias = bias
        self.use_kernel = use_kernel  # Triton kernels (CUDA) where they apply, else torch ops
        # quantization: a servelm.quantization.QuantConfig, or None (dense)
        self.method = get_linear_method(quantization, prefix, use_kernel)
        self.method.create_weights(self)

    @property
    def num_parts(self) -> int:
        return len(self.output_sizes)

    def part_range(self, shard_id: int) -> tuple[int, int]:
        """[lo, hi) of part ``shard_id``'s rows on this rank."""
        if not 0 <= shard_id < self.num_parts:
            raise ValueError(f"{self.prefix}: part {shard_id} does not exist "
                             f"({self.num_parts} parts)")
        return self.part_offsets[shard_id], self.part_offsets[shard_id + 1]

    def row_shard(self, shard_id: int) -> tuple[int, int]:
        """[lo, hi) of checkpoint part ``shard_id``'s rows that this rank holds."""
        if not 0 <= shard_id < self.num_parts:
            raise ValueError(f"{self.prefix}: part {shard_id} does not exist "
                             f"({self.num_parts} parts)")
        n, size = self.part_shards[shard_id], self.part_sizes[shard_id]
        idx = self.tp.rank * n // self.tp.world_size if self.parallel == "column" else 0
        return idx * size, (idx + 1) * size

    def shard_rows(self, full: torch.Tensor, shard_id: int, what: str) -> torch.Tensor:
        """This rank's rows of checkpoint part ``shard_id`` (all of them unless column-parallel)."""
        lo, hi = self.row_shard(shard_id)
        if full.shape[0] != self.output_sizes[shard_id]:
            raise ValueError(f"{self.prefix}: checkpoint {what} has {full.shape[0]} rows, "
                             f"expected {self.output_sizes[shard_id]}")
        return full if hi - lo == full.shape[0] else full[lo:hi]

    def shard_cols(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """This rank's input columns of a 2-D tensor (all of them unless row-parallel)."""
        if t.dim() < 2 or self.parallel != "row" or self.tp.world_size == 1:
            return t
        lo, hi = shard_range(t.shape[1], self.tp, f"{self.prefix} {what} input")
        return t[:, lo:hi]

    def load_weight(self, name: str, full_tensor: torch.Tensor, shard_id: int = 0) -> None:
        self.method.load_weight(self, name, full_tensor, shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [M, input_size_per_rank] -> [M, output_size_per_rank]
        if self._sums_over_ranks:
            return self._all_reduce(self.method.apply(self, x))
        return self.method.apply(self, x, self.bias)

    def forward_silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """forward(silu(gate) * up) for gate_up: [M, 2 * input_size_per_rank] (gate | up, as a
        gate_up projection outputs it); the method may fuse the activation into its matmul."""
        if self._sums_over_ranks:
            return self._all_reduce(self.method.apply_silu_mul(self, gate_up))
        return self.method.apply_silu_mul(self, gate_up, self.bias)

    @property
    def _sums_over_ranks(self) -> bool:
        return self.parallel == "row" and self.tp.world_size > 1

    def _all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(partial)
        return y + self.bias if self.bias is not None else y  # the bias once, after the sum


def process_weights_after_loading(model: nn.Module) -> None:
    """Let every linear layer's method repack its weights once they are all in place."""
    for mod in model.modules():
        if isinstance(mod, Linear):
            mod.method.process_after_loading(mod)
