"""Process groups for one rank: a TCP store on the driver's host and a torch.distributed backend
object (gloo on the CPU, NCCL on GPUs) built from it, owned by the caller (torch's global
default group is never created, so a user's own process group is left alone)."""
from __future__ import annotations

import datetime
import socket

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


def make_group(store, rank: int, world_size: int, device: str) -> ParallelGroup:
    """One group over all ranks: NCCL where the device is a GPU, else gloo."""
    import torch
    import torch.distributed as dist
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    prefixed = dist.PrefixStore("tp", store)
    if device.startswith("cuda"):
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        torch.cuda.set_device(torch.device(device))
        pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, opts)
    else:
        pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    return ParallelGroup(rank, world_size, pg)


def close_group(group: ParallelGroup, timeout_s: float = 10.0) -> None:
    """End a group's communicators now (every rank calls this at the same time: NCCL's
    finalize is collective), rather than in a destructor at exit, which waits on peers that
    may be gone and can hang the process. Bounded: gives up after ``timeout_s``."""
    import threading
    pg = group.group
    if pg is None:
        return

    def close() -> None:
        try:
            pg.shutdown()
        except (AttributeError, RuntimeError):
            pass

    t = threading.Thread(target=close, name="servelm-close-group", daemon=True)
    t.start()
    t.join(timeout_s)
