"""Batched sampling: logits processors (in order), temperature, top-k/top-p/min-p, per-request
seeds per token position, and logprobs of the raw model distribution (before any processor or
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
    # row -> the seed of its draw (position_seed): seeded rows' randomness depends on the
    # request's seed and the token's position only, not on the batch, the step or how many
    # drafts were verified before it
    seeds: dict[int, int] = field(default_factory=dict)
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


_MASK64 = (1 << 64) - 1


def position_seed(seed: int, position: int) -> int:
    """A 63-bit generator seed for the token at `position` of a request seeded with `seed`
    (splitmix64 of both: nearby seeds and positions give unrelated streams, and n > 1 samples'
    derived seeds seed + i never collide with another position's)."""
    z = ((seed & _MASK64) * 0x9E3779B97F4A7C15 + (position + 1) * 0xD1B54A32D192ED03) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


class Sampler:
    """Turns logits into tokens; holds one reusable generator per device for seeded rows."""

    def __init__(self) -> None:
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        return gen

    def __call__(self, logits: torch.Tensor, m: SamplingMetadata,
                 processors: Sequence[LogitsProcessor] = ()) -> SamplerOutput:
        """logits: [B, V] fp32 (raw model output; processors may edit it in place)."""
        out = SamplerOutput(token_ids=torch.empty(0))
        if m.max_num_logprobs >= 0:
            raw_logprobs = logits.log_softmax(-1)
        if not m.all_greedy:
            # Exponential race: argmax(p / q), q ~ Exp(1), samples from p. Seeded rows draw their
            # own q from (seed, position), so their tokens depend on nothing else. Drawn before
            # the processors: a seeded row's draw is a launch or two of host time, which a
            # processor's masks filled in another process can use (the grammar processor's
            # apply waits for them).
            q = torch.empty_like(logits).exponential_()
            if m.seeds:
                gen = self._generator(logits.device)
                for row, seed in m.seeds.items():
                    gen.manual_seed(seed)
                    q[row].exponential_(generator=gen)
        for p in processors:
            logits = p.apply(logits)
        greedy_ids = logits.argmax(-1)
        if m.all_greedy:
            out.token_ids = greedy_ids
        else:
            temp = torch.where(m.temperature > 0, m.temperature, torch.ones_like(m.temperature))
            x = apply_top_k_top_p_min_p(logits / temp[:, None], m)
            probs = x.softmax(-1)
            sampled = (probs / q).argmax(-1)
            out.token_ids = torch.where(m.temperature > 0, sampled, greedy_ids)
        if m.max_num_logprobs >= 0:
            lp = raw_logprobs
            out.sampled_logprob = lp.gather(1, out.token_ids[:, None]).squeeze(1)
            out.sampled_rank = (lp > out.sampled_logprob[:, None]).sum(-1) + 1
            if m.max_num_logprobs > 0:
                out.top_logprobs, out.top_ids = lp.topk(m.max_num_logprobs, dim=-1)
        return out
