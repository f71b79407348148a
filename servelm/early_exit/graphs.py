"""Piecewise CUDA graphs of early-exit decode steps: per (padded batch size, context bucket), as
the decode graphs (worker/cuda_graphs.py), one graph per piece of early_exit/pieces.py (m + 1
segments and m tails for m candidate layers), all in one memory pool over the decode graphs'
persistent input buffers. A step replays segment graphs until a check finds every row exited,
then that candidate's tail: the host syncs once per candidate reached, and launches no kernel
itself, which is what made eager early-exit steps 7x slower than the plain decode graphs on the
H200 (a Llama-3-8B step is ~500 launches)."""
from __future__ import annotations

import torch

from servelm.attention.backend import AttentionMetadata
from servelm.early_exit.config import EarlyExitConfig
from servelm.early_exit.pieces import ExitPieces
from servelm.worker.cuda_graphs import DecodeGraphs, capture_graph, graph_output_bytes


class PiecewiseGraph:
    """The graphs of one (batch size, context) key: replay() runs a step through them."""

    def __init__(self, pieces: ExitPieces) -> None:
        self.pieces = pieces
        self.graphs: dict[tuple[str, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[str, int], tuple] = {}

    def names(self) -> list[tuple[str, int]]:
        m = len(self.pieces.cands)
        return ([("segment", i) for i in range(m + 1)]
                + [("tail", i) for i in range(1, m + 1)])

    def capture(self, input_ids, positions, meta, pool):
        """Every piece, over these persistent inputs; -> the pool they share."""
        for kind, i in self.names():
            piece = getattr(self.pieces, kind)(i)
            g, out = capture_graph(piece, input_ids, positions, meta, pool)
            self.graphs[kind, i], self.outputs[kind, i] = g, out
            pool = g.pool()
        return pool

    def pool(self):
        return next(iter(self.graphs.values())).pool()

    def replay(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (logits [bs, V] fp32, greedy ids [bs], exit layer [bs])."""
        def call(kind: str, i: int) -> tuple:
            self.graphs[kind, i].replay()
            return self.outputs[kind, i]
        return self.pieces.run(call)


class ExitGraphs(DecodeGraphs):
    """run(input_ids [B], positions [B], meta) -> (logits [B, V], greedy [B], exit layer [B])
    for early-exit decode steps of B <= max_bs rows."""

    piecewise = PiecewiseGraph  # what captures a key's pieces

    def __init__(self, pieces: ExitPieces, max_bs: int, max_blocks: int, device: torch.device,
                 max_model_len: int) -> None:
        super().__init__(None, max_bs, max_blocks, device, max_model_len)
        self.pieces = pieces

    def _capture_graph(self, key: tuple[int, int], meta: AttentionMetadata) -> None:
        bs = key[0]
        g = self.piecewise(self.pieces)
        self.pool = g.capture(self.input_ids[:bs], self.positions[:bs], meta, self.pool)
        self.graphs[key] = g

    def _replay(self, key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        return self.graphs[key].replay()


def exit_graph_output_bytes(cfg: EarlyExitConfig, num_layers: int, max_bs: int,
                            vocab_size: int) -> int:
    """Memory early-exit graphs keep after capture, beyond the profiling run's peak: the decode
    graphs' logits outputs (worker/cuda_graphs.graph_output_bytes) for each piece that computes
    logits of its own (the last segment; the tails too under "state"), and for the logit
    criteria the exit logits buffer [max_bs, V] fp32 the tails return."""
    m = len(cfg.candidates(num_layers))
    per = graph_output_bytes(max_bs, vocab_size)
    if cfg.criterion == "state":
        return per * (1 + m)
    return per + max_bs * vocab_size * 4
