"""The matchers of a batch's rows and the bitmask fill: what the grammar processor does with
them, in one place for both of its homes (the runner's process, or the mask process of
service.py, which replays the same operations).

Operations arrive in the processor's order, as plain tuples (they cross a pipe as they are):
- ``("accept", rows, tokens)``: row rows[i]'s sequence appended tokens[i] (rows named as of
  before this update's removals and moves);
- ``("remove", row)``, ``("move", src, dst)``;
- ``("add", row, grammar, replay)``: a fresh matcher from ``grammar`` (a CompiledGrammar here;
  a grammar id in the mask process, which resolves it), advanced through ``replay`` (a request
  resumed after preemption had generated those).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from servelm.structured_output.backend import BatchOps

_BITS = 32


def stop_row(words: int, vocab_size: int, stop_ids: Sequence[int]) -> np.ndarray:
    """[W] int32 words allowing only the stop tokens (a row whose grammar has ended)."""
    stop = np.zeros(words, dtype=np.uint32)
    for t in stop_ids:
        if 0 <= t < vocab_size:
            stop[t // _BITS] |= np.uint32(1 << (t % _BITS))
    return stop.view(np.int32)


class MatcherRows:
    """One matcher per batch row that has a grammar. ``resolve`` maps what an ``add`` names to a
    CompiledGrammar (the identity in the runner's process)."""

    def __init__(self, words: int, stop: np.ndarray,
                 resolve: Callable[[Any], Any] = lambda g: g) -> None:
        self.matchers: dict[int, Any] = {}  # batch row -> its matcher
        self.words = words  # W: int32 words per bitmask row
        self.stop = stop  # [W]: only the stop tokens
        self.resolve = resolve
        self.ops: Optional[BatchOps] = None  # batched fill/accept, from the first grammar

    def run(self, ops: Sequence[tuple]) -> None:
        for op in ops:
            kind = op[0]
            if kind == "accept":
                self._accept(op[1], op[2])
            elif kind == "remove":
                self.matchers.pop(op[1], None)
            elif kind == "move":
                _, src, dst = op
                m = self.matchers.pop(src, None)
                if m is None:
                    self.matchers.pop(dst, None)
                else:
                    self.matchers[dst] = m
            elif kind == "add":
                _, row, grammar, replay = op
                g = self.resolve(grammar)
                if self.ops is None:
                    self.ops = g.batch_ops()
                m = g.matcher(max_rollback_tokens=-1)
                for t in replay:
                    m.accept_token(int(t))
                self.matchers[row] = m
            else:
                raise ValueError(f"unknown matcher operation {kind!r}")

    def _accept(self, rows: Sequence[int], tokens: Sequence[int]) -> None:
        ms, toks = [], []
        for r, t in zip(rows, tokens):
            m = self.matchers.get(r)
            if m is not None and not m.is_terminated():  # an ended grammar takes no more
                ms.append(m)
                toks.append(t)
        if ms:
            self.ops.accept(ms, toks)

    def fill(self, rows: Sequence[int], drafts: dict[int, Sequence[int]], bitmask: Any) -> None:
        """Row k of ``bitmask`` ([>= len(rows), W] int32, host) for the matcher of batch row
        rows[k], after the drafts ``drafts[k]`` (tokens proposed before that logits row)."""
        bm_np = bitmask.numpy()
        if not drafts:  # one batched fill for all live rows
            ms, live = [], []
            for k, r in enumerate(rows):
                m = self.matchers[r]
                if m.is_terminated():
                    bm_np[k] = self.stop  # done: only a stop token (ignore_eos runs on)
                else:
                    ms.append(m)
                    live.append(k)
            if live:
                self.ops.fill(ms, bitmask, live)
            return
        for k, r in enumerate(rows):
            m = self.matchers[r]
            prior = drafts.get(k, ())
            n = 0
            for t in prior:
                if m.is_terminated() or not m.accept_token(int(t)):
                    break
                n += 1
            if n < len(prior):
                bm_np[k] = -1  # after a refused draft: never sampled, anything goes
            elif m.is_terminated():
                bm_np[k] = self.stop  # done: only a stop token (ignore_eos runs on here)
            else:
                m.fill_next_token_bitmask(bitmask, k)
            if n:
                m.rollback(n)
