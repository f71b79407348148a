"""Attention metadata for a ragged batch over paged KV, built on the host from block tables and
per-sequence [start, end) token ranges; and its one-sequence-per-token form, which turns a step
of short queries (a verification of k drafts, a draft model's catch-up) into a decode-only step
that the decode kernels and the CUDA graphs of worker/cuda_graphs.py serve."""
from __future__ import annotations

import numpy as np
import torch

from servelm.attention import AttentionMetadata


def ragged_positions(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """starts, ends: [S] -> (seq of each token [T], position of each token [T]); sequence s
    owns positions starts[s]..ends[s]-1, in order."""
    n = ends - starts
    seq = np.repeat(np.arange(len(n)), n)
    cu = np.cumsum(n) - n
    return seq, np.arange(int(n.sum()), dtype=np.int64) - np.repeat(cu - starts, n)


def slots_of(block_tables: np.ndarray, seq: np.ndarray, pos: np.ndarray,
             block_size: int) -> np.ndarray:
    """Cache slot of each token: block_tables [S, W], seq/pos [T] -> [T] int64."""
    return (block_tables[seq, pos // block_size].astype(np.int64) * block_size
            + pos % block_size)


def step_meta(block_tables: np.ndarray, starts: np.ndarray, ends: np.ndarray, block_size: int,
              device: torch.device, per_token: bool = False
              ) -> tuple[np.ndarray, np.ndarray, AttentionMetadata]:
    """(seq of each token [T], positions [T], meta) for sequences computing tokens
    starts[s]..ends[s]-1 (ends[s] >= 1: its context after the step).

    per_token: each token becomes a sequence of its own (query length 1, context up to and
    including itself, the same block table): the same attention as the ragged form, since a
    step's KV is written before attention reads it, with decode kernels; each token's query
    reads its context once, so only for short queries."""
    seq, pos = ragged_positions(starts, ends)
    slots = slots_of(block_tables, seq, pos, block_size)
    to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)  # noqa: E731
    width = -(-int(ends.max()) // block_size)
    if per_token:
        q_lens, s_lens, bt = np.ones(len(pos), np.int64), pos + 1, block_tables[seq, :width]
    else:
        q_lens, s_lens, bt = ends - starts, ends, block_tables[:, :width]
    cu = np.zeros(len(q_lens) + 1, dtype=np.int32)
    np.cumsum(q_lens, out=cu[1:])
    meta = AttentionMetadata(
        slot_mapping=to(slots), query_start_loc=to(cu), seq_lens=to(s_lens.astype(np.int32)),
        block_tables=to(bt), max_query_len=int(q_lens.max()), max_seq_len=int(s_lens.max()),
        query_lens_cpu=tuple(q_lens.tolist()), seq_lens_cpu=tuple(s_lens.tolist()))
    return seq, pos, meta
