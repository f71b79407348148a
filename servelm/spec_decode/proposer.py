"""The Proposer contract: after a step, draft the next tokens of the requests that sampled.

The runner calls ``propose`` with each sampling request's tokens (the ones just accepted
included) and returns the drafts in ``ModelRunnerOutput.draft_token_ids``; the scheduler then
schedules them as spec tokens (k per request, clipped to its token budget, max_tokens and
max_model_len) and the runner verifies them in the next step (``sampling.rejection``). The
scheduler knows nothing else about speculation.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ProposerInput:
    req_ids: list[str]  # the requests that sampled this step and are still running
    token_ids: list[np.ndarray]  # each one's tokens: prompt + outputs, int32 views (read-only)


class Proposer(ABC):
    @abstractmethod
    def load(self, model_config: Any) -> None:
        """Load whatever the proposer drafts with (a draft model, n-gram settings)."""

    @abstractmethod
    def propose(self, batch: ProposerInput) -> dict[str, list[int]]:
        """req id -> draft tokens to follow its last token (absent or empty: none)."""
