"""One-shot all-reduce over NVLink peer memory for the small all-reduces of tensor-parallel
decode (a few KiB to a few hundred KiB: one step's hidden states), as vLLM's custom all-reduce
does. Each rank copies its tensor into a buffer every rank of the group has mapped (torch's
symmetric memory: CUDA IPC handles exchanged through the group's store), meets the others at a
barrier of flags in that memory, and sums all ranks' copies itself: one kernel, no NCCL
launch, capturable in the decode CUDA graph. Eager NCCL costs ~34 us per call at these sizes
on an H100 and a captured one ~20 us; this one ~8 us captured (``../shared/H100_FACTS.md``).
Larger tensors (prefill, big eager batches) stay on NCCL, whose ring/tree uses the links'
bandwidth better.

NVLink multicast (multimem) is never used: the machines this runs on forbid it, and
``TORCH_SYMM_MEM_DISABLE_MULTICAST`` is set before any buffer is mapped."""
from __future__ import annotations

import logging
import os
import uuid
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)

# dtypes tried; those torch's one-shot kernel sums (bf16, fp32 in PyTorch 2.11; not fp16) are
# kept by a probe at set-up, the others go to NCCL
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def default_max_bytes(world_size: int) -> int:
    """The largest all-reduce taken off NCCL. On 2 H200s the one-shot beat NCCL at every size
    measured up to 4 MiB (a 512-row decode graph of a 4096-wide bf16 model), captured in a
    graph (35.6 against 43.6 us) and eagerly (equal at 4 MiB); benchmarks/NOTES.md, "One-shot
    all-reduce". Each rank reads world_size copies, so with more ranks the crossover comes
    sooner: 1 MiB there (not measured yet)."""
    return (4 if world_size == 2 else 1) << 20


class OneShotAllReduce:
    """Sums a CUDA tensor over the ranks of a group through a rendezvoused peer-memory buffer
    of ``max_bytes``. Built collectively (every rank of the group at once)."""

    def __init__(self, store: Any, rank: int, world_size: int, device: torch.device,
                 backend: Any = None, max_bytes: Optional[int] = None) -> None:
        # before the allocator maps anything: no multicast object is created
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem
        from torch._C._distributed_c10d import (_register_process_group, _SymmetricMemory,
                                                _unregister_process_group)
        self.max_bytes = max_bytes or default_max_bytes(world_size)
        self.device = device
        self.dtypes: tuple = DTYPES  # narrowed by build_one_shot's probe
        # a name unique to this group (an engine made later in the same process gets its own):
        # rank 0 draws it, the others read it from the group's store
        if rank == 0:
            store.set("one_shot_name", f"servelm-one-shot-{uuid.uuid4().hex[:12]}")
        self.group_name = store.get("one_shot_name").decode()
        # torch's symmetric-memory ops find their group by name in c10d's registry: a
        # ProcessGroup over this group's store (and its NCCL backend) registered under it, and
        # taken out again by close() (no torch-global default group is made)
        self._pg = dist.ProcessGroup(store, rank, world_size)
        if backend is not None:
            self._pg._register_backend(device, dist.ProcessGroup.BackendType.NCCL, backend)
        self._pg._set_group_name(self.group_name)
        _register_process_group(self.group_name, self._pg)
        self._unregister = _unregister_process_group
        _SymmetricMemory.set_group_info(self.group_name, rank, world_size, store)
        # [max_bytes] bytes on this rank's device, every rank's copy mapped into each other's
        self.buffer = symm_mem.empty(self.max_bytes, dtype=torch.uint8, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)
        # one kernel that copies x in and sums (PyTorch >= 2.8); else a copy, then the sum
        self.fused = hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy")

    def close(self) -> None:
        """Takes the group's name out of c10d's registry (the buffer goes with this object)."""
        if self._pg is not None:
            self._unregister(self.group_name)
            self._pg = None

    def fits(self, x: torch.Tensor) -> bool:
        n = x.numel() * x.element_size()
        # the kernel moves 4-byte words (a hidden state of even width always is)
        return (x.is_cuda and x.dtype in self.dtypes and x.is_contiguous()
                and n <= self.max_bytes and n % 4 == 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of x over the ranks, a new tensor of x's shape (x is left as it was)."""
        n = x.numel() * x.element_size()
        # this rank's slot: the first n bytes of the buffer, seen as x's dtype and shape; the
        # op copies x in and sums every rank's slot into a fresh output
        slot = self.buffer[:n].view(x.dtype).view(x.shape)
        if self.fused:
            return torch.ops.symm_mem.one_shot_all_reduce_copy(slot, x, "sum", self.group_name)
        slot.copy_(x)
        return torch.ops.symm_mem.one_shot_all_reduce(slot, "sum", self.group_name)


def build_one_shot(store: Any, rank: int, world_size: int, device: torch.device,
                   backend: Any = None,
                   max_bytes: Optional[int] = None) -> Optional[OneShotAllReduce]:
    """The one-shot all-reduce of a CUDA group of ``world_size`` ranks, checked on a probe
    sum; None (NCCL for every size) where this PyTorch or these GPUs cannot map each other's
    memory. Collective: every rank of the group calls it at the same time."""
    if world_size == 1 or device.type != "cuda":
        return None
    ar = None
    try:
        ar = OneShotAllReduce(store, rank, world_size, device, backend, max_bytes)
        # probe each dtype: rank r contributes r + 1 (+ a ramp), so a wrong sum shows on every
        # rank; a dtype the kernel lacks fails at dispatch on every rank alike, before any
        # rank touches the others' memory
        kept = []
        for dtype in DTYPES:
            x = (torch.arange(1024, device=device) % 7).to(dtype) + (rank + 1)
            want = (torch.arange(1024, device=device) % 7).to(dtype) * world_size \
                + world_size * (world_size + 1) // 2
            try:
                got = ar(x)
            except (RuntimeError, NotImplementedError) as e:
                if "not implemented" not in str(e):
                    raise
                continue
            if not torch.equal(got, want):
                raise RuntimeError(f"probe sum in {dtype} differs from the expected one")
            kept.append(dtype)
        torch.cuda.synchronize(device)
        if not kept:
            raise RuntimeError("the one-shot kernel sums none of " + str(DTYPES))
        ar.dtypes = tuple(kept)
        logger.info("one-shot peer-memory all-reduce on %d ranks for %s all-reduces up to %d "
                    "KiB (NCCL above and for other dtypes)", world_size,
                    "/".join(str(d).removeprefix("torch.") for d in kept), ar.max_bytes // 1024)
        return ar
    except (RuntimeError, AttributeError, TypeError) as e:
        # symmetric on every rank (the same PyTorch and machine), so none waits for another
        if ar is not None:
            ar.close()
        logger.warning("one-shot all-reduce unavailable (%s); NCCL for all sizes", e)
        return None
