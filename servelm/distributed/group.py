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
    # a torch.distributed backend object (ProcessGroupGloo / ProcessGroupNCCL) built by the
    # executor and called directly, so no torch-global default group is needed; None alone
    group: Optional[Any] = None
    # CUDA: the one-shot peer-memory all-reduce for small tensors (distributed/one_shot.py);
    # None: every all-reduce goes through ``group``
    one_shot: Optional[Any] = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a group of {self.world_size}.")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the group's ranks: x itself when alone, x summed in place (NCCL,
        gloo), or a new tensor (the one-shot all-reduce); use the returned tensor."""
        if self.world_size == 1:
            return x
        if self.one_shot is not None and self.one_shot.fits(x):
            return self.one_shot(x)
        self.group.allreduce([x]).wait()
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The ranks' x concatenated along ``dim`` in rank order; x itself when alone."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        # [ws * rows, ...] in one collective, then the rank blocks moved to ``dim``
        out = torch.empty((self.world_size * x.shape[0], *x.shape[1:]), dtype=x.dtype,
                          device=x.device)
        self.group._allgather_base(out, x).wait()
        if dim in (0, -x.dim()):
            return out
        return torch.cat(out.chunk(self.world_size, dim=0), dim=dim)

    def broadcast_async(self, x: torch.Tensor, src: int = 0) -> Any:
        """broadcast, returning at once a handle whose wait() returns once x holds the value
        (None when alone)."""
        if self.world_size == 1:
            return None
        return self.group.broadcast(x, src)

    def send(self, x: torch.Tensor, dst: int) -> None:
        """x to group rank ``dst`` (which receives it with recv); returns once sent."""
        self.group.send([x.contiguous()], dst, 0).wait()

    def recv(self, x: torch.Tensor, src: int) -> torch.Tensor:
        """Fills x (of the sent shape and dtype) from group rank ``src``."""
        self.group.recv([x], src, 0).wait()
        return x

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """x of the group's rank ``src``, in place on every rank."""
        if self.world_size == 1:
            return x
        self.group.broadcast(x, src).wait()
        return x


class _Done:
    def wait(self) -> bool:
        return True


class _NoComm:
    """A stand-in backend whose collectives touch only this rank's tensors (with the shapes
    the real ones would give): for dry runs that trace what a rank computes without the other
    ranks taking part."""

    def allreduce(self, tensors):
        return _Done()

    def _allgather_base(self, out, x):
        out.copy_(x.repeat((out.shape[0] // x.shape[0],) + (1,) * (x.dim() - 1)))
        return _Done()

    def broadcast(self, x, src):
        return _Done()


def without_communication(group: ParallelGroup) -> ParallelGroup:
    """The same rank and world size (so layers shard alike), with collectives that do not
    communicate: a dry run on one rank must not wait for the others."""
    if group.world_size == 1:
        return group
    return ParallelGroup(group.rank, group.world_size, _NoComm())


def shard_range(size: int, group: ParallelGroup, what: str = "dimension") -> tuple[int, int]:
    """[start, end) of this rank's equal shard of ``size`` items."""
    if size % group.world_size:
        raise ValueError(f"{what} of size {size} does not split evenly over "
                         f"{group.world_size} ranks.")
    n = size // group.world_size
    return group.rank * n, (group.rank + 1) * n
