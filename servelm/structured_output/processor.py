"""The grammar bitmask logits processor: rows whose request has structured outputs may only
sample tokens their grammar allows next.

Each such row has a matcher (its grammar's state after the row's tokens), kept by a MatcherRows
(rows.py) in one of two homes:
- here, in the runner's process (grammars compiled here: the CPU's default);
- in the mask process (service.py; grammars compiled there, handed out as RemoteGrammar: the
  default on CUDA), so that a step's grammar work runs beside the engine's own host work.

Per step:
- ``update`` turns the batch's changes into matcher operations. The tokens the rows appended
  last step are still on the device with asynchronous scheduling, so their copy to the host
  starts here, behind the last step's sampling and before this step's forward is launched.
- ``prepare`` (the runner calls it after launching the forward) waits for that copy only and
  sends the operations and this step's fill to the mask process; the runner then defers the
  step's sampling until the engine has landed the step before (its host work overlaps the
  fill).
- ``apply`` runs the operations and fills the masks here (or collects the mask process's), and
  masks the logits on the device.
A row verifying k drafts has k + 1 logits rows: row j's mask is the grammar's after drafts[:j],
found by accepting them and rolling back. A draft the grammar refuses is rejected by the
verification anyway (its probability is 0), so rows after it allow everything.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from servelm.sampling.logits_processor import BatchUpdate, LogitsProcessor, ProcessorContext
from servelm.structured_output.rows import MatcherRows, stop_row

_BITS = 32


class GrammarLogitsProcessor(LogitsProcessor):
    def __init__(self, ctx: ProcessorContext) -> None:
        super().__init__(ctx)
        R, V = ctx.max_rows, ctx.vocab_size
        self.words = -(-V // _BITS)  # bitmask width W: int32 words per row
        self.active = np.zeros(R, dtype=bool)  # rows with a grammar
        self.rows = MatcherRows(self.words, stop_row(self.words, V, ctx.eos_token_ids))
        self.service: Optional[Any] = None  # the mask process, once a grammar came from there
        # operations not yet run; an "accept" holds (rows, host tokens, copy event) until its
        # tokens are on the host
        self._ops: list[tuple] = []
        self._sent: Optional[np.ndarray] = None  # this step's fill went out: its logits rows
        self._bitmask: Optional[torch.Tensor] = None  # [rows, W] int32 on the host
        self._uploaded: Optional[Any] = None  # torch.cuda.Event: the last masks' copy is done
        self.bu = BatchUpdate()

    # ---- batch membership --------------------------------------------------------------
    def update(self, bu: BatchUpdate) -> None:
        for rows, toks in bu.appended:  # before removals and moves: rows name them as of now
            sel = np.nonzero(self.active[rows])[0]
            if len(sel):
                if len(sel) < len(rows):
                    rows, toks = rows[sel], toks[torch.from_numpy(sel).to(toks.device)]
                self._ops.append(("accept", rows.tolist()) + _to_host(toks))
        for row in bu.removed:
            if self.active[row]:
                self._ops.append(("remove", row))
                self.active[row] = False
        for src, dst in bu.moved:
            if self.active[src] or self.active[dst]:
                self._ops.append(("move", src, dst))
            self.active[dst], self.active[src] = self.active[src], False
        for a in bu.added:
            g = a.grammar
            if g is None:
                if self.active[a.row]:
                    self._ops.append(("remove", a.row))
                    self.active[a.row] = False
                continue
            service = getattr(g, "service", None)
            if service is not None:
                self.service, g = service, g.gid
            self._ops.append(("add", a.row, g, [int(t) for t in a.output_token_ids]))
            self.active[a.row] = True
        self.bu = bu
        self._sent = None

    def _landed_ops(self) -> list[tuple]:
        """The pending operations with their tokens on the host (waits for those copies:
        the last step's sampling, not this step's forward)."""
        ops = []
        for op in self._ops:
            if op[0] == "accept":
                _, rows, host, event = op
                if event is not None:
                    event.synchronize()
                op = ("accept", rows, host.tolist())
            ops.append(op)
        self._ops.clear()
        return ops

    def is_active(self) -> bool:
        return bool(self.active[self.bu.logits_rows].any())

    # ---- masking -------------------------------------------------------------------------
    def _fill_request(self) -> tuple[np.ndarray, list[int], dict[int, list[int]]]:
        """(this step's logits rows with a grammar, their batch rows, their drafts by index)."""
        bu = self.bu
        act = np.nonzero(self.active[bu.logits_rows])[0]
        prior = dict(bu.drafts)
        drafts = {k: [int(t) for t in prior[i]] for k, i in enumerate(act.tolist()) if i in prior}
        return act, bu.logits_rows[act].tolist(), drafts

    def prepare(self) -> bool:
        if self.service is None or not self.is_active():
            return False
        act, rows, drafts = self._fill_request()
        self.service.submit(self._landed_ops(), rows, drafts)
        self._sent = act
        return True

    def fill(self, act: np.ndarray, rows: list[int], drafts: dict[int, list[int]]) -> torch.Tensor:
        """[A, W] int32 host masks for logits rows ``act`` (all with a grammar)."""
        A = len(act)
        if self.service is not None:
            if self._sent is None:
                self.service.submit(self._landed_ops(), rows, drafts)
            self._sent = None
            masks = self.service.result(A)  # in shared memory, until the next submit
            if self.ctx.device.type != "cuda":
                return torch.from_numpy(masks)
            buf = self._host_buffer(A)
            buf.numpy()[:] = masks  # into pinned memory for an asynchronous copy
            return buf
        self.rows.run(self._landed_ops())
        buf = self._host_buffer(A)
        self.rows.fill(rows, drafts, buf)
        return buf

    def _host_buffer(self, A: int) -> torch.Tensor:
        """[A, W] int32 on the host, pinned on CUDA; free once its last copy is done."""
        if self._uploaded is not None:
            self._uploaded.synchronize()  # an earlier step's copy: done long ago in practice
            self._uploaded = None
        if self._bitmask is None or self._bitmask.shape[0] < A:
            n = max(A, 2 * (0 if self._bitmask is None else self._bitmask.shape[0]), 8)
            self._bitmask = torch.empty((n, self.words), dtype=torch.int32,
                                        pin_memory=self.ctx.device.type == "cuda")
        return self._bitmask[:A]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.bu.num_logits_rows == 0 or not self.is_active():
            return logits
        if self._sent is not None:
            act, rows, drafts = self._sent, [], {}
        else:
            act, rows, drafts = self._fill_request()
        bm = self.fill(act, rows, drafts)
        dev = logits.device
        if dev.type != "cuda":
            apply_bitmask_ref(logits, bm, torch.from_numpy(act))
            return logits
        from servelm.kernels.bitmask import apply_bitmask
        bm = bm.to(dev, non_blocking=True)
        self._uploaded = torch.cuda.Event()
        self._uploaded.record()
        apply_bitmask(logits, bm, torch.from_numpy(act).to(dev, non_blocking=True))
        return logits


def _to_host(toks: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.cuda.Event]]:
    """(host tokens, the event after their copy) - the copy starts now, behind the device's
    queued work."""
    if not toks.is_cuda:
        return toks, None
    host = torch.empty(toks.shape, dtype=toks.dtype, pin_memory=True)
    host.copy_(toks, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[A, W] int32 (bit j of word w: token 32 w + j allowed) -> [A, vocab_size] bool."""
    shifts = torch.arange(_BITS, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask[:, :, None] >> shifts) & 1  # [A, W, 32]
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


def apply_bitmask_ref(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """In place: logits [L, V], bitmask [A, W] int32, rows [A] int64 (distinct logits rows):
    logits[rows[k], t] = -inf where row k forbids token t (kernels/bitmask.py on CUDA)."""
    allowed = unpack_bitmask(bitmask, logits.shape[1])
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
