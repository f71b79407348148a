"""min_tokens: EOS and stop token ids get -inf until a request has min_tokens outputs. The one
place min_tokens is enforced for tokens (stop strings are checked after detokenizing)."""
from __future__ import annotations

import numpy as np
import torch

from servelm.sampling.logits_processor import BatchUpdate, LogitsProcessor, ProcessorContext, RowTable


class MinTokensLogitsProcessor(LogitsProcessor):
    def __init__(self, ctx: ProcessorContext) -> None:
        super().__init__(ctx)
        R = ctx.max_rows
        self.remaining = np.zeros(R, dtype=np.int64)  # outputs still needed; <= 0: inactive
        # banned ids per row, padded with the row's first id (duplicates write the same -inf)
        self.ids = RowTable((R, 4), np.int64, 0, ctx.device)
        self.bu = BatchUpdate()

    def update(self, bu: BatchUpdate) -> None:
        if bu.appended and (self.remaining > 0).any():
            np.subtract.at(self.remaining, bu.appended_rows(), 1)
        for row in bu.removed:
            self.remaining[row] = 0
        for src, dst in bu.moved:
            self.remaining[dst], self.remaining[src] = self.remaining[src], 0
            self.ids.move(src, dst)
        eos = list(self.ctx.eos_token_ids)
        for a in bu.added:
            p = a.params
            banned = list(dict.fromkeys(list(p.stop_token_ids) + ([] if p.ignore_eos else eos)))
            left = p.min_tokens - len(a.output_token_ids)
            self.remaining[a.row] = left if banned else 0
            if left > 0 and banned:
                self.ids.widen(len(banned), pad_with_first=True)  # token 0 stays allowed
                self.ids.set(a.row, banned + banned[:1] * (self.ids.host.shape[1] - len(banned)))
        self.bu = bu

    def _active_rows(self) -> np.ndarray:
        """Logits rows that still need outputs before EOS/stop ids may come."""
        bu = self.bu
        left = self.remaining[bu.logits_rows]  # [L]
        if bu.drafts:
            left = left - bu.num_prior_drafts()
        return np.nonzero(left > 0)[0]

    def is_active(self) -> bool:
        return self.bu.num_logits_rows > 0 and len(self._active_rows()) > 0

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        bu = self.bu
        if bu.num_logits_rows == 0:
            return logits
        act = self._active_rows()
        if len(act) == 0:
            return logits
        dev = logits.device
        ids = self.ids.dev[torch.from_numpy(bu.logits_rows[act]).to(dev)]  # [A, B]
        rows = torch.from_numpy(act).to(dev)[:, None].expand_as(ids)
        logits[rows, ids] = float("-inf")
        return logits
