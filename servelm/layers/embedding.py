"""Vocab-parallel token embedding: under tensor parallelism each rank holds vocab_size / world
rows (rank r: ids [r * V/ws, (r + 1) * V/ws)); a lookup takes this rank's rows, zeros for other
ids, and sums over the ranks (one all-reduce). The same shard serves as a tied lm_head, whose
logits the model gathers over the ranks."""
from __future__ import annotations

import torch
from torch import nn

from servelm.distributed import ParallelGroup, shard_range


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int,
                 tp: ParallelGroup = ParallelGroup()) -> None:
        super().__init__()
        self.tp, self.vocab_size = tp, vocab_size
        self.vocab_start, self.vocab_end = shard_range(vocab_size, tp, "vocabulary")
        # weight: [V / ws, hidden], filled by load_weight
        self.weight = nn.Parameter(torch.empty(self.vocab_end - self.vocab_start, hidden_size),
                                   requires_grad=False)

    def load_weight(self, full: torch.Tensor) -> None:
        """full: the checkpoint's [vocab_size, hidden] table; this rank's rows are copied."""
        if tuple(full.shape) != (self.vocab_size, self.weight.shape[1]):
            raise ValueError(f"checkpoint embedding has shape {tuple(full.shape)}, model expects "
                             f"{(self.vocab_size, self.weight.shape[1])}")
        self.weight.data.copy_(full[self.vocab_start:self.vocab_end])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [T] -> [T, hidden]
        if self.tp.world_size == 1:
            return nn.functional.embedding(ids, self.weight)
        mine = (ids >= self.vocab_start) & (ids < self.vocab_end)
        local = torch.where(mine, ids - self.vocab_start, torch.zeros_like(ids))
        x = nn.functional.embedding(local, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return self.tp.all_reduce(x)
