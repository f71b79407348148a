"""H2O's heavy-hitter scores on the GPU: each query token's attention probabilities over its
paged context, added (atomically) to a per-KV-slot fp32 buffer, summed over query heads.

One program takes one (query token, query head): a first pass over the context's key tiles
finds the softmax's max and normaliser (online), a second adds exp(s - max) / sum to each
key's slot. Causal: a query at context position p sees keys 0..p. Soft-capping as the attention
kernels apply it. The grid depends on tensor shapes only (no host loop over sequences).

Reference: ``servelm.kv_eviction.scores.accumulate_scores_ref`` (PyTorch, a loop over
sequences).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tile(q, k_ptr, bt_ptr, s, kvh, start, n_keys, scale, softcap, stride_kb, stride_ks,
          stride_kh, stride_bt, BS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
          SOFTCAP: tl.constexpr):
    """Keys start..start+BLOCK_N of sequence s: (their scores (-inf past n_keys), their slots,
    which are real)."""
    keys = start + tl.arange(0, BLOCK_N)
    ok = keys < n_keys
    blk = tl.load(bt_ptr + s * stride_bt + keys // BS, mask=ok, other=0).to(tl.int64)
    d = tl.arange(0, D)
    k = tl.load(k_ptr + blk[:, None] * stride_kb + (keys % BS)[:, None] * stride_ks
                + kvh * stride_kh + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    x = tl.sum(k * q[None, :], axis=1) * scale
    if SOFTCAP:
        x = softcap * (1.0 - 2.0 / (tl.exp(2.0 * x / softcap) + 1.0))
    return tl.where(ok, x, -float("inf")), blk * BS + keys % BS, ok


@triton.jit
def _scores_kernel(q_ptr, k_ptr, bt_ptr, pos_ptr, seq_ptr, out_ptr, scale, softcap,
                   stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt,
                   G: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                   SOFTCAP: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    kvh = h // G
    n_keys = tl.load(pos_ptr + t) + 1  # the query's context position p: keys 0..p
    s = tl.load(seq_ptr + t).to(tl.int64)
    q = tl.load(q_ptr + t * stride_qt + h * stride_qh + tl.arange(0, D)).to(tl.float32)
    m = -float("inf")
    l = 0.0
    for start in range(0, n_keys, BLOCK_N):  # the softmax's max and normaliser
        x, _, _ = _tile(q, k_ptr, bt_ptr, s, kvh, start, n_keys, scale, softcap, stride_kb,
                        stride_ks, stride_kh, stride_bt, BS, D, BLOCK_N, SOFTCAP)
        m_new = tl.maximum(m, tl.max(x, 0))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    for start in range(0, n_keys, BLOCK_N):  # each key's probability, to its slot
        x, slot, ok = _tile(q, k_ptr, bt_ptr, s, kvh, start, n_keys, scale, softcap,
                            stride_kb, stride_ks, stride_kh, stride_bt, BS, D, BLOCK_N,
                            SOFTCAP)
        tl.atomic_add(out_ptr + slot, tl.exp(x - m) / l, mask=ok)


def accumulate_scores_triton(q: torch.Tensor, k_cache: torch.Tensor, meta, scale: float,
                             scores: torch.Tensor, softcap: float = 0.0) -> None:
    """accumulate_scores' contract: q [T, H, D] (D a power of two), k_cache [blocks, BS, KVH,
    D], meta's query_start_loc / seq_lens / block_tables, scores [slots] fp32 (added to)."""
    T, H, D = q.shape
    if T == 0:
        return
    BS, KVH = k_cache.shape[1], k_cache.shape[2]
    qsl = meta.query_start_loc.to(torch.int64)
    tok = torch.arange(T, device=q.device)
    seq = torch.searchsorted(qsl[1:], tok, right=True)  # each token's sequence
    # context position: the sequence's length less the queries after this one
    pos = meta.seq_lens.to(torch.int64)[seq] - (qsl[1:][seq] - tok)
    bt = meta.block_tables
    _scores_kernel[(T, H)](q, k_cache, bt, pos, seq, scores, scale, softcap or 1.0,
                           q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
                           k_cache.stride(2), bt.stride(0), G=H // KVH, BS=BS, D=D,
                           BLOCK_N=64, SOFTCAP=bool(softcap))
