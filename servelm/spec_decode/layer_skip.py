"""Self-speculative drafting (Draft & Verify, LayerSkip): the target's first ``draft_layers``
layers, its final norm and its head propose greedy drafts. No second model and no KV of its
own: those layers' KV is the target's (same weights, same inputs), valid for every computed
token; the draft passes write it at lookahead positions, which verification then overwrites."""
from __future__ import annotations

import numpy as np

from servelm.spec_decode.model_drafter import ModelProposer
from servelm.spec_decode.proposer import ProposerContext, ProposerInput


class LayerSkipProposer(ModelProposer):
    def load(self, ctx: ProposerContext) -> None:
        super().load(ctx)
        self.model = ctx.target
        self.num_layers = self.cfg.draft_layers

    def _forward(self, input_ids, positions, meta):
        # the model runs one layer per KV cache it is given: the first draft_layers
        return self.model(input_ids, positions, self.ctx.target_kv()[:self.num_layers], meta)

    def _compute_logits(self, hidden):
        return self.model.compute_logits(hidden)

    def _valid(self, batch: ProposerInput, num_tokens: np.ndarray) -> np.ndarray:
        # a request samples once all its tokens are computed: all but the newest have KV
        return num_tokens - 1
