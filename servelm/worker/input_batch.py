"""Persistent host-side rows of the requests the runner holds, so that building a step's batch is
a few vectorised numpy gathers instead of per-token Python loops."""
from __future__ import annotations

import numpy as np


class InputBatch:
    """Row r holds one request: its token ids (prompt + outputs) and its block table.

    token_ids: [max_rows, max_model_len] int32; block_table: [max_rows, max_blocks] int32.
    Rows are recycled when requests finish or are preempted.
    """

    def __init__(self, max_rows: int, max_model_len: int, max_blocks: int) -> None:
        # token_ids grows in width on demand (up to max_model_len + 1), so long-context models
        # with many rows do not pay max_rows * max_model_len up front
        self.max_width = max_model_len + 1
        self.token_ids = np.zeros((max_rows, min(self.max_width, 2048)), dtype=np.int32)
        self.num_tokens = np.zeros(max_rows, dtype=np.int64)
        self.block_table = np.zeros((max_rows, max_blocks), dtype=np.int32)
        self.num_blocks = np.zeros(max_rows, dtype=np.int64)
        self.free_rows = list(range(max_rows - 1, -1, -1))

    def add(self, token_ids: list[int], block_ids: list[int]) -> int:
        if not self.free_rows:
            raise RuntimeError("input batch is full: more running requests than max_num_seqs")
        row = self.free_rows.pop()
        n, b = len(token_ids), len(block_ids)
        self._ensure_width(n + 1)
        self.token_ids[row, :n] = token_ids
        self.num_tokens[row] = n
        self.block_table[row, :b] = block_ids
        self.num_blocks[row] = b
        return row

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

    def append_tokens(self, rows: np.ndarray, tokens: np.ndarray) -> None:
        """One sampled token per row, vectorised."""
        if len(rows):
            self._ensure_width(int(self.num_tokens[rows].max()) + 1)
        self.token_ids[rows, self.num_tokens[rows]] = tokens
        self.num_tokens[rows] += 1

    def tokens(self, row: int, start: int = 0, end: int | None = None) -> np.ndarray:
        return self.token_ids[row, start:self.num_tokens[row] if end is None else end]

    def remove(self, row: int) -> None:
        self.num_tokens[row] = 0
        self.num_blocks[row] = 0
        self.free_rows.append(row)
