"""Repetition (HF/CTRL: on prompt and output tokens), presence and frequency (OpenAI: on output
tokens) penalties. Requests that use any get a slot in persistent [slots, V] tables: output token
counts and a prompt-token mask, updated as tokens are appended, never rebuilt per step. Slots grow
on demand (doubling), so requests without penalties cost nothing."""
from __future__ import annotations

import numpy as np
import torch

from servelm.sampling.logits_processor import BatchUpdate, LogitsProcessor, ProcessorContext, RowTable


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, prompt_mask: torch.Tensor,
                    presence: torch.Tensor, frequency: torch.Tensor,
                    repetition: torch.Tensor) -> torch.Tensor:
    """logits [B, V]; counts [B, V] output-token counts; prompt_mask [B, V] bool; penalties [B].
    Repetition divides positive logits and multiplies negative ones of every seen token."""
    seen = (counts > 0) | prompt_mask
    rep = repetition[:, None].expand_as(logits)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    logits = logits - frequency[:, None] * counts
    return logits - presence[:, None] * (counts > 0).to(logits.dtype)


class PenaltiesLogitsProcessor(LogitsProcessor):
    def __init__(self, ctx: ProcessorContext) -> None:
        super().__init__(ctx)
        R = ctx.max_rows
        self.slot = np.full(R, -1, dtype=np.int64)  # row -> slot in the tables, -1: none
        self.penalties = RowTable((R, 3), np.float32, 0.0, ctx.device)  # presence, freq, rep
        self.free_slots: list[int] = []
        self.counts = torch.zeros(0, ctx.vocab_size, dtype=torch.int32, device=ctx.device)
        self.prompt_mask = torch.zeros(0, ctx.vocab_size, dtype=torch.bool, device=ctx.device)
        self.bu = BatchUpdate()

    def _new_slot(self) -> int:
        if not self.free_slots:
            n = self.counts.shape[0]
            grow = max(4, n)
            z = lambda dt: torch.zeros(grow, self.ctx.vocab_size, dtype=dt, device=self.ctx.device)  # noqa: E731
            self.counts = torch.cat([self.counts, z(torch.int32)])
            self.prompt_mask = torch.cat([self.prompt_mask, z(torch.bool)])
            self.free_slots = list(range(n + grow - 1, n - 1, -1))
        return self.free_slots.pop()

    def _ids(self, ids) -> torch.Tensor:
        return torch.as_tensor(np.asarray(ids, dtype=np.int64)).to(self.ctx.device)

    def update(self, bu: BatchUpdate) -> None:
        slot = self.slot
        if bu.appended and len(self.free_slots) < self.counts.shape[0]:  # some slot in use
            slots = slot[bu.appended_rows()]
            keep = slots >= 0
            if keep.any():  # counted on the device: the tokens may not be on the host yet
                s = self._ids(slots[keep])
                t = bu.appended_tokens()[torch.from_numpy(keep).to(self.ctx.device)]
                self.counts.index_put_((s, t), torch.ones_like(s, dtype=torch.int32),
                                       accumulate=True)
        for row in bu.removed:
            if slot[row] >= 0:
                self.free_slots.append(int(slot[row]))
                slot[row] = -1
        for src, dst in bu.moved:
            slot[dst], slot[src] = slot[src], -1
            self.penalties.move(src, dst)
        for a in bu.added:
            p = a.params
            if not p.needs_penalties:
                continue
            s = slot[a.row] = self._new_slot()
            self.counts[s].zero_()
            if len(a.output_token_ids):
                self.counts[s].index_add_(0, self._ids(a.output_token_ids),
                                          torch.ones(len(a.output_token_ids), dtype=torch.int32,
                                                     device=self.ctx.device))
            self.prompt_mask[s].zero_()
            self.prompt_mask[s, self._ids(a.prompt_token_ids)] = True
            self.penalties.set(a.row, [p.presence_penalty, p.frequency_penalty, p.repetition_penalty])
        self.bu = bu

    def is_active(self) -> bool:
        return bool((self.slot[self.bu.logits_rows] >= 0).any())

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        bu = self.bu
        if bu.num_logits_rows == 0:
            return logits
        slots = self.slot[bu.logits_rows]
        act = np.nonzero(slots >= 0)[0]
        if len(act) == 0:
            return logits
        dev = logits.device
        act_t = torch.from_numpy(act).to(dev)
        s = torch.from_numpy(slots[act]).to(dev)
        counts = self.counts[s].to(logits.dtype)  # [A, V]
        if bu.drafts:  # rows after drafts count them as generated
            pos = {int(j): i for i, j in enumerate(act)}
            pairs = [(pos[j], t) for j, prior in bu.drafts if j in pos for t in prior]
            if pairs:
                r, t = self._ids([x[0] for x in pairs]), self._ids([x[1] for x in pairs])
                counts.index_put_((r, t), torch.ones(len(pairs), dtype=counts.dtype, device=dev),
                                  accumulate=True)
        pen = self.penalties.dev[torch.from_numpy(bu.logits_rows[act]).to(dev)]  # [A, 3]
        logits[act_t] = apply_penalties(logits[act_t], counts, self.prompt_mask[s],
                                        pen[:, 0], pen[:, 1], pen[:, 2])
        return logits
