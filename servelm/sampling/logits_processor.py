"""The LogitsProcessor contract.

A processor keeps per-request state in persistent tensors indexed by the runner's batch rows
(``InputBatch``: a request keeps its row while it runs), updated from one ``BatchUpdate`` per step
(rows added, removed, moved, and the tokens each row's request appended), and then edits the
step's logits. Logits rows are not batch rows: only requests that sample this step have logits,
and a request verifying k draft tokens has k + 1 consecutive logits rows, row j seeing the
request's state as if drafts[:j] were accepted (so penalties and min_tokens count through them).
``BatchUpdate.logits_rows`` maps each logits row to its batch row.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

from servelm.sampling_params import SamplingParams


@dataclass(frozen=True)
class AddedRequest:
    row: int
    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # generated so far (a request resumed after preemption)
    seed: Optional[int] = None  # seeded sampling (params.seed, n > 1 children's derived)
    # structured outputs: the request's compiled grammar (structured_output.CompiledGrammar)
    grammar: Any = None


@dataclass
class BatchUpdate:
    """Changes since the previous step, applied in this order: ``appended`` (tokens the rows'
    current requests sampled last step), ``removed``, ``moved``, ``added``; then this step's
    logits layout."""

    # chunks of (rows [n] on the host, tokens [n] int64 on the device): row rows[i] got token
    # tokens[i], in order (a row that got several tokens appears once per token). Tokens stay
    # on the device: with asynchronous scheduling they are not on the host yet.
    appended: list[tuple[np.ndarray, torch.Tensor]] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    moved: list[tuple[int, int]] = field(default_factory=list)  # (from row, to row)
    added: list[AddedRequest] = field(default_factory=list)
    # this step: the batch row of each logits row, on the host [L] and on the device [L]
    logits_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    logits_rows_t: Optional[torch.Tensor] = None
    # (logits row, the drafts before it) for logits rows after at least one draft
    drafts: list[tuple[int, list[int]]] = field(default_factory=list)
    # [L] the sequence position of the token each logits row samples (seeded rows draw their
    # randomness from (seed, position): see sampler.position_seed)
    sample_pos: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def appended_rows(self) -> np.ndarray:
        """The rows of all appended tokens, concatenated."""
        if len(self.appended) == 1:
            return self.appended[0][0]
        return np.concatenate([r for r, _ in self.appended] or [np.zeros(0, dtype=np.int64)])

    def appended_tokens(self) -> torch.Tensor:
        if len(self.appended) == 1:
            return self.appended[0][1]
        return torch.cat([t for _, t in self.appended])

    @property
    def num_logits_rows(self) -> int:
        return len(self.logits_rows)

    def num_prior_drafts(self) -> np.ndarray:
        """[L] int64: how many drafts each logits row counts as accepted before it."""
        out = np.zeros(len(self.logits_rows), dtype=np.int64)
        for j, prior in self.drafts:
            out[j] = len(prior)
        return out


@dataclass(frozen=True)
class ProcessorContext:
    """What every processor is built with."""

    max_rows: int
    vocab_size: int
    device: torch.device
    eos_token_ids: tuple[int, ...] = ()


class LogitsProcessor(ABC):
    """update() once per step before apply(); apply() may edit ``logits`` in place."""

    def __init__(self, ctx: ProcessorContext) -> None:
        self.ctx = ctx

    @abstractmethod
    def update(self, batch_update: BatchUpdate) -> None:
        """Follow the batch's membership and history; remember this step's logits layout."""

    @abstractmethod
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [L, V] fp32, rows as in the last update's ``logits_rows``."""

    @abstractmethod
    def is_active(self) -> bool:
        """Whether apply() would change any of the last update's logits rows (a host check:
        plain greedy steps then take the argmax computed inside the decode graph)."""

    def prepare(self) -> bool:
        """Called once the step's forward is launched: start apply()'s host work elsewhere
        (another process) and say so; the runner then launches the step's sampling only
        after the engine's own host work (landing the step before). apply() works without."""
        return False


class RowTable:
    """A host array of per-row values with a device mirror refreshed only after a change."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, fill, device: torch.device) -> None:
        self.host = np.full(shape, fill, dtype=dtype)
        self.fill = fill
        self.device = device
        self._dev: Optional[torch.Tensor] = None

    def set(self, row: int, value) -> None:
        self.host[row] = value
        self._dev = None

    def clear(self, row: int) -> None:
        self.set(row, self.fill)

    def move(self, src: int, dst: int) -> None:
        self.host[dst] = self.host[src]
        self.host[src] = self.fill
        self._dev = None

    def widen(self, width: int, pad_with_first: bool = False) -> None:
        """Grow the second dimension to ``width``: new columns hold the fill value, or with
        pad_with_first each row's own first value (tables padded by repeating an entry)."""
        if width > self.host.shape[1]:
            grown = np.full((self.host.shape[0], width), self.fill, dtype=self.host.dtype)
            if pad_with_first:
                grown[:] = self.host[:, :1]
            grown[:, :self.host.shape[1]] = self.host
            self.host = grown
            self._dev = None

    @property
    def dev(self) -> torch.Tensor:
        if self._dev is None:
            self._dev = torch.from_numpy(self.host.copy()).to(self.device)
        return self._dev
