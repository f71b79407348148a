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

On a GPU the work starts a step earlier: ``sampled`` hands a step's tokens, as soon as they
are sampled, to a thread that waits for them, advances the matchers and fills the next step's
masks (xgrammar's calls release the GIL) while the engine lands the last step and schedules
and prepares the next; ``apply`` then takes those rows (and fills only rows the thread did not
have: requests that joined since). At 256 rows the fill is milliseconds of host time that
would otherwise add to every step.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
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
        # the next step's masks, being filled on a thread from this step's tokens: a future of
        # {id(matcher): its row of _ahead_buf} (with the matchers, so no id is reused), and
        # the device tokens it took (the next update skips them)
        self._pool: Optional[ThreadPoolExecutor] = None
        self._ahead: Optional[Future] = None
        self._ahead_tokens: Optional[torch.Tensor] = None
        self._ahead_buf: Optional[torch.Tensor] = None  # [n, W] int32, pinned
        self._prefilled: Optional[tuple[dict[int, int], list[Any]]] = None
        # on the CPU the engine's own math takes the cores the thread would use
        self.fill_ahead = ctx.device.type == "cuda"
        self.rows_filled_ahead = 0  # logits rows whose mask came from the thread (a count)
        self.bu = BatchUpdate()

    # ---- batch membership --------------------------------------------------------------
    def update(self, bu: BatchUpdate) -> None:
        for rows, toks in bu.appended:  # before removals and moves: rows name them as of now
            if toks is self._ahead_tokens:  # already taken by the thread (sampled)
                self._ahead_tokens = None
                continue
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

    def sampled(self, rows: np.ndarray, tokens: torch.Tensor) -> None:
        if not self.fill_ahead or self._ops is None or self.bu.drafts:
            return
        sel = np.nonzero(self.active[rows])[0]
        if not len(sel):
            return
        self._land()  # (the last one's is done by now: its masks were this step's)
        self._prefilled = None
        ms = [self.matchers[r] for r in rows[sel].tolist()]
        toks = tokens if len(sel) == len(rows) else tokens[torch.from_numpy(sel).to(tokens.device)]
        event = None
        if toks.is_cuda:
            host = torch.empty(toks.shape, dtype=toks.dtype, pin_memory=True)
            host.copy_(toks, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = toks.clone()
        n = len(ms)
        if self._ahead_buf is None or self._ahead_buf.shape[0] < n:
            # (one buffer: the thread writes it only after this step's sampling, which comes
            # after the upload of the masks it held, in stream order)
            self._ahead_buf = torch.empty((max(n, 8), self.words), dtype=torch.int32,
                                          pin_memory=toks.is_cuda)
        buf, ops = self._ahead_buf, self._ops

        def fill_ahead() -> tuple[dict[int, int], list[Any]]:
            if event is not None:  # this step's sampling only (the GIL is released meanwhile)
                event.synchronize()
            t = host.tolist()
            live = [i for i, m in enumerate(ms) if not m.is_terminated()]
            ops.accept([ms[i] for i in live], [t[i] for i in live])
            filled = [i for i in live if not ms[i].is_terminated()]
            if filled:
                ops.fill([ms[i] for i in filled], buf, filled)
            return {id(ms[i]): i for i in filled}, ms

        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="servelm-grammar")
        self._ahead = self._pool.submit(fill_ahead)
        self._ahead_tokens = tokens

    def _land(self) -> None:
        if self._ahead is not None:  # first: the matchers are the thread's until it is done
            self._prefilled = self._ahead.result()
            self._ahead = None
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
        prefilled, self._prefilled = self._prefilled, None  # (this step's only)
        if not bu.drafts:  # one batched fill for all live rows
            ms = [self.matchers[r] for r in rows[act].tolist()]
            done = [k for k, m in enumerate(ms) if m.is_terminated()]
            live = [k for k, m in enumerate(ms) if not m.is_terminated()]
            if prefilled is not None:  # rows the thread filled are taken as they are
                at = prefilled[0]
                src = [at.get(id(ms[k]), -1) for k in live]
                if not done and src == list(range(A)):
                    self.rows_filled_ahead += A
                    return self._ahead_buf[:A]  # the same rows in the same order
                have = [(k, j) for k, j in zip(live, src) if j >= 0]
                self.rows_filled_ahead += len(have)
                if have:
                    ks, js = zip(*have)
                    bm_np[list(ks)] = self._ahead_buf.numpy()[list(js)]
                live = [k for k, j in zip(live, src) if j < 0]
            if done:
                bm_np[done] = self._stop_row  # done: only a stop token (ignore_eos runs on)
            if live:
                self._ops.fill([ms[k] for k in live], bm, live)
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
