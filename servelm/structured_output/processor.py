"""The grammar bitmask logits processor: rows whose request has structured outputs may only
sample tokens their grammar allows next.

Each such row has a matcher (its grammar's state after the row's tokens). Per step:
- ``update`` notes the tokens the rows appended last step. They are still on the device with
  asynchronous scheduling, so their copy to the host starts here, behind the last step's
  sampling and before this step's forward is launched (an event marks it).
- ``apply`` (after this step's forward was launched) waits for that copy only, advances the
  matchers, fills one bitmask row per logits row on the host while the device runs the forward,
  and masks the logits on the device.
A row verifying k drafts has k + 1 logits rows: row j's mask is the grammar's after drafts[:j],
found by accepting them and rolling back. A draft the grammar refuses is rejected by the
verification anyway (its probability is 0), so rows after it allow everything.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from servelm.sampling.logits_processor import BatchUpdate, LogitsProcessor, ProcessorContext
from servelm.structured_output.backend import BatchOps

_BITS = 32


class GrammarLogitsProcessor(LogitsProcessor):
    def __init__(self, ctx: ProcessorContext) -> None:
        super().__init__(ctx)
        R, V = ctx.max_rows, ctx.vocab_size
        self.words = -(-V // _BITS)  # bitmask width W: int32 words per row
        self.matchers: list[Optional[Any]] = [None] * R
        self.active = np.zeros(R, dtype=bool)
        # tokens appended last step, on their way to the host: (matchers, host tokens, event)
        self._landing: list[tuple[list[Any], torch.Tensor, Optional[torch.cuda.Event]]] = []
        self._bitmask: Optional[torch.Tensor] = None  # [rows, W] int32 on the host
        stop = np.zeros(self.words, dtype=np.uint32)
        for t in ctx.eos_token_ids:
            if 0 <= t < V:
                stop[t // _BITS] |= np.uint32(1 << (t % _BITS))
        self._stop_row = stop.view(np.int32)  # [W]: only the stop tokens allowed
        # bit j of a word, to expand the mask on the device: [32] int32
        self._shifts: dict[torch.device, torch.Tensor] = {}
        self._ops: Optional[BatchOps] = None  # batched fill/accept, from the first grammar
        self.bu = BatchUpdate()

    # ---- batch membership --------------------------------------------------------------
    def update(self, bu: BatchUpdate) -> None:
        for rows, toks in bu.appended:  # before removals and moves: rows name them as of now
            sel = np.nonzero(self.active[rows])[0]
            if len(sel):
                self._start_landing([self.matchers[r] for r in rows[sel].tolist()],
                                    toks if len(sel) == len(rows)
                                    else toks[torch.from_numpy(sel).to(toks.device)])
        for row in bu.removed:
            self.matchers[row], self.active[row] = None, False
        for src, dst in bu.moved:
            self.matchers[dst], self.matchers[src] = self.matchers[src], None
            self.active[dst], self.active[src] = self.active[src], False
        for a in bu.added:
            if a.grammar is None:
                self.matchers[a.row], self.active[a.row] = None, False
                continue
            if self._ops is None:
                self._ops = a.grammar.batch_ops()
            m = a.grammar.matcher(max_rollback_tokens=-1)
            for t in a.output_token_ids:  # resumed after preemption: replay its output
                m.accept_token(int(t))
            self.matchers[a.row], self.active[a.row] = m, True
        self.bu = bu

    def _start_landing(self, matchers: list[Any], toks: torch.Tensor) -> None:
        event = None
        if toks.is_cuda:
            host = torch.empty(toks.shape, dtype=toks.dtype, pin_memory=True)
            host.copy_(toks, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = toks
        self._landing.append((matchers, host, event))

    def _land(self) -> None:
        for matchers, host, event in self._landing:
            if event is not None:
                event.synchronize()  # the last step's sampling only, not this step's forward
            toks = host.tolist()
            live = [i for i, m in enumerate(matchers) if not m.is_terminated()]
            if len(live) < len(matchers):
                matchers, toks = [matchers[i] for i in live], [toks[i] for i in live]
            self._ops.accept(matchers, toks)
        self._landing.clear()

    def is_active(self) -> bool:
        return bool(self.active[self.bu.logits_rows].any())

    # ---- masking -------------------------------------------------------------------------
    def fill(self, act: np.ndarray) -> torch.Tensor:
        """[A, W] int32 host bitmask for logits rows ``act`` (all with a grammar)."""
        self._land()
        bu = self.bu
        A = len(act)
        if self._bitmask is None or self._bitmask.shape[0] < A:
            n = max(A, 2 * (0 if self._bitmask is None else self._bitmask.shape[0]), 8)
            self._bitmask = torch.empty((n, self.words), dtype=torch.int32,
                                        pin_memory=self.ctx.device.type == "cuda")
        bm = self._bitmask
        bm_np = bm.numpy()
        rows = bu.logits_rows
        if not bu.drafts:  # one batched fill for all live rows
            ms = [self.matchers[r] for r in rows[act].tolist()]
            live = [k for k, m in enumerate(ms) if not m.is_terminated()]
            if len(live) < A:
                for k in sorted(set(range(A)) - set(live)):
                    bm_np[k] = self._stop_row  # done: only a stop token (ignore_eos runs on)
                ms = [ms[k] for k in live]
            if live:
                self._ops.fill(ms, bm, live)
            return bm[:A]
        prior = dict(bu.drafts)
        for k, i in enumerate(act.tolist()):
            m = self.matchers[rows[i]]
            drafts = prior.get(i, ())
            n = 0
            for t in drafts:
                if m.is_terminated() or not m.accept_token(int(t)):
                    break
                n += 1
            if n < len(drafts):
                bm_np[k] = -1  # after a refused draft: never sampled, anything goes
            elif m.is_terminated():
                bm_np[k] = self._stop_row  # done: only a stop token (ignore_eos runs on here)
            else:
                m.fill_next_token_bitmask(bm, k)
            if n:
                m.rollback(n)
        return bm[:A]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        bu = self.bu
        if bu.num_logits_rows == 0:
            return logits
        act = np.nonzero(self.active[bu.logits_rows])[0]
        if len(act) == 0:
            self._land()
            return logits
        bm = self.fill(act)
        dev = logits.device
        allowed = unpack_bitmask(bm.to(dev, non_blocking=True), logits.shape[1],
                                 self._shift(dev))  # [A, V] bool
        idx = torch.from_numpy(act).to(dev, non_blocking=True)
        logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))
        return logits

    def _shift(self, dev: torch.device) -> torch.Tensor:
        s = self._shifts.get(dev)
        if s is None:
            s = self._shifts[dev] = torch.arange(_BITS, dtype=torch.int32, device=dev)
        return s


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int,
                   shifts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[A, W] int32 (bit j of word w: token 32 w + j allowed) -> [A, vocab_size] bool."""
    if shifts is None:
        shifts = torch.arange(_BITS, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask[:, :, None] >> shifts) & 1  # [A, W, 32]
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()
