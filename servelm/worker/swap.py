"""Host memory for swap preemption: KV blocks copied out of the device cache and back; and
block copies within the device cache (a cached partial block taken copy-on-write).

Layout ``host: [num_host_blocks, num_layers, 2 (K, V), block_size, kv_heads, head_dim]``, so
one host block is contiguous across layers and a run of consecutive host blocks is one copy.
On CUDA the host tensor is pinned and every copy is queued on the current stream without
waiting: a swap-out is ordered before the forward that may overwrite its device blocks, a
swap-in before the forward that reads them, and a host block freed by the scheduler is only
reused by copies queued later on the same stream. The device side goes through a staging
tensor of at most ``CHUNK`` blocks (gathered with one index_select per layer and K/V).
"""
from __future__ import annotations

import torch

CHUNK = 32  # blocks staged at once: bounds the transient device memory a swap takes


def _runs(pairs: list[tuple[int, int]], key: int) -> list[tuple[int, int, int]]:
    """(first pair index, first host block, length) of runs of consecutive host blocks, with
    pairs given in host-block order."""
    out: list[tuple[int, int, int]] = []
    for j, p in enumerate(pairs):
        h = p[key]
        if out and out[-1][1] + out[-1][2] == h and out[-1][0] + out[-1][2] == j:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((j, h, 1))
    return out


class SwapSpace:
    def __init__(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 num_host_blocks: int) -> None:
        k0 = kv_caches[0][0]  # [num_blocks, block_size, kv_heads, head_dim]
        self.device = k0.device
        self.host = torch.empty((num_host_blocks, len(kv_caches), 2, *k0.shape[1:]),
                                dtype=k0.dtype, pin_memory=k0.is_cuda)

    def swap_out(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 pairs: list[tuple[int, int]]) -> None:
        """Copy device blocks to host blocks: pairs of (device block, host block)."""
        pairs = sorted(pairs, key=lambda p: p[1])
        for c in range(0, len(pairs), CHUNK):
            part = pairs[c:c + CHUNK]
            idx = torch.tensor([g for g, _ in part], device=self.device)
            # staged: [n, num_layers, 2, block_size, kv_heads, head_dim]
            staged = torch.stack([torch.stack((k.index_select(0, idx), v.index_select(0, idx)), 1)
                                  for k, v in kv_caches], 1)
            for j, h, n in _runs(part, 1):
                self.host[h:h + n].copy_(staged[j:j + n], non_blocking=True)

    def swap_in(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                pairs: list[tuple[int, int]]) -> None:
        """Copy host blocks back to device blocks: pairs of (host block, device block)."""
        pairs = sorted(pairs, key=lambda p: p[0])
        for c in range(0, len(pairs), CHUNK):
            part = pairs[c:c + CHUNK]
            staged = torch.empty((len(part), *self.host.shape[1:]), dtype=self.host.dtype,
                                 device=self.device)
            for j, h, n in _runs(part, 0):
                staged[j:j + n].copy_(self.host[h:h + n], non_blocking=True)
            idx = torch.tensor([g for _, g in part], device=self.device)
            for layer, (k, v) in enumerate(kv_caches):
                k.index_copy_(0, idx, staged[:, layer, 0])
                v.index_copy_(0, idx, staged[:, layer, 1])


def copy_blocks(kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                pairs: list[tuple[int, int]]) -> None:
    """Copy device blocks to device blocks, every layer's K and V: pairs of (source, dest),
    queued before the step's forward (which may write a source block handed out again)."""
    if not kv_caches:
        return
    dev = kv_caches[0][0].device
    src = torch.tensor([a for a, _ in pairs], device=dev)
    dst = torch.tensor([b for _, b in pairs], device=dev)
    for k, v in kv_caches:
        k.index_copy_(0, dst, k.index_select(0, src))
        v.index_copy_(0, dst, v.index_select(0, src))
