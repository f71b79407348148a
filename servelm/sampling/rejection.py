"""Verifying draft tokens against the target model's own samples.

A request verifying drafts d_1..d_k is sampled at k + 1 positions: t_0 given its real tokens,
t_j given them plus d_1..d_j (each position's logits processed as if those drafts were accepted).
``accept_by_match`` keeps t_0 and then t_j while d_j == t_{j-1}: every kept token is a sample of
the target distribution given a prefix that is real, so the output is distributed exactly as
without speculation, for any proposer (greedy: token-identical). A proposer that also reports its
draft probabilities can do better when sampling (accepting d_j with min(1, p/q)); that rejection
sampler belongs with speculative decoding.
"""
from __future__ import annotations

from typing import Sequence


def accept_by_match(sampled: Sequence[int], drafts: Sequence[int]) -> list[int]:
    """sampled: the k + 1 target samples, drafts: the k drafts -> the 1..k+1 tokens to keep."""
    out = [sampled[0]]
    for j, d in enumerate(drafts):
        if sampled[j] != d:
            break
        out.append(sampled[j + 1])
    return out
