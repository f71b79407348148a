"""SamplingPipeline: everything between a step's logits and its tokens, for the runner's
persistent batch rows: per-row sampling settings (temperature, top-k/p, min-p, logprobs, seeds)
kept in host arrays with device mirrors, the ordered logits processors, and the
sampler. Rows change only through ``update(BatchUpdate)``, once per step."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from servelm.sampling.logits_processor import BatchUpdate, LogitsProcessor, ProcessorContext, RowTable
from servelm.sampling.sampler import Sampler, SamplerOutput, SamplingMetadata, position_seed


class SamplingPipeline:
    def __init__(self, ctx: ProcessorContext, processors: Sequence[LogitsProcessor]) -> None:
        R, V = ctx.max_rows, ctx.vocab_size
        self.ctx = ctx
        self.processors = list(processors)
        self.sampler = Sampler()
        self.temperature = RowTable((R,), np.float32, 0.0, ctx.device)  # 0: greedy
        self.top_k = RowTable((R,), np.int64, V, ctx.device)  # V: off
        self.top_p = RowTable((R,), np.float32, 1.0, ctx.device)
        self.min_p = RowTable((R,), np.float32, 0.0, ctx.device)
        self.logprobs = np.full(R, -1, dtype=np.int64)  # top logprobs per token; -1: none
        self.seeds: list[Optional[int]] = [None] * R
        self.has_seed = np.zeros(R, dtype=bool)
        self.bu = BatchUpdate()

    def _tables(self) -> tuple[RowTable, ...]:
        return self.temperature, self.top_k, self.top_p, self.min_p

    def update(self, bu: BatchUpdate) -> None:
        for row in bu.removed:
            for t in self._tables():
                t.clear(row)
            self.logprobs[row] = -1
            self.seeds[row], self.has_seed[row] = None, False
        for src, dst in bu.moved:
            for t in self._tables():
                t.move(src, dst)
            self.logprobs[dst], self.logprobs[src] = self.logprobs[src], -1
            self.seeds[dst], self.seeds[src] = self.seeds[src], None
            self.has_seed[dst], self.has_seed[src] = self.has_seed[src], False
        V = self.ctx.vocab_size
        for a in bu.added:
            p, r = a.params, a.row
            self.temperature.set(r, 0.0 if p.greedy else p.temperature)
            self.top_k.set(r, p.top_k if 0 < p.top_k < V else V)
            self.top_p.set(r, p.top_p)
            self.min_p.set(r, p.min_p)
            self.logprobs[r] = -1 if p.logprobs is None else p.logprobs
            self.seeds[r], self.has_seed[r] = a.seed, a.seed is not None
        for p in self.processors:
            p.update(bu)
        self.bu = bu

    def metadata(self) -> SamplingMetadata:
        """Settings of this step's logits rows (gathered on the device, decided on the host)."""
        rows = self.bu.logits_rows
        rows_t = self.bu.logits_rows_t
        all_greedy = not (self.temperature.host[rows] > 0).any()
        m = SamplingMetadata(temperature=None if all_greedy else self.temperature.dev[rows_t],
                             all_greedy=all_greedy)
        if not all_greedy:
            V = self.ctx.vocab_size
            if (self.top_k.host[rows] < V).any():
                m.top_k = self.top_k.dev[rows_t]
            if (self.top_p.host[rows] < 1).any():
                m.top_p = self.top_p.dev[rows_t]
            if (self.min_p.host[rows] > 0).any():
                m.min_p = self.min_p.dev[rows_t]
            pos = self.bu.sample_pos
            m.seeds = {int(i): position_seed(self.seeds[rows[i]], int(pos[i]))
                       for i in np.nonzero(self.has_seed[rows])[0]}
        m.max_num_logprobs = int(self.logprobs[rows].max()) if len(rows) else -1
        return m

    def plain_greedy(self) -> bool:
        """This step's rows all take the argmax of the raw logits: greedy, no logprobs, no
        processor with anything to do."""
        rows = self.bu.logits_rows
        return (not (self.temperature.host[rows] > 0).any() and not (self.logprobs[rows] >= 0).any()
                and not any(p.is_active() for p in self.processors))

    def prepare(self) -> bool:
        """Whether a processor started this step's work elsewhere (LogitsProcessor.prepare)."""
        started = False
        for p in self.processors:
            started |= p.prepare()
        return started

    def sample(self, logits: torch.Tensor) -> SamplerOutput:
        """logits: [L, V] fp32, rows as in the last update's logits_rows."""
        return self.sampler(logits, self.metadata(), self.processors)
