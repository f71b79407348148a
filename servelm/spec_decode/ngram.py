"""Prompt lookup (n-gram) drafting: the tokens that followed the last earlier occurrence of the
sequence's current suffix. Free to compute, and right often where the output copies its input
(editing, summarising with quotes, code)."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from servelm.spec_decode.config import SpeculativeConfig
from servelm.spec_decode.proposer import Proposer, ProposerInput


def ngram_drafts(tokens: np.ndarray, n_min: int, n_max: int, k: int) -> Optional[np.ndarray]:
    """tokens: [L] -> up to k tokens that followed the latest earlier match of the longest
    suffix of n_max..n_min tokens (None: no match). The match must end before the suffix
    itself starts repeating at the end: its continuation exists."""
    L = len(tokens)
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        suffix = tokens[L - n:]
        # windows over tokens[:-1]: a window starting at i ends at i + n - 1 <= L - 2, so at
        # least one token follows it
        windows = sliding_window_view(tokens[:L - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n  # the latest match: closest in style to what comes next
            return tokens[start:start + k]
    return None


class NgramProposer(Proposer):
    def __init__(self, cfg: SpeculativeConfig) -> None:
        self.cfg = cfg

    def load(self, ctx: Any) -> None:
        pass  # nothing to load: the drafts come from the request's own tokens

    def propose(self, batch: ProposerInput) -> dict[str, list[int]]:
        c, out = self.cfg, {}
        for rid, toks in zip(batch.req_ids, batch.token_ids):
            d = ngram_drafts(np.asarray(toks), c.prompt_lookup_min, c.prompt_lookup_max,
                             c.num_speculative_tokens)
            if d is not None and len(d):
                out[rid] = d.tolist()
        return out
