"""H2O's heavy-hitter statistic: the attention each cached token has received, summed over
every later query, head and layer, kept per KV slot ([num_blocks * block_size] fp32, so it
follows the paged layout: a slot's score is reset when a new token's KV is written there).

On GPUs accumulate_scores launches kernels/attention_scores.py (one launch a layer).

One kept set serves all layers (a request has one block table), so the scores are summed over
layers, where the H2O paper keeps a set per layer and head."""
from __future__ import annotations

import torch


def accumulate_scores(q: torch.Tensor, k_cache: torch.Tensor, meta, scale: float,
                      scores: torch.Tensor, softcap: float = 0.0) -> None:
    """accumulate_scores_ref's contract; on a GPU one Triton launch (D a power of two)."""
    D = q.shape[-1]
    if q.is_cuda and D & (D - 1) == 0:
        from servelm.kernels.attention_scores import accumulate_scores_triton
        accumulate_scores_triton(q, k_cache, meta, scale, scores, softcap)
    else:
        accumulate_scores_ref(q, k_cache, meta, scale, scores, softcap)


def accumulate_scores_ref(q: torch.Tensor, k_cache: torch.Tensor, meta, scale: float,
                          scores: torch.Tensor, softcap: float = 0.0) -> None:
    """Add this layer's attention probabilities to ``scores`` at the keys' slots. q: [T, H, D]
    (rotated), the context read from k_cache through meta's block tables (after this step's
    keys were written), causal within each sequence."""
    bs, KVH, D = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    H = q.shape[1]
    G = H // KVH
    start = 0
    for s, (q_len, ctx) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        nb = -(-ctx // bs)
        blocks = meta.block_tables[s, :nb].long()
        slots = (blocks[:, None] * bs + torch.arange(bs, device=q.device)).reshape(-1)[:ctx]
        k = k_cache[blocks].reshape(-1, KVH, D)[:ctx].float()  # [ctx, KVH, D]
        qs = q[start:start + q_len].float().view(q_len, KVH, G, D)
        logits = torch.einsum("qkgd,ckd->kgqc", qs, k) * scale  # [KVH, G, q_len, ctx]
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        pos_q = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
        allowed = torch.arange(ctx, device=q.device)[None, :] <= pos_q  # [q_len, ctx]
        p = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
        scores.index_add_(0, slots, p.sum(dim=(0, 1, 2)))
        start += q_len
