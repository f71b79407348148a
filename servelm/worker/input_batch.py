"""The runner's persistent batch: one row per request it holds, so that building a step's inputs
is a few vectorised numpy gathers instead of per-token Python loops, and the sampling state
(``sampling.BatchUpdate``) follows rows that change, not the whole batch each step."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from servelm.core.step import NewRequestData
from servelm.sampling import AddedRequest, BatchUpdate


class InputBatch:
    """Row r holds one request: its token ids (prompt + outputs, then this step's drafts past
    ``num_tokens``), its KV progress and its block table.

    token_ids: [max_rows, width] int32 (width grows up to max_model_len + 1 on demand, so long
    contexts with many rows do not pay for it up front); block_table: [max_rows, max_blocks] int32.
    Rows are recycled when requests finish or are preempted.
    """

    def __init__(self, max_rows: int, max_model_len: int, max_blocks: int,
                 unbounded: bool = False) -> None:
        # unbounded (KV eviction): sequences may grow past max_model_len
        self.max_width = (1 << 40) if unbounded else max_model_len + 1
        self.token_ids = np.zeros((max_rows, min(self.max_width, 2048)), dtype=np.int32)
        self.num_tokens = np.zeros(max_rows, dtype=np.int64)
        self.num_prompt_tokens = np.zeros(max_rows, dtype=np.int64)
        self.num_computed_tokens = np.zeros(max_rows, dtype=np.int64)
        # KV eviction: tokens dropped from the row's cache (position p at cache index p - it)
        self.num_evicted = np.zeros(max_rows, dtype=np.int64)
        self.block_table = np.zeros((max_rows, max_blocks), dtype=np.int32)
        self.num_blocks = np.zeros(max_rows, dtype=np.int64)
        self.prompt_logprobs = np.full(max_rows, -1, dtype=np.int64)  # top-k asked; -1: none
        # asynchronous steps: the newest sampled token of a row may still be on the device only
        # (position dev_pos, host_pending until the step's output lands); generation counts
        # the row's tenants, so a landing output can tell whether its request still owns it
        self.dev_pos = np.full(max_rows, -1, dtype=np.int64)
        self.host_pending = np.zeros(max_rows, dtype=bool)
        self.generation = np.zeros(max_rows, dtype=np.int64)
        self.free_rows = list(range(max_rows - 1, -1, -1))
        self.row_of: dict[str, int] = {}  # req id -> row
        # changes since the last take_update(), in time order per kind
        self._update = BatchUpdate()

    def __contains__(self, req_id: str) -> bool:
        return req_id in self.row_of

    def add(self, nr: NewRequestData) -> int:
        if not self.free_rows:
            raise RuntimeError("input batch is full: more running requests than max_num_seqs")
        row = self.free_rows.pop()
        n, b = nr.num_tokens, len(nr.block_ids)
        self._ensure_width(n + 1)
        tokens = self.token_ids[row]
        tokens[:n] = nr.token_ids[:n]
        self.num_tokens[row] = n
        self.num_prompt_tokens[row] = nr.num_prompt_tokens
        self.num_computed_tokens[row] = nr.num_computed_tokens
        self.num_evicted[row] = nr.num_evicted
        pl = nr.params.prompt_logprobs
        self.prompt_logprobs[row] = -1 if pl is None else pl
        self.generation[row] += 1
        self.block_table[row, :b] = nr.block_ids
        self.num_blocks[row] = b
        self.row_of[nr.req_id] = row
        p = nr.num_prompt_tokens
        seed = None if nr.params.seed is None or nr.params.greedy else nr.params.seed
        self._update.added.append(AddedRequest(row, nr.params, tokens[:p], tokens[p:n].tolist(),
                                               seed, nr.grammar))
        return row

    def remove(self, req_id: str) -> None:
        row = self.row_of.pop(req_id, None)
        if row is None:
            return
        self.num_tokens[row] = 0
        self.num_blocks[row] = 0
        self.prompt_logprobs[row] = -1
        self.host_pending[row] = False
        self.generation[row] += 1
        self.free_rows.append(row)
        self._update.removed.append(row)

    def release_blocks(self, row: int, upto: int) -> None:
        """The row's first ``upto`` table entries point at the null block (released under a
        sliding window: their old blocks may now hold another request's KV)."""
        from servelm.core.kv_cache import NULL_BLOCK
        self.block_table[row, :min(upto, int(self.num_blocks[row]))] = NULL_BLOCK

    def set_blocks(self, row: int, block_ids: list[int]) -> None:
        """Replace the row's block table (after a KV eviction)."""
        self.block_table[row, :len(block_ids)] = block_ids
        self.num_blocks[row] = len(block_ids)

    def append_blocks(self, row: int, block_ids: list[int]) -> None:
        b = int(self.num_blocks[row])
        self.block_table[row, b:b + len(block_ids)] = block_ids
        self.num_blocks[row] = b + len(block_ids)

    def _ensure_width(self, width: int) -> None:
        if width > self.token_ids.shape[1]:
            new = min(self.max_width, max(width, 2 * self.token_ids.shape[1]))
            grown = np.zeros((self.token_ids.shape[0], new), dtype=np.int32)
            grown[:, :self.token_ids.shape[1]] = self.token_ids
            self.token_ids = grown

    def write_drafts(self, row: int, drafts: list[int]) -> None:
        """Put a step's draft tokens after the row's tokens (not counted in num_tokens)."""
        n = int(self.num_tokens[row])
        self._ensure_width(n + len(drafts) + 1)
        self.token_ids[row, n:n + len(drafts)] = drafts

    def append_on_device(self, rows: np.ndarray,
                         tokens: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """One sampled token per row, still on the device: counted now (the next step's input
        takes it from the device), written to the host rows by ``land``. Returns the rows'
        generations and the tokens' positions, for ``land``."""
        pos = self.num_tokens[rows]
        if len(rows):
            self._ensure_width(int(pos.max()) + 2)
        self.num_tokens[rows] = pos + 1
        self.dev_pos[rows] = pos
        self.host_pending[rows] = True
        self._update.appended.append((rows, tokens))
        return self.generation[rows].copy(), pos

    def land(self, rows: np.ndarray, gens: np.ndarray, pos: np.ndarray,
             tokens: np.ndarray) -> None:
        """The host copy of tokens appended on the device at positions ``pos``, for rows whose
        request is still the one that sampled them (rows recycled since are left alone)."""
        own = self.generation[rows] == gens
        rows, pos, tokens = rows[own], pos[own], tokens[own]
        self.token_ids[rows, pos] = tokens
        newest = self.dev_pos[rows] == pos  # no later step has appended to the row since
        self.host_pending[rows[newest]] = False

    def append_token_lists(self, rows: list[int], tokens: list[list[int]],
                           device: torch.device) -> None:
        """Accepted tokens of several rows, known on the host (a speculative step): written to
        the host rows, and to the sampling state in one device copy."""
        for row, toks in zip(rows, tokens):
            n = int(self.num_tokens[row])
            self._ensure_width(n + len(toks) + 1)
            self.token_ids[row, n:n + len(toks)] = toks
            self.num_tokens[row] = n + len(toks)
        flat = [t for toks in tokens for t in toks]
        self._update.appended.append((np.repeat(np.asarray(rows, dtype=np.int64),
                                                [len(t) for t in tokens]),
                                      torch.tensor(flat, dtype=torch.int64).to(device)))

    def tokens(self, row: int, start: int = 0, end: int | None = None) -> np.ndarray:
        return self.token_ids[row, start:self.num_tokens[row] if end is None else end]

    def take_update(self, logits_rows: np.ndarray, logits_rows_t: Optional[torch.Tensor],
                    drafts: list[tuple[int, list[int]]],
                    sample_pos: Optional[np.ndarray] = None) -> BatchUpdate:
        """The changes since the last call, with this step's logits layout (sample_pos: [L]
        the position each logits row's token will take)."""
        bu = self._update
        bu.logits_rows, bu.logits_rows_t, bu.drafts = logits_rows, logits_rows_t, drafts
        if sample_pos is not None:
            bu.sample_pos = sample_pos
        self._update = BatchUpdate()
        return bu
