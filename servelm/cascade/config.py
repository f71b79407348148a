"""When the small model's answer stands: its confidence, from the logprobs of the tokens it
sampled, against a threshold."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Sequence

from servelm.outputs import CompletionOutput
from servelm.sampling_params import SamplingParams


def mean_prob(lps: Sequence[float]) -> float:
    """exp(mean token logprob): the geometric mean of the sampled tokens' probabilities."""
    return math.exp(sum(lps) / len(lps)) if lps else 1.0


def min_prob(lps: Sequence[float]) -> float:
    """The least likely sampled token's probability: one unsure token escalates."""
    return math.exp(min(lps)) if lps else 1.0


CASCADE_CRITERIA: "MappingProxyType[str, Callable[[Sequence[float]], float]]" = \
    MappingProxyType({"mean_prob": mean_prob, "min_prob": min_prob})


@dataclass(frozen=True)
class CascadeConfig:
    """threshold: the small model's answer is returned when its confidence (``criterion`` over
    its sampled tokens' probabilities, in [0, 1]) is at least this; else the large model
    answers. 0: never escalate; above 1: always."""

    threshold: float
    criterion: str = "mean_prob"

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not self.threshold >= 0:
            raise ValueError(f"cascade threshold must be a number >= 0, got {self.threshold!r}.")
        if self.criterion not in CASCADE_CRITERIA:
            raise ValueError(f"cascade criterion must be one of {list(CASCADE_CRITERIA)}, got "
                             f"{self.criterion!r}.")


def small_model_params(p: SamplingParams) -> SamplingParams:
    """What the small model runs a request with: its parameters, asking for at least the
    sampled tokens' logprobs (the confidence is made of them)."""
    return p if p.logprobs is not None else dataclasses.replace(p, logprobs=0)


def confidence(out: CompletionOutput, criterion: str) -> float:
    """The small model's confidence in one completion, from the logprob of each token it
    sampled (the completion must carry logprobs)."""
    assert out.logprobs is not None
    lps = [pos[t].logprob for pos, t in zip(out.logprobs, out.token_ids)]
    return CASCADE_CRITERIA[criterion](lps)
