"""The early-exit decode step (forward.py's method) cut at its candidate layers into pieces of
fixed shapes, so that each piece can be one CUDA graph (early_exit/graphs.py) and the host
decides between pieces only.

With candidates c_1 < ... < c_m (layer counts, early_exit/config.py) the step is:
  segment 0      embedding, layers 1..c_1, candidate check at c_1
  segment i      layers c_i+1..c_{i+1} (exited rows reset to their exit state before each),
                 candidate check at c_{i+1}                                    (0 < i < m)
  segment m      layers c_m+1..L, the final norm; logits and greedy ids of every row
  tail i         after the check at c_i found every row exited: layers c_i+1..L only write
                 KV from the exit state (no attention, no MLP); logits and greedy ids
The host reads one flag after each check (has every real row exited?) and runs either the next
segment or that candidate's tail: one device sync per candidate, as the eager step has.

State between pieces lives in persistent buffers of max_bs rows (the residual stream, each
row's exit state and normed hidden, its exit layer, whether it exited); a piece reads and writes
rows [:bs] of them. Padding rows (a graph's batch beyond the step's; seq_len 0) are not
"real": they never count towards the flag, and their KV writes are dropped (slot -1). Every
``where`` below selects values exactly, so the pieces compute what forward.py computes (that
skips the resets while no row has exited; resetting with an all-false mask changes nothing).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from servelm.early_exit.config import EarlyExitConfig
from servelm.early_exit.forward import CRITERIA

# (input_ids [bs], positions [bs], meta) -> a piece's outputs: () for a segment ending in a
# check, (logits [bs, V] fp32, greedy ids [bs], exit layer [bs]) for the last segment and tails
Piece = Callable[..., tuple]


class ExitPieces:
    """The pieces of one model's early-exit step; ``segment(i)`` and ``tail(i)`` give the
    callables a graph captures (or an eager driver calls), ``run`` drives them."""

    def __init__(self, model, kv_caches, cfg: EarlyExitConfig, max_bs: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.kv_caches, self.cfg = model, kv_caches, cfg
        self.layers = list(model.layers[model.start:model.end])
        L = len(self.layers)
        self.cands = cfg.candidates(L)
        self.bounds = (0,) + self.cands + (L,)  # segment i: layers bounds[i] .. bounds[i+1]
        self.saturation = cfg.criterion == "state"
        self.score = CRITERIA.get(cfg.criterion)
        H = model.args.hidden_size
        e = lambda *s, dt=dtype: torch.zeros(*s, dtype=dt, device=device)  # noqa: E731
        self.x, self.residual = e(max_bs, H), e(max_bs, H)  # the stream between segments
        self.state = e(max_bs, H)  # exited rows: the residual stream at their exit
        self.out = e(max_bs, H)  # exited rows: its normed hidden
        # exited rows: the logits at their exit (logit criteria; the tails return them)
        self.exit_logits = (None if self.saturation
                            else e(max_bs, model.args.vocab_size, dt=torch.float32))
        self.exited = e(max_bs, dt=torch.bool)
        self.exit_layer = e(max_bs, dt=torch.int64)
        self.done = e(1, dt=torch.bool)  # after a check: has every real row exited?

    # ---- the pieces -------------------------------------------------------------------------
    def segment(self, i: int) -> Piece:
        return lambda input_ids, positions, meta: self._segment(i, input_ids, positions, meta)

    def tail(self, i: int) -> Piece:
        """After candidate i (1-based: the check ending segment i - 1)."""
        return lambda input_ids, positions, meta: self._tail(i, positions, meta)

    def _segment(self, i: int, input_ids: torch.Tensor, positions: torch.Tensor,
                 meta) -> tuple:
        bs = input_ids.shape[0]
        lo, hi = self.bounds[i], self.bounds[i + 1]
        if i == 0:
            x, residual = self.model.embed_tokens(input_ids), None
            if self.model.embed_scale:
                x = x * self.model.embed_scale
            self.exited[:bs].fill_(False)
            self.exit_layer[:bs].fill_(len(self.layers))
        else:
            x, residual = self.x[:bs], self.residual[:bs]
        keep = self.exited[:bs, None]
        before = None
        for n in range(lo, hi):
            if n == hi - 1 and self.saturation and i < len(self.cands):
                before = x if residual is None else x + residual  # the stream entering it
            if i > 0:  # exited rows enter each layer with their exit state
                x = torch.where(keep, torch.zeros_like(x), x)
                residual = torch.where(keep, self.state[:bs], residual)
            x, residual = self.layers[n](positions, x, residual, self.kv_caches[n], meta)
        normed, h = self.model.norm(x, residual)
        if i == len(self.cands):  # the last segment: every row's logits, exited rows' from
            if i > 0:  # their exit's normed hidden (as forward.py)
                normed = torch.where(keep, self.out[:bs], normed)
            logits = self.model.compute_logits(normed)
            return logits, logits.argmax(-1), self.exit_layer[:bs]
        self._check(hi, normed, h, before, meta)
        self.x[:bs].copy_(x)
        self.residual[:bs].copy_(residual)
        return ()

    def _check(self, n: int, normed: torch.Tensor, h: torch.Tensor,
               before: Optional[torch.Tensor], meta) -> None:
        """Candidate layer n: rows confident enough exit (their state, normed hidden, logits
        and exit layer are kept); ``done`` says whether every real row has exited."""
        bs = normed.shape[0]
        if self.saturation:  # how little layer n changed the stream's direction
            conf = torch.nn.functional.cosine_similarity(h.float(), before.float(), dim=-1)
        else:
            logits = self.model.compute_logits(normed)
            conf = self.score(logits)
        real = meta.seq_lens > 0
        new = (conf >= self.cfg.threshold) & ~self.exited[:bs] & real
        rows = new[:, None]
        self.state[:bs] = torch.where(rows, h, self.state[:bs])
        self.out[:bs] = torch.where(rows, normed, self.out[:bs])
        if self.exit_logits is not None:
            self.exit_logits[:bs] = torch.where(rows, logits, self.exit_logits[:bs])
        self.exit_layer[:bs] = torch.where(new, n, self.exit_layer[:bs])
        self.exited[:bs] |= new
        self.done.copy_((self.exited[:bs] | ~real).all().reshape(1))

    def _tail(self, i: int, positions: torch.Tensor, meta) -> tuple:
        bs = positions.shape[0]
        state = self.state[:bs]
        for n in range(self.bounds[i], len(self.layers)):
            self.layers[n].propagate_kv(positions, state, self.kv_caches[n], meta)
        logits = (self.exit_logits[:bs] if self.exit_logits is not None
                  else self.model.compute_logits(self.out[:bs]))
        return logits, logits.argmax(-1), self.exit_layer[:bs]

    # ---- the step -----------------------------------------------------------------------------
    def run(self, call: Callable[[str, int], tuple]) -> tuple:
        """One step: call("segment", i) / call("tail", i) runs that piece (eagerly, or a graph's
        replay) and returns its outputs; -> (logits, greedy ids, exit layer), [bs] rows."""
        for i in range(len(self.cands)):
            call("segment", i)
            if bool(self.done.item()):  # every row exited at candidate i + 1: KV only after
                return call("tail", i + 1)
        return call("segment", len(self.cands))
