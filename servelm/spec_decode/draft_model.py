"""A small draft model (same vocabulary as the target) proposing greedy drafts, run by the same
worker, with its own paged KV cache: as many blocks as the target's, addressed by the target's
block ids, so the scheduler's allocation (with lookahead slots) covers both and the memory
budget splits into blocks of target + draft KV."""
from __future__ import annotations

import numpy as np
import torch

from servelm.spec_decode.model_drafter import ModelProposer
from servelm.spec_decode.proposer import ProposerContext, ProposerInput


class DraftModelProposer(ModelProposer):
    def load(self, ctx: ProposerContext) -> None:
        super().load(ctx)
        self.mc = self.cfg.draft  # ModelConfig (spec_decode.config.finalize_speculative_config)
        self.model = ctx.build_model(self.mc)
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        # per runner row: its tenancy when last drafted (-1: never), the first position past
        # the true tokens the draft then saw, and the drafts it then fed back as inputs (their
        # KV is right where they turn out accepted)
        self.gen = np.full(ctx.max_rows, -1, dtype=np.int64)
        self.seen = np.zeros(ctx.max_rows, dtype=np.int64)
        self.fed: list[np.ndarray] = [np.zeros(0, np.int64)] * ctx.max_rows

    def kv_bytes_per_block(self) -> int:
        return self.ctx.config.kv_bytes_per_block(self.mc)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        block, dtype = self.ctx.config.kv_cache_spec(self.mc)
        self.kv = [(torch.zeros((num_blocks, *block), dtype=dtype, device=self.device),
                    torch.zeros((num_blocks, *block), dtype=dtype, device=self.device))
                   for _ in range(self.mc.num_layers)]
        super().initialize_kv_cache(num_blocks)

    def _forward(self, input_ids, positions, meta):
        return self.model(input_ids, positions, self.kv, meta)

    def _compute_logits(self, hidden):
        return self.model.compute_logits(hidden)

    def _valid(self, batch: ProposerInput, num_tokens: np.ndarray) -> np.ndarray:
        out = np.zeros(len(num_tokens), dtype=np.int64)
        for s, (row, gen) in enumerate(zip(batch.rows.tolist(), batch.generations.tolist())):
            if self.gen[row] != gen:
                continue  # new, or resumed after preemption (other blocks): from scratch
            seen, fed = int(self.seen[row]), self.fed[row]
            true = batch.token_ids[s][seen:seen + len(fed)]
            m = len(true)
            diff = np.nonzero(true != fed[:m])[0]
            out[s] = seen + (int(diff[0]) if len(diff) else m)
        return out

    def _drafted(self, batch, num_tokens, kr, drafts) -> None:
        done = kr > 0  # the requests the draft ran for (the others' KV is as it was)
        rows = batch.rows[done]
        self.gen[rows] = batch.generations[done]
        self.seen[rows] = num_tokens[done]
        kr, drafts = kr[done], drafts[done]
        for s, row in enumerate(rows.tolist()):
            # drafts 1..kr-1 were inputs of the later passes, at positions n, n+1, ... (a
            # tree's nodes sit at positions in tree order: none counts as in sequence)
            self.fed[row] = (np.zeros(0, np.int64) if self.tree is not None
                             else drafts[s, :max(0, int(kr[s]) - 1)].copy())
