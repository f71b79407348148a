"""logit_bias (OpenAI): a per-request map token id -> bias added to that token's logit."""
from __future__ import annotations

import numpy as np
import torch

from servelm.sampling.logits_processor import BatchUpdate, LogitsProcessor, ProcessorContext, RowTable


class LogitBiasLogitsProcessor(LogitsProcessor):
    def __init__(self, ctx: ProcessorContext) -> None:
        super().__init__(ctx)
        R = ctx.max_rows
        self.active = np.zeros(R, dtype=bool)
        # [R, B] ids and biases, padded with bias 0 on id 0 (adding 0 changes nothing)
        self.ids = RowTable((R, 8), np.int64, 0, ctx.device)
        self.vals = RowTable((R, 8), np.float32, 0.0, ctx.device)
        self.bu = BatchUpdate()

    def update(self, bu: BatchUpdate) -> None:
        for row in bu.removed:
            self.active[row] = False
        for src, dst in bu.moved:
            self.active[dst], self.active[src] = self.active[src], False
            self.ids.move(src, dst)
            self.vals.move(src, dst)
        for a in bu.added:
            bias = a.params.logit_bias
            self.active[a.row] = bool(bias)
            if bias:
                width = max(self.ids.host.shape[1], len(bias))
                self.ids.widen(width)
                self.vals.widen(width)
                pad = width - len(bias)
                self.ids.set(a.row, list(bias) + [0] * pad)
                self.vals.set(a.row, list(bias.values()) + [0.0] * pad)
        self.bu = bu

    def is_active(self) -> bool:
        return bool(self.active[self.bu.logits_rows].any())

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        bu = self.bu
        if bu.num_logits_rows == 0:
            return logits
        act = np.nonzero(self.active[bu.logits_rows])[0]
        if len(act) == 0:
            return logits
        dev = logits.device
        rows_t = torch.from_numpy(bu.logits_rows[act]).to(dev)
        ids, vals = self.ids.dev[rows_t], self.vals.dev[rows_t]  # [A, B]
        rows = torch.from_numpy(act).to(dev)[:, None].expand_as(ids)
        logits.index_put_((rows, ids), vals.to(logits.dtype), accumulate=True)
        return logits
