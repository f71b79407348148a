"""Process groups for one rank: a TCP store on the driver's host and a torch.distributed backend
object (gloo on the CPU, NCCL on GPUs) built from it, owned by the caller (torch's global
default group is never created, so a user's own process group is left alone)."""
from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass

from servelm.distributed.group import ParallelGroup

# how long a collective (or the rendezvous) may wait for the other ranks before it fails
COLLECTIVE_TIMEOUT_S = 600


def free_port() -> int:
    """A TCP port nothing listens on now (the OS's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_store(host: str, port: int, world_size: int, rank: int):
    """Rank 0 serves the store; the others connect. A port already taken is a clear error."""
    import torch.distributed as dist
    try:
        return dist.TCPStore(host, port, world_size, rank == 0,
                             timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
                             wait_for_workers=False)
    except (RuntimeError, OSError) as e:
        what = "serve" if rank == 0 else "reach"
        raise RuntimeError(f"rank {rank} could not {what} the process-group store at "
                           f"{host}:{port} ({e}); the port may be in use by another "
                           "program: free it or let servelm pick another.") from e


def _backend(store, name: str, rank: int, size: int, device: str) -> ParallelGroup:
    """A group of ``size`` ranks (this one is ``rank`` in it) under its own store prefix:
    NCCL where the device is a GPU, else gloo."""
    import torch
    import torch.distributed as dist
    if size == 1:
        return ParallelGroup()
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    prefixed = dist.PrefixStore(name, store)
    if device.startswith("cuda"):
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        torch.cuda.set_device(torch.device(device))
        pg = dist.ProcessGroupNCCL(prefixed, rank, size, opts)
    else:
        pg = dist.ProcessGroupGloo(prefixed, rank, size, timeout)
    return ParallelGroup(rank, size, pg)


@dataclass(frozen=True)
class RankGroups:
    """One rank's groups. Global rank g is tensor-parallel rank g % tp of pipeline stage
    pp - 1 - g // tp: rank 0 (the driver, whose output is reported) holds the last stage,
    which samples."""

    world: ParallelGroup  # every rank: the sampled tokens are broadcast from rank 0
    tp: ParallelGroup  # the ranks of this stage
    pp: ParallelGroup  # this tensor-parallel rank's peers in every stage; rank = stage index

    def distinct(self) -> list[ParallelGroup]:
        """Each group once (without stages the world is the tensor-parallel group)."""
        return list({id(g): g for g in (self.tp, self.pp, self.world)}.values())


def stage_of(rank: int, tp: int, pp: int) -> tuple[int, int]:
    """(pipeline stage, tensor-parallel rank) of global rank ``rank``."""
    return pp - 1 - rank // tp, rank % tp


def make_groups(store, rank: int, parallel, device: str) -> RankGroups:
    """Global rank ``rank``'s groups under ``parallel`` (a ParallelConfig). On GPUs the
    tensor-parallel group's small all-reduces go through the one-shot peer-memory all-reduce
    unless ``parallel.disable_custom_all_reduce``."""
    tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
    stage, tp_rank = stage_of(rank, tp, pp)
    world = _backend(store, "world", rank, tp * pp, device)
    tp_group = world if pp == 1 else _backend(store, f"tp{stage}", tp_rank, tp, device)
    if not parallel.disable_custom_all_reduce and tp > 1 and device.startswith("cuda"):
        import dataclasses

        import torch
        import torch.distributed as dist

        from servelm.distributed.one_shot import build_one_shot
        one_shot = build_one_shot(dist.PrefixStore(f"one_shot{stage}", store), tp_rank, tp,
                                  torch.device(device), tp_group.group)
        tp_group = dataclasses.replace(tp_group, one_shot=one_shot)
        if pp == 1:
            world = tp_group
    if pp == 1:
        return RankGroups(world, tp_group, ParallelGroup())
    return RankGroups(world, tp_group, _backend(store, f"pp{tp_rank}", stage, pp, device))


def close_group(group: ParallelGroup, timeout_s: float = 10.0) -> None:
    """End a group's communicators now (every rank calls this at the same time: NCCL's
    finalize is collective), rather than in a destructor at exit, which waits on peers that
    may be gone and can hang the process. Bounded: gives up after ``timeout_s``."""
    import threading
    pg = group.group
    if pg is None:
        return
    if group.one_shot is not None:
        group.one_shot.close()

    def close() -> None:
        try:
            pg.shutdown()
        except (AttributeError, RuntimeError):
            pass

    t = threading.Thread(target=close, name="servelm-close-group", daemon=True)
    t.start()
    t.join(timeout_s)
