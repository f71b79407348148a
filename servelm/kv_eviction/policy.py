"""Which cached tokens survive an eviction, per policy (a registry of one-function policies).

A request holding ``old_len`` tokens (cache indices 0..old_len-1, in order) keeps ``keep`` of
them; the result is their indices in ascending order (survivors keep their relative order, and
compact.py moves survivor j to cache index j)."""
from __future__ import annotations

from types import MappingProxyType
from typing import Callable, Optional

import torch

from servelm.kv_eviction.config import KVEvictionConfig


def keep_streaming(cfg: KVEvictionConfig, old_len: int, keep: int,
                   scores: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """StreamingLLM: the first sink_tokens, then the most recent keep - sink_tokens."""
    s = min(cfg.sink_tokens, keep)
    return torch.cat([torch.arange(s, device=device),
                      torch.arange(old_len - (keep - s), old_len, device=device)])


def keep_h2o(cfg: KVEvictionConfig, old_len: int, keep: int,
             scores: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """H2O: the sinks, the recent_tokens most recent, and of the tokens in between the
    keep - sinks - recent with the largest accumulated attention (``scores``: [old_len] fp32,
    by cache index; ties to the older token)."""
    assert scores is not None and scores.shape[0] == old_len
    s = cfg.sink_tokens
    r = min(cfg.recent_tokens, keep - s)  # (a request's own budget may be smaller)
    heavy = keep - s - r
    middle = scores[s:old_len - r]
    # (stable order: topk on the negated index breaks ties toward older tokens)
    top = torch.topk(middle.double() - torch.arange(middle.shape[0], device=device) * 1e-12,
                     heavy).indices if heavy > 0 else torch.zeros(0, dtype=torch.int64,
                                                                  device=device)
    return torch.cat([torch.arange(s, device=device), torch.sort(top).values + s,
                      torch.arange(old_len - r, old_len, device=device)])


POLICIES: "MappingProxyType[str, Callable[..., torch.Tensor]]" = MappingProxyType({
    "streaming": keep_streaming,
    "h2o": keep_h2o,
})
