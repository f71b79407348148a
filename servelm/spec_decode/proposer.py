"""The Proposer contract: after a step, draft the next tokens of the requests that sampled.

The runner calls ``propose`` with each sampling request's tokens (the ones just accepted
included) and returns the drafts in ``ModelRunnerOutput.draft_token_ids``; the scheduler then
schedules them as spec tokens (k per request, clipped to its token budget, max_tokens and
max_model_len) and the runner verifies them in the next step (``sampling.rejection``). The
scheduler knows nothing else about speculation (but for lookahead KV slots, see
``SpeculativeConfig.num_lookahead_tokens``).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch


@dataclass(frozen=True)
class ProposerInput:
    req_ids: list[str]  # the requests that sampled this step and are still running
    token_ids: list[np.ndarray]  # each one's tokens: prompt + outputs, int32 views (read-only)
    # the runner's batch rows of those requests, and each row's tenancy count (a row whose
    # generation changed holds another request, or the same one resumed after preemption)
    rows: np.ndarray = None  # [S] int64
    generations: np.ndarray = None  # [S] int64
    block_tables: np.ndarray = None  # [S, max_blocks] int32 (the target's; KV block ids)


@dataclass(frozen=True)
class ProposerContext:
    """What a model-based proposer borrows from the runner that hosts it."""

    config: Any  # EngineConfig
    device: torch.device
    target: torch.nn.Module  # the target model (layer_skip drafts with its first layers)
    target_kv: Callable[[], list]  # -> the target's KV caches (allocated after load)
    # (ModelConfig) -> that model built on the device in the engine's dtype, weights loaded
    build_model: Callable[[Any], torch.nn.Module]
    use_cuda_graphs: bool  # capture the draft's decode passes
    max_rows: int  # rows of the runner's batch


class Proposer(ABC):
    @abstractmethod
    def load(self, ctx: ProposerContext) -> None:
        """Load whatever the proposer drafts with (a draft model, n-gram settings)."""

    @abstractmethod
    def propose(self, batch: ProposerInput) -> dict[str, list[int]]:
        """req id -> draft tokens to follow its last token (absent or empty: none)."""

    def kv_bytes_per_block(self) -> int:
        """Bytes of the proposer's own KV per cache block (its cache shares the target's block
        ids, so the memory budget splits into blocks of target + proposer KV)."""
        return 0

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate the proposer's KV (num_blocks blocks, as the target's) and anything sized
        by it (CUDA graphs)."""

    def capture_pending_graph(self) -> bool:
        """Capture one deferred CUDA graph in idle time; True while more remain."""
        return False
