"""CUDA graphs for token-tree verification steps: every request verifies a whole tree, so each
computes the same number of query tokens (its root and the tree's N nodes), and the step is one
graph per padded request count over persistent buffers, like the decode graphs
(worker/cuda_graphs.py). Attention is the tree-masked paged prefill kernel, whose grid depends
on shapes only. Small batches only (trees are for latency-bound serving; the logits of
1 + N rows per request stay allocated per graph)."""
from __future__ import annotations

import logging
import time

import torch

from servelm.attention.backend import AttentionMetadata
from servelm.worker.cuda_graphs import DecodeFn, capture_graph

logger = logging.getLogger(__name__)

TREE_GRAPH_SIZES = (1, 2, 4, 8)  # requests per graph


def tree_graph_output_bytes(query_len: int, vocab_size: int) -> int:
    """The fp32 logits every tree graph keeps (bf16 ones before the cast, at most once)."""
    rows = sum(TREE_GRAPH_SIZES) * query_len
    return rows * 4 * vocab_size + max(TREE_GRAPH_SIZES) * query_len * 2 * vocab_size


class TreeGraphs:
    """forward(input_ids [B*q], positions [B*q], meta) -> (logits [B*q, V], argmax [B*q]) for
    steps of B <= 8 requests each computing q = 1 + N tokens with tree masks.

    Padding requests get a context of q tokens in block 0 and slot -1: they read real memory,
    write nothing, and their rows are dropped."""

    def __init__(self, forward: DecodeFn, query_len: int, max_blocks: int,
                 device: torch.device) -> None:
        self.forward, self.q = forward, query_len
        n, q = max(TREE_GRAPH_SIZES), query_len
        z = lambda *s, dt=torch.int64: torch.zeros(*s, dtype=dt, device=device)  # noqa: E731
        self.input_ids, self.positions = z(n * q), z(n * q)
        self.slot_mapping = torch.full((n * q,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.full((n,), q, dtype=torch.int32, device=device)
        self.block_tables = z(n, max_blocks, dt=torch.int32)
        self.query_start_loc = torch.arange(0, (n + 1) * q, q, dtype=torch.int32, device=device)
        self.tree_mask = z(n * q)
        self.tree_start = torch.full((n,), 1 << 30, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pool = None

    def fits(self, num_seqs: int) -> bool:
        return num_seqs <= max(TREE_GRAPH_SIZES)

    def _meta(self, bs: int) -> AttentionMetadata:
        q = self.q
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs * q], query_start_loc=self.query_start_loc[:bs + 1],
            seq_lens=self.seq_lens[:bs], block_tables=self.block_tables[:bs], max_query_len=q,
            max_seq_len=q, tree_mask=self.tree_mask[:bs * q], tree_start=self.tree_start[:bs])

    def _pad(self, lo: int, hi: int) -> None:
        """Requests lo..hi-1 become padding."""
        q = self.q
        self.slot_mapping[lo * q:hi * q].fill_(-1)
        self.seq_lens[lo:hi].fill_(q)
        self.block_tables[lo:hi].zero_()
        self.tree_start[lo:hi].fill_(1 << 30)

    @torch.inference_mode()
    def _capture(self, bs: int) -> None:
        t0 = time.perf_counter()
        self._pad(0, bs)
        n = bs * self.q
        self.graphs[bs], self.outputs[bs] = capture_graph(
            self.forward, self.input_ids[:n], self.positions[:n], self._meta(bs), self.pool)
        self.pool = self.graphs[bs].pool()
        logger.info("captured the token-tree graph of %d requests in %.0f ms", bs,
                    (time.perf_counter() - t0) * 1e3)

    def capture_next(self) -> bool:
        """One graph not captured yet (idle time); True while more remain."""
        missing = [s for s in TREE_GRAPH_SIZES if s not in self.graphs]
        if missing:
            self._capture(missing[0])
            torch.cuda.synchronize()
        return len(missing) > 1

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        B, q = meta.num_seqs, self.q
        bs = next(s for s in TREE_GRAPH_SIZES if s >= B)
        if bs not in self.graphs:
            self._capture(bs)
        n, w = B * q, meta.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:B].copy_(meta.seq_lens, non_blocking=True)
        self.block_tables[:B, :w].copy_(meta.block_tables, non_blocking=True)
        self.tree_mask[:n].copy_(meta.tree_mask, non_blocking=True)
        self.tree_start[:B].copy_(meta.tree_start, non_blocking=True)
        if bs > B:
            self._pad(B, bs)
        self.graphs[bs].replay()
        logits, greedy = self.outputs[bs]
        return logits[:n], greedy[:n]
