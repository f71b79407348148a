"""ParallelGroup: one rank's view of a group of ranks (tensor-parallel, pipeline stages), handed to
the layers that shard or communicate. World size 1 (the default) means no communication at all."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch


@dataclass(frozen=True)
class ParallelGroup:
    rank: int = 0
    world_size: int = 1
    group: Optional[Any] = None  # a torch.distributed ProcessGroup; None when world_size == 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a group of {self.world_size}.")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the group's ranks, in place; x itself when alone."""
        if self.world_size == 1:
            return x
        import torch.distributed as dist
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The ranks' x concatenated along ``dim`` in rank order; x itself when alone."""
        if self.world_size == 1:
            return x
        import torch.distributed as dist
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)


def shard_range(size: int, group: ParallelGroup, what: str = "dimension") -> tuple[int, int]:
    """[start, end) of this rank's equal shard of ``size`` items."""
    if size % group.world_size:
        raise ValueError(f"{what} of size {size} does not split evenly over "
                         f"{group.world_size} ranks.")
    n = size // group.world_size
    return group.rank * n, (group.rank + 1) * n
