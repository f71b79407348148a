"""Batched sampling: logits processors (in order), temperature, top-k/top-p/min-p, per-request
seeded generators, and logprobs of the raw model distribution (before any processor or
temperature, as vLLM returns by default)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from servelm.sampling.logits_processor import LogitsProcessor


@dataclass
class SamplingMetadata:
    """Per-row sampling settings of one step; B = number of rows that sample."""

    temperature: Optional[torch.Tensor]  # [B] fp32, rows with 0 are greedy; None if all greedy
    all_greedy: bool
    top_k: Optional[torch.Tensor] = None  # [B] int64, vocab size = off; None if no row uses it
    top_p: Optional[torch.Tensor] = None  # [B] fp32, 1.0 = off
    min_p: Optional[torch.Tensor] = None  # [B] fp32, 0.0 = off
    # row -> seeded generator; a request with several rows (drafts) draws for them in order
    generators: dict[int, torch.Generator] = field(default_factory=dict)
    max_num_logprobs: int = -1  # -1: no row wants logprobs


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    # present when max_num_logprobs >= 0
    sampled_logprob: Optional[torch.Tensor] = None  # [B] fp32
    sampled_rank: Optional[torch.Tensor] = None  # [B] int64, 1 = most likely
    top_ids: Optional[torch.Tensor] = None  # [B, K] int64
    top_logprobs: Optional[torch.Tensor] = None  # [B, K] fp32


def apply_top_k_top_p_min_p(logits: torch.Tensor, m: SamplingMetadata) -> torch.Tensor:
    """logits: [B, V] already divided by temperature -> same with excluded tokens at -inf."""
    if m.min_p is not None:
        probs = logits.softmax(-1)
        cutoff = probs.amax(-1, keepdim=True) * m.min_p[:, None]
        logits = logits.masked_fill(probs < cutoff, float("-inf"))
    if m.top_k is None and m.top_p is None:
        return logits
    sorted_logits, idx = logits.sort(dim=-1, descending=False)  # ascending
    V = logits.shape[-1]
    if m.top_k is not None:
        # the k-th largest value is the threshold; ties with it survive
        kth = sorted_logits.gather(1, (V - m.top_k.clamp(1, V))[:, None])
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if m.top_p is not None:
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= (1 - m.top_p[:, None])
        drop[:, -1] = False  # always keep the most likely token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, idx, sorted_logits)


class Sampler:
    def __call__(self, logits: torch.Tensor, m: SamplingMetadata,
                 processors: Sequence[LogitsProcessor] = ()) -> SamplerOutput:
        """logits: [B, V] fp32 (raw model output; processors may edit it in place)."""
        out = SamplerOutput(token_ids=torch.empty(0))
        if m.max_num_logprobs >= 0:
            raw_logprobs = logits.log_softmax(-1)
        for p in processors:
            logits = p.apply(logits)
        greedy_ids = logits.argmax(-1)
        if m.all_greedy:
            out.token_ids = greedy_ids
        else:
            temp = torch.where(m.temperature > 0, m.temperature, torch.ones_like(m.temperature))
            x = apply_top_k_top_p_min_p(logits / temp[:, None], m)
            probs = x.softmax(-1)
            # Exponential race: argmax(p / q), q ~ Exp(1), samples from p. Seeded rows draw their
            # own q from their generator, so their tokens do not depend on the rest of the batch.
            q = torch.empty_like(probs).exponential_()
            for row, gen in m.generators.items():
                q[row].exponential_(generator=gen)
            sampled = (probs / q).argmax(-1)
            out.token_ids = torch.where(m.temperature > 0, sampled, greedy_ids)
        if m.max_num_logprobs >= 0:
            lp = raw_logprobs
            out.sampled_logprob = lp.gather(1, out.token_ids[:, None]).squeeze(1)
            out.sampled_rank = (lp > out.sampled_logprob[:, None]).sum(-1) + 1
            if m.max_num_logprobs > 0:
                out.top_logprobs, out.top_ids = lp.topk(m.max_num_logprobs, dim=-1)
        return out
