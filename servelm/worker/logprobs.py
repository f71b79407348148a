"""Logprobs packed for the step's output: the sampled tokens' (from the sampler) and the prompt's
(computed from the hidden states of the prompt positions in this step's chunk)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np
import torch

from servelm.core.step import TokenLogprobs
from servelm.sampling import SamplerOutput

if TYPE_CHECKING:
    from servelm.worker.input_batch import InputBatch


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


def wants_prompt_logprobs(batch: "InputBatch", rows: np.ndarray, starts: np.ndarray) -> bool:
    """Some sequence of the step computes prompt positions whose logprobs were asked for."""
    return bool(((batch.prompt_logprobs[rows] >= 0)
                 & (starts < batch.num_prompt_tokens[rows] - 1)).any())


def chunk_prompt_logprobs(batch: "InputBatch", req_ids: Sequence[str], rows: np.ndarray,
                          starts: np.ndarray, query_lens: Sequence[int], hidden: torch.Tensor,
                          compute_logits: Callable[[torch.Tensor], torch.Tensor]
                          ) -> dict[str, tuple[int, list[TokenLogprobs]]]:
    """For the step's sequences asking prompt_logprobs: the logprob of each prompt token given
    its prefix, for the prompt positions computed in this chunk (position p predicts token
    p+1). hidden: [T, H] of the step's flat batch. Returns req id -> (first position, rows)."""
    out: dict[str, tuple[int, list[TokenLogprobs]]] = {}
    wants = np.nonzero(batch.prompt_logprobs[rows] >= 0)[0]
    if not len(wants):
        return out
    cu = np.concatenate([[0], np.cumsum(query_lens)])  # host copy: no sync
    for i in wants.tolist():
        row, start = int(rows[i]), int(starts[i])
        last = min(start + int(cu[i + 1] - cu[i]), int(batch.num_prompt_tokens[row]) - 1)
        if last <= start:
            continue  # positions [start, last) predict prompt tokens start+1 .. last
        h = hidden[int(cu[i]):int(cu[i]) + last - start]
        targets = torch.from_numpy(batch.tokens(row, start + 1, last + 1).astype(np.int64))
        out[req_ids[i]] = (start, prompt_logprobs(compute_logits, h, targets.to(hidden.device),
                                                  int(batch.prompt_logprobs[row])))
    return out
