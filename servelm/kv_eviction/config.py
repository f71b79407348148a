"""The eviction settings an engine runs with (``--kv-eviction``, ``--kv-eviction-budget``,
``--sink-tokens``, ``--kv-recent-tokens``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

KV_EVICTION_POLICIES = ("none", "streaming", "h2o")


@dataclass(frozen=True)
class KVEvictionConfig:
    """policy: "streaming" keeps the first ``sink_tokens`` and the most recent ones; "h2o"
    keeps the sinks, the ``recent_tokens`` most recent, and fills the rest of the budget with
    the tokens that received the most attention so far. ``budget``: the tokens of KV a request
    keeps after an eviction; a request evicts once it would hold more than budget plus one
    block, so it never holds more than that (every query sees at most budget + block_size
    keys). Survivors take positions 0, 1, ... in the cache (rotary re-positioned), as
    StreamingLLM does, so a request may generate past max_model_len."""

    policy: str
    budget: int
    sink_tokens: int = 4
    recent_tokens: int = 0  # h2o: the recent window (0 for streaming: all but the sinks)

    @property
    def needs_scores(self) -> bool:
        return self.policy == "h2o"

    def fixed_blocks(self, block_size: int) -> int:
        """Leading blocks an eviction leaves as they are: wholly sink tokens, which every
        policy keeps in place (they keep their prefix-cache entries and are not copied)."""
        return min(self.sink_tokens, self.budget) // block_size


def make_eviction_config(policy: str, budget: Optional[int], sink_tokens: Optional[int],
                         recent_tokens: Optional[int], block_size: int,
                         max_model_len: int) -> Optional[KVEvictionConfig]:
    """Checked settings, or None for policy "none" (then the other flags must be unset)."""
    if policy not in KV_EVICTION_POLICIES:
        raise ValueError(f"kv_eviction must be one of {list(KV_EVICTION_POLICIES)}, "
                         f"got {policy!r}.")
    if policy == "none":
        if budget is not None or sink_tokens is not None or recent_tokens is not None:
            raise ValueError("kv_eviction_budget, sink_tokens and kv_recent_tokens need "
                             "kv_eviction='streaming' or 'h2o'.")
        return None
    budget = 512 if budget is None else budget
    sink_tokens = 4 if sink_tokens is None else sink_tokens
    if sink_tokens < 0:
        raise ValueError(f"sink_tokens must be >= 0, got {sink_tokens}.")
    if budget <= sink_tokens or budget < block_size:
        raise ValueError(f"kv_eviction_budget ({budget}) must exceed sink_tokens "
                         f"({sink_tokens}) and be at least a block ({block_size} tokens).")
    if budget + block_size > max_model_len:
        raise ValueError(f"kv_eviction_budget ({budget}) plus a block ({block_size}) must fit "
                         f"in max_model_len ({max_model_len}): a request holds up to that "
                         "many tokens between evictions.")
    if policy == "streaming":
        if recent_tokens is not None:
            raise ValueError("kv_recent_tokens is h2o's: streaming keeps the sinks and the most "
                             "recent tokens up to the budget.")
        return KVEvictionConfig(policy, budget, sink_tokens, budget - sink_tokens)
    recent = (budget - sink_tokens) // 2 if recent_tokens is None else recent_tokens
    if recent < 1 or sink_tokens + recent > budget:
        raise ValueError(f"kv_recent_tokens ({recent}) must be >= 1 and leave sink_tokens "
                         f"({sink_tokens}) + it within kv_eviction_budget ({budget}).")
    return KVEvictionConfig(policy, budget, sink_tokens, recent)
