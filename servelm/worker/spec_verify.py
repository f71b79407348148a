"""A speculative step's outputs: each request's drafts kept up to the first one its own samples
disagree with (sampling.rejection), appended to the batch on the host, with their logprobs."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np

from servelm.core.step import ModelRunnerOutput
from servelm.sampling import SamplerOutput
from servelm.sampling.rejection import accept_by_match
from servelm.spec_decode.tree import TreeShape, accept_tree
from servelm.worker.logprobs import SampledLogprobs

if TYPE_CHECKING:
    from servelm.worker.input_batch import InputBatch


def collect_verified(batch: "InputBatch", logprobs_k: np.ndarray, req_ids: list[str],
                     logits_rows: np.ndarray, num_logits: np.ndarray, so: SamplerOutput,
                     drafts: dict[str, list[int]], out: ModelRunnerOutput,
                     tree: Optional[TreeShape] = None) -> list[tuple[int, list[int]]]:
    """logits_rows: [L] batch row per logits row, num_logits: 1 + drafts per request (in
    req_ids order); logprobs_k: top logprobs wanted per batch row (-1: none). With a token
    tree the drafts are its first nodes; returns, per request whose taken path is not
    already in place, (its first logits row, the path's node indices), for the KV move."""
    tokens = so.token_ids.tolist()  # host sync: verification needs the values
    lps = SampledLogprobs(so) if so.sampled_logprob is not None else None
    j, rows, accepted, paths = 0, [], [], []
    for rid, n in zip(req_ids, num_logits.tolist()):
        d = drafts.get(rid, [])
        if tree is not None and d:
            acc, path = accept_tree(tokens[j:j + n], d, tree)
            if any(f != i for i, f in enumerate(path)):
                paths.append((j, path))
            src = [j] + [j + 1 + f for f in path]  # the logits row each kept token came from
        else:
            acc = accept_by_match(tokens[j:j + n], d)
            src = range(j, j + len(acc))
        rows.append(int(logits_rows[j]))
        accepted.append(acc)
        out.sampled_token_ids[rid] = acc
        k = int(logprobs_k[logits_rows[j]])
        if lps is not None and k >= 0:
            out.logprobs[rid] = [lps.row(r, t, k) for r, t in zip(src, acc)]
        j += n
    batch.append_token_lists(rows, accepted, so.token_ids.device)
    return paths
