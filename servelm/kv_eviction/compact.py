"""Moving an evicting request's surviving tokens into the first blocks of its new table, on
the device, before the step's forward (the scheduler freed the rest of its blocks).

Survivor j (old cache index i = kept[j]) goes to cache index j: its key, stored rotated for
position i, is rotated back by i - j (rotations compose: R(j) = R(-(i - j)) R(i)), so every
cached key holds the rotary of its new index, which is also its query position from now on
(StreamingLLM's positions within the cache). Values move as they are; H2O's scores move
with their tokens. All survivors are read before any is written, so a block that is both a
source and a destination (the common case: a request compacts within its own first blocks)
is safe."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class CompactionOp:
    """One request's eviction: its block table before (old_table, holding old_len tokens) and
    after (new_table), and the cache indices that survive (kept, ascending, [keep])."""

    old_table: Sequence[int]
    new_table: Sequence[int]
    kept: torch.Tensor
    start: int = 0  # survivors before this index stay where they are (whole blocks of sinks)


def _slots(table: Sequence[int], idx: torch.Tensor, block_size: int) -> torch.Tensor:
    t = torch.as_tensor(list(table), dtype=torch.int64, device=idx.device)
    return t[idx // block_size] * block_size + idx % block_size


def rotate_back(k: torch.Tensor, cos_sin_cache: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """k: [M, KVH, D] keys rotated (NeoX style) for positions p -> rotated for p - d ([M],
    d >= 0): a rotation by -d, from the cos/sin of d (no magnitude scaling in the cache)."""
    cos, sin = cos_sin_cache[d].float().chunk(2, dim=-1)  # [M, D/2] each
    kf = k.float()
    x1, x2 = kf.chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    # rotate_half style: (x1, x2) -> (x1 cos + x2 sin, x2 cos - x1 sin) for angle -theta
    return torch.cat([x1 * c + x2 * s, x2 * c - x1 * s], dim=-1).to(k.dtype)


def compact(kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
            cos_sin_caches: Sequence[torch.Tensor], ops: Sequence[CompactionOp],
            block_size: int, scores: Optional[torch.Tensor] = None) -> None:
    """Apply every op of a step to each layer's cache (layer i re-rotated with
    cos_sin_caches[i]) and to the per-slot scores."""
    if not ops:
        return
    src, dst, delta = [], [], []
    for op in ops:
        kept = op.kept.to(torch.int64)[op.start:]
        j = torch.arange(op.start, op.start + kept.shape[0], device=kept.device)
        src.append(_slots(op.old_table, kept, block_size))
        dst.append(_slots(op.new_table, j, block_size))
        delta.append(kept - j)
    src_t, dst_t, d = torch.cat(src), torch.cat(dst), torch.cat(delta)
    for (k_cache, v_cache), cs in zip(kv_caches, cos_sin_caches):
        kc = k_cache.view(-1, *k_cache.shape[2:])  # [slots, KVH, D]
        vc = v_cache.view(-1, *v_cache.shape[2:])
        k, v = kc[src_t], vc[src_t]  # gathered copies: read everything before writing
        kc[dst_t] = rotate_back(k, cs, d)
        vc[dst_t] = v
    if scores is not None:
        scores[dst_t] = scores[src_t].clone()
