"""A speculative step's inputs and outputs beyond a plain step's: token-tree masks and positions;
each request's drafts kept up to the first one its own samples disagree with (sampling.rejection;
spec_decode.tree for trees), appended to the batch on the host, with their logprobs; a tree's
taken branch moved into place in the KV cache."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

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


def tree_step_inputs(tree: TreeShape, node_tokens: list[list[int]], sample: np.ndarray,
                     cu: np.ndarray, starts: np.ndarray, positions: np.ndarray
                     ) -> tuple[list[tuple[int, list[int]]], np.ndarray, np.ndarray]:
    """A verification step of token trees: node_tokens[i] are the nodes of sampling sequence
    sample[i] (its root, the newest token, first; cu: query offsets, starts: computed tokens
    before the step). Sets the nodes' rotary positions (root + depth) in `positions`, and
    returns the logits processors' draft prefixes (each node's row samples after its path),
    the per-token ancestor bitmasks [T] and the per-sequence tree starts [S]."""
    drafts: list[tuple[int, list[int]]] = []
    bits = np.zeros(len(positions), dtype=np.int64)
    tree_start = np.full(len(starts), 1 << 30, dtype=np.int32)  # no tree
    j = 0
    for i, d in zip(sample.tolist(), node_tokens):
        m = len(d)
        if m:
            assert cu[i + 1] - cu[i] == 1 + m, "a token tree's request computes nothing else"
            drafts.extend((j + 1 + f, [d[p] for p in tree.path(f)]) for f in range(m))
            tree_start[i] = starts[i] + 1
            bits[cu[i] + 1:cu[i + 1]] = tree.ancestor_bits[:m]
            positions[cu[i] + 1:cu[i + 1]] = starts[i] + tree.depths[:m]
        j += 1 + m
    return drafts, bits, tree_start


def compact_tree_kv(kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                    block_table: np.ndarray, block_size: int, logits_rows: np.ndarray,
                    logits_slot_pos: np.ndarray, paths: list[tuple[int, list[int]]]) -> None:
    """Move each verified tree's taken branch to the positions after its root: node f's KV
    (slot position root + 1 + f) to root + depth, in every layer. paths: (first logits row of
    the request, taken node indices). A destination never holds a later source (a node's
    index is at least its depth - 1), and sources are gathered before the writes."""
    src, dst = [], []
    for j, path in paths:
        row, root = int(logits_rows[j]), int(logits_slot_pos[j])
        for i, f in enumerate(path):
            if f != i:
                for pos, out in ((root + 1 + f, src), (root + 1 + i, dst)):
                    out.append(int(block_table[row, pos // block_size]) * block_size
                               + pos % block_size)
    if not src:
        return
    device = kv_caches[0][0].device
    s_t = torch.tensor(src, dtype=torch.int64, device=device)
    d_t = torch.tensor(dst, dtype=torch.int64, device=device)
    for k, v in kv_caches:
        for c in (k, v):
            flat = c.view(-1, *c.shape[2:])  # [slots, KVH, D]
            flat.index_copy_(0, d_t, flat.index_select(0, s_t))
