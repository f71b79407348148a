"""CUDA graphs for decode-only steps: the model's forward, the lm_head and the greedy argmax
captured once per padded batch size and replayed over persistent input buffers, which removes
per-kernel launch overhead (hundreds of launches per step for a 32-layer model).

Start-up captures only the largest graph (its memory pool then serves every later capture) and
the small batches that latency-bound serving starts with (9 of the 26 graphs of an 8B model at
max_num_seqs >= 512); each other one is captured the first time a step needs it, which stalls
that step once by what a capture costs at start-up (two eager forwards and the capture). The
kernels a capture runs are compiled at start-up (worker/kernel_warmup.py), so a late capture
does not wait for Triton."""
from __future__ import annotations

import logging
import time
from typing import Callable, Tuple

import torch

from servelm.attention.backend import AttentionMetadata

logger = logging.getLogger(__name__)


def capture_sizes(max_bs: int) -> list[int]:
    """Dense where padding costs (small batches are weight-bound, so padding there is nearly
    free; large ones compute-bound) and few in all, since each size is one capture at start-up."""
    sizes = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512,
             640, 768, 896, 1024]
    out = sorted({s for s in sizes if s < max_bs} | {max_bs})
    return out


def graph_output_bytes(max_bs: int, vocab_size: int) -> int:
    """Memory the decode graphs keep after capture, beyond what the profiling run peaked at:
    every graph's fp32 logits output stays live ([bs, V] per captured batch size and context
    bucket), plus the largest graph's bf16 logits before the cast."""
    sizes = capture_sizes(max_bs)
    rows = sum(sizes) + sum(s for s in sizes if s <= SHORT_CONTEXT_MAX_BS)
    return (rows * 4 + max(sizes) * 2) * vocab_size


# (input_ids [B], positions [B], meta) -> (logits [B, V] fp32, greedy token ids [B] int64)
DecodeFn = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], Tuple[torch.Tensor, torch.Tensor]]


# Graphs of small batches are also captured for contexts up to SHORT_CONTEXT: decode attention
# sizes its grid for the graph's longest context, and a grid sized for max_model_len (say 8192)
# launches ~20x the programs a 400-token context needs, most of which only check their bounds
# and exit (measurable at batch 1, where the step is a few ms). Large batches keep one graph.
SHORT_CONTEXT = 1024
SHORT_CONTEXT_MAX_BS = 32
# batch sizes captured at start-up (with the largest size); larger ones on first use
EAGER_CAPTURE_MAX_BS = 8


def graph_keys(max_bs: int, max_model_len: int) -> list[tuple[int, int]]:
    """(batch size, longest context) of every decode graph, largest first."""
    sizes = capture_sizes(max_bs)
    short = min(SHORT_CONTEXT, max_model_len)
    keys = [(bs, max_model_len) for bs in sizes]
    if short < max_model_len:
        keys += [(bs, short) for bs in sizes if bs <= SHORT_CONTEXT_MAX_BS]
    return sorted(keys, reverse=True)


def eager_graph_keys(max_bs: int, max_model_len: int) -> list[tuple[int, int]]:
    """The graphs captured at start-up, largest first: the largest (sizes the shared memory
    pool) and every one of batch <= EAGER_CAPTURE_MAX_BS."""
    keys = graph_keys(max_bs, max_model_len)
    return [k for i, k in enumerate(keys) if i == 0 or k[0] <= EAGER_CAPTURE_MAX_BS]


def capture_graph(forward: DecodeFn, input_ids: torch.Tensor, positions: torch.Tensor,
                  meta: AttentionMetadata, pool) -> tuple[torch.cuda.CUDAGraph, tuple]:
    """forward(input_ids, positions, meta) captured over those persistent buffers in the
    memory pool `pool` (None: a new one): the graph and its output tensors."""
    for _ in range(2):  # warm up: cuBLAS handles and workspaces, any kernel not yet compiled
        forward(input_ids, positions, meta)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=pool):
        outputs = forward(input_ids, positions, meta)
    return g, outputs


class DecodeGraphs:
    """forward(input_ids [B], positions [B], meta) -> (logits [B, V], argmax [B]) for
    decode-only steps, one graph per (padded batch size, context bucket).

    Padding rows (B..bs) get seq_len 0 and slot -1: the attention kernels skip them and the KV
    write drops them, so they touch no real cache slot.
    """

    def __init__(self, forward: DecodeFn, max_bs: int, max_blocks: int, device: torch.device,
                 max_model_len: int) -> None:
        self.forward = forward
        self.max_bs = max_bs
        self.sizes = capture_sizes(max_bs)
        z = lambda *s, dt=torch.int64: torch.zeros(*s, dtype=dt, device=device)  # noqa: E731
        self.input_ids, self.positions = z(max_bs), z(max_bs)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.int64, device=device)
        self.seq_lens = z(max_bs, dt=torch.int32)
        self.block_tables = z(max_bs, max_blocks, dt=torch.int32)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self.max_model_len = max_model_len
        self.short = min(SHORT_CONTEXT, max_model_len)
        self.keys = frozenset(graph_keys(max_bs, max_model_len))  # captured now or on first use
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.pool = None  # the memory pool every graph shares (graphs replay one at a time)
        self.num_lazy_captures = 0

    def _meta(self, bs: int, max_len: int) -> AttentionMetadata:
        # max_seq_len: the longest context this graph serves; attention sizes its grid by it
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs], query_start_loc=self.query_start_loc[:bs + 1],
            seq_lens=self.seq_lens[:bs], block_tables=self.block_tables[:bs], max_query_len=1,
            max_seq_len=max_len)

    @torch.inference_mode()
    def capture(self) -> None:
        """The start-up graphs, largest first: later ones reuse the first one's memory pool."""
        t0 = time.perf_counter()
        for key in eager_graph_keys(self.max_bs, self.max_model_len):
            self._capture(key)
        torch.cuda.synchronize()
        logger.info("captured %d of %d CUDA graphs in %.1fs (the rest on first use)",
                    len(self.graphs), len(self.keys), time.perf_counter() - t0)

    def _capture(self, key: tuple[int, int]) -> None:
        bs, max_len = key
        # padding rows only: no KV slot written, no context read (the buffers may hold the
        # last replay's real rows when a graph is captured while serving)
        self.slot_mapping[:bs].fill_(-1)
        self.seq_lens[:bs].fill_(0)
        self._capture_graph(key, self._meta(bs, max_len))

    def _capture_graph(self, key: tuple[int, int], meta: AttentionMetadata) -> None:
        bs = key[0]
        self.graphs[key], self.outputs[key] = capture_graph(
            self.forward, self.input_ids[:bs], self.positions[:bs], meta, self.pool)
        self.pool = self.graphs[key].pool()

    @torch.inference_mode()
    def capture_next(self) -> bool:
        """Captures one graph not captured yet (the smallest batch first: the likeliest next
        at low load); True while more remain. For idle time: a graph captured then costs no
        step a stall."""
        missing = sorted(k for k in self.keys if k not in self.graphs)
        if missing:
            self._capture(missing[0])
            torch.cuda.synchronize()
        return len(missing) > 1

    def padded_size(self, num_seqs: int) -> int | None:
        for s in self.sizes:
            if s >= num_seqs:
                return s
        return None

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            meta: AttentionMetadata) -> tuple[torch.Tensor, ...]:
        """The outputs of the graph of this step's padded batch, [:B] rows each."""
        B = input_ids.shape[0]
        return tuple(o[:B] for o in self._replay(self._load(input_ids, positions, meta)))

    def _replay(self, key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        self.graphs[key].replay()
        return self.outputs[key]

    def _load(self, input_ids: torch.Tensor, positions: torch.Tensor,
              meta: AttentionMetadata) -> tuple[int, int]:
        """This step's inputs into the persistent buffers (padding rows after them): the key of
        the graph that serves it, captured now if this is its first use."""
        B = input_ids.shape[0]
        bs = self.padded_size(B)
        assert bs is not None
        key = (bs, self.short if (meta.max_seq_len <= self.short and (bs, self.short) in self.keys)
                   else self.max_model_len)
        if key not in self.graphs:  # first use: capture before this step's inputs go in
            t0 = time.perf_counter()
            self._capture(key)
            self.num_lazy_captures += 1
            logger.info("captured the CUDA graph of batch %d, context <= %d, on first use in "
                        "%.0f ms", bs, key[1], (time.perf_counter() - t0) * 1e3)
        w = meta.block_tables.shape[1]
        self.input_ids[:B].copy_(input_ids, non_blocking=True)
        self.positions[:B].copy_(positions, non_blocking=True)
        self.slot_mapping[:B].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:B].copy_(meta.seq_lens, non_blocking=True)
        self.block_tables[:B, :w].copy_(meta.block_tables, non_blocking=True)
        if bs > B:
            self.slot_mapping[B:bs].fill_(-1)
            self.seq_lens[B:bs].fill_(0)
        return key
