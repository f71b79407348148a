"""Logprobs packed for the step's output: the sampled tokens' (from the sampler) and the prompt's
(computed from the hidden states of the prompt positions in this step's chunk)."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from servelm.core.step import TokenLogprobs
from servelm.sampling import SamplerOutput


class SampledLogprobs:
    """The sampler's logprob tensors brought to the host once per step."""

    def __init__(self, so: SamplerOutput) -> None:
        self.lp = so.sampled_logprob.tolist()
        self.rank = so.sampled_rank.tolist()
        self.top_lp = so.top_logprobs.tolist() if so.top_logprobs is not None else None
        self.top_ids = so.top_ids.tolist() if so.top_ids is not None else None

    def row(self, i: int, token: int, k: int) -> TokenLogprobs:
        """Logits row i: the sampled token and the top k."""
        d: TokenLogprobs = {token: (self.lp[i], self.rank[i])}
        for j in range(k):
            d.setdefault(self.top_ids[i][j], (self.top_lp[i][j], j + 1))
        return d


def prompt_logprobs(compute_logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                    targets: torch.Tensor, k: int) -> list[TokenLogprobs]:
    """hidden: [m, H] states of prompt positions p..p+m-1; targets: [m] the tokens at p+1..p+m.
    Returns per position the target's (logprob, rank) and the top k."""
    lp = compute_logits(hidden).log_softmax(-1)  # [m, V]
    tgt_lp = lp.gather(1, targets[:, None]).squeeze(1)
    ranks = (lp > tgt_lp[:, None]).sum(-1) + 1
    top: Optional[tuple[list, list]] = None
    if k > 0:
        t = lp.topk(k, dim=-1)
        top = t.values.tolist(), t.indices.tolist()
    rows = []
    tl, rk = tgt_lp.tolist(), ranks.tolist()
    for j, tok in enumerate(targets.tolist()):
        d: TokenLogprobs = {tok: (tl[j], rk[j])}
        if top is not None:
            for r in range(k):
                d.setdefault(top[1][j][r], (top[0][j][r], r + 1))
        rows.append(d)
    return rows
