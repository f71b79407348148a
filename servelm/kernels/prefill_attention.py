"""Paged causal flash attention for ragged batches (chunked prefill, prefix hits, decode rows).

Sequence ``s`` owns query rows ``query_start_loc[s]:query_start_loc[s+1]``: the last query_len of
its ``seq_lens[s]`` context tokens, all of which (new ones too) are already in the paged cache.
One program takes BLOCK_Q query tokens of one sequence times the GROUP query heads of one kv
head (BLOCK_M = BLOCK_Q * GROUP_PAD rows), so each K/V tile read serves the whole GQA group.

The grid is (num_tokens // BLOCK_Q + num_seqs, num_kv_heads): a function of shapes only. Each
program finds its sequence by binary search over ``query_start_loc`` on the device (no host
sync; CUDA-graph capturable); surplus programs return at once.

fp8 caches (uint8, ``servelm.attention.kv_quant``'s layout) are read as in
kernels/decode_attention.py, with kernels/kv_write.py's fp8 helpers: e4m3 bytes converted exactly
for the dots (dtypes in kv_write.py's docstring), the per-key scales applied to the columns of
the scores and of p.

Reference: ``servelm.attention.torch_ref.paged_attention_ref``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from servelm.attention.kv_quant import FP8_KV_EXTRA
from servelm.kernels.decode_attention import softcap_log2
from servelm.kernels.kv_write import (fp8_dot_q, fp8_native_cvt, fp8_offsets_int64, fp8_pv,
                                      fp8_row_offsets, fp8_scale_ptr, fp8_scores)

_LOG2E = 1.4426950408889634
# the fp8 path's dot dtypes follow q's (kv_write.py's docstring)
_Q_DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@triton.jit
def _find_seq(query_start_loc_ptr, num_seqs, pid, BLOCK_Q: tl.constexpr):
    # largest s with query_start_loc[s] // BLOCK_Q + s <= pid (sequence s's first tile index)
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_tile <= pid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _tile_update(q, k_base, v_base, bt_row, start, pos, seq_len, m_i, l_i, acc, scale_log2,
                 d, d_mask, stride_k_blk, stride_k_off, stride_v_blk, stride_v_off,
                 tree_bits, tree_start, head_off, softcap,
                 BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                 DOT_PREC: tl.constexpr, TREE: tl.constexpr, HEAD_DIM: tl.constexpr,
                 KV_FP8: tl.constexpr, Q_DT: tl.constexpr, OFF64: tl.constexpr,
                 FP8_CVT: tl.constexpr, WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    # WINDOW > 0 (masked tiles): a row at position p sees keys > p - WINDOW only; a row may
    # then see none of a tile, so the running max is guarded against -inf - -inf
    # KV_FP8: k_base, v_base are the caches themselves, head_off the kv head's byte offset in
    # a token's rows; q is fp8_dot_q's and scale_log2 includes its factor. Else k_base, v_base
    # point at the kv head's rows.
    toks = start + tl.arange(0, BLOCK_N)
    if KV_FP8:
        if MASKED:
            t_mask = toks < seq_len
            kv_mask = t_mask[:, None] & d_mask[None, :]
        else:
            t_mask = None
            kv_mask = d_mask[None, :]
        # [BLOCK_N] byte offsets of the rows, for k and v alike (same strides); their e4m3
        # bytes [BLOCK_N, D_PAD] and scales [BLOCK_N]
        kv_row = fp8_row_offsets(toks, t_mask, bt_row, head_off, stride_k_blk, stride_k_off,
                                 BLOCK_SIZE, OFF64, MASKED)
        k8 = tl.load(k_base + kv_row[:, None] + d[None, :], mask=kv_mask, other=0)
        if MASKED:
            k_sc = tl.load(fp8_scale_ptr(k_base + kv_row, HEAD_DIM), mask=t_mask, other=0.0)
        else:
            k_sc = tl.load(fp8_scale_ptr(k_base + kv_row, HEAD_DIM))
        s = fp8_scores(q, k8, k_sc * scale_log2, DOT_PREC, FP8_CVT)  # [BLOCK_M, BLOCK_N]
    else:
        if MASKED:
            t_mask = toks < seq_len
            blk = tl.load(bt_row + toks // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
            kv_mask = t_mask[:, None] & d_mask[None, :]
        else:
            blk = tl.load(bt_row + toks // BLOCK_SIZE).to(tl.int64)
            kv_mask = d_mask[None, :]
        off = toks % BLOCK_SIZE
        # k, v: [BLOCK_N, D_PAD]
        k = tl.load(k_base + blk[:, None] * stride_k_blk + off[:, None] * stride_k_off
                    + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2  # [BLOCK_M, BLOCK_N]
    if HAS_SOFTCAP:
        s = softcap_log2(s, softcap)
    if MASKED:
        ok = (toks[None, :] <= pos[:, None]) & t_mask[None, :]
        if WINDOW > 0:
            ok = ok & (toks[None, :] > pos[:, None] - WINDOW)
        if TREE:
            # keys at or past the tree's start: only the row's ancestors (and itself), bit
            # (key - tree_start) of its mask
            rel = toks - tree_start
            in_tree = rel >= 0
            shift = tl.minimum(tl.where(in_tree, rel, 0), 63).to(tl.int64)
            anc = ((tree_bits[:, None] >> shift[None, :]) & 1) != 0
            ok = ok & (~in_tree[None, :] | anc)
        s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if WINDOW > 0 and MASKED:  # rows with no visible key yet: keep l, acc at 0, no NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
    else:
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if KV_FP8:
        v8 = tl.load(v_base + kv_row[:, None] + d[None, :], mask=kv_mask, other=0)
        if MASKED:
            v_sc = tl.load(fp8_scale_ptr(v_base + kv_row, HEAD_DIM), mask=t_mask, other=0.0)
        else:
            v_sc = tl.load(fp8_scale_ptr(v_base + kv_row, HEAD_DIM))
        acc = acc * alpha[:, None] + fp8_pv(p, v8, v_sc, Q_DT, DOT_PREC, FP8_CVT)
    else:
        v = tl.load(v_base + blk[:, None] * stride_v_blk + off[:, None] * stride_v_off
                    + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    out_ptr, tree_mask_ptr, tree_start_ptr, scale_log2, num_seqs, group,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kc_blk, stride_kc_off, stride_kc_h,
    stride_vc_blk, stride_vc_off, stride_vc_h,
    stride_bt,
    GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, TREE: tl.constexpr,
    KV_FP8: tl.constexpr, Q_DT: tl.constexpr, OFF64: tl.constexpr,
    FP8_CVT: tl.constexpr, WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, softcap,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    s_idx = _find_seq(query_start_loc_ptr, num_seqs, pid, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + s_idx)
    q_len = tl.load(query_start_loc_ptr + s_idx + 1) - q_start
    tile = pid - (q_start // BLOCK_Q + s_idx)
    if tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + s_idx)
    ctx = seq_len - q_len  # cached tokens before the first query

    # rows: m = query token (m // GROUP_PAD) x head in group (m % GROUP_PAD); group <= GROUP_PAD
    m = tl.arange(0, BLOCK_M)
    qi = tile * BLOCK_Q + m // GROUP_PAD
    g = m % GROUP_PAD
    row_mask = (qi < q_len) & (g < group)
    head = kvh * group + g
    d = tl.arange(0, D_PAD)
    d_mask = d < HEAD_DIM
    tok = (q_start + qi).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, D_PAD]
    pos = ctx + qi  # absolute position of each row (padding rows lie past the end: finite)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    bt_row = block_tables_ptr + s_idx.to(tl.int64) * stride_bt
    if KV_FP8:
        # q for the fp8 dots [BLOCK_M, D_PAD], the softmax scale undoing its scaling; the head's
        # offset joins each tile's row offsets (see _tile_update)
        q, q_down = fp8_dot_q(q, Q_DT)
        scale_log2 = scale_log2 * q_down
        k_base = k_cache_ptr
        v_base = v_cache_ptr
        head_off = kvh * stride_kc_h
    else:
        k_base = k_cache_ptr + kvh * stride_kc_h
        v_base = v_cache_ptr + kvh * stride_vc_h
        head_off = 0
    first_pos = ctx + tile * BLOCK_Q
    # keys < full_end are visible to every row of the tile (and < seq_len): no mask needed
    full_end = (first_pos + 1) // BLOCK_N * BLOCK_N
    kv_end = tl.minimum(seq_len, first_pos + BLOCK_Q)
    if TREE:  # token tree: keys from the tree's start on are masked per row
        tree_start = tl.load(tree_start_ptr + s_idx)
        tree_bits = tl.load(tree_mask_ptr + tok, mask=row_mask, other=0)
        full_end = tl.minimum(full_end, tree_start // BLOCK_N * BLOCK_N)
    else:
        tree_start = seq_len
        tree_bits = tl.zeros([BLOCK_M], tl.int64)
    # a sliding window: keys before the tile's first row's window are nobody's; those before
    # its last row's window are some rows' only (masked); the rest up to full_end everyone's
    win_lo = 0
    win_full = 0
    if WINDOW > 0:
        last_pos = ctx + tl.minimum(tile * BLOCK_Q + BLOCK_Q, q_len) - 1
        win_lo = tl.maximum(first_pos - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
        win_full = tl.minimum(tl.cdiv(tl.maximum(last_pos - WINDOW + 1, 0), BLOCK_N) * BLOCK_N,
                              full_end)
        for start in range(win_lo, win_full, BLOCK_N):
            m_i, l_i, acc = _tile_update(q, k_base, v_base, bt_row, start, pos, seq_len, m_i,
                                         l_i, acc, scale_log2, d, d_mask, stride_kc_blk,
                                         stride_kc_off, stride_vc_blk, stride_vc_off, tree_bits,
                                         tree_start, head_off, softcap, BLOCK_SIZE, BLOCK_N,
                                         True, DOT_PREC, TREE, HEAD_DIM, KV_FP8, Q_DT, OFF64,
                                         FP8_CVT, WINDOW, HAS_SOFTCAP)
    for start in range(win_full, full_end, BLOCK_N):
        m_i, l_i, acc = _tile_update(q, k_base, v_base, bt_row, start, pos, seq_len, m_i, l_i, acc,
                                     scale_log2, d, d_mask, stride_kc_blk, stride_kc_off,
                                     stride_vc_blk, stride_vc_off, tree_bits, tree_start,
                                     head_off, softcap, BLOCK_SIZE, BLOCK_N, False, DOT_PREC,
                                     TREE, HEAD_DIM, KV_FP8, Q_DT, OFF64, FP8_CVT, WINDOW,
                                     HAS_SOFTCAP)
    # the first masked tile starts at full_end <= every row's position: no row is all -inf
    # (a tree row sees itself and everything before the tree)
    for start in range(tl.maximum(full_end, win_full), kv_end, BLOCK_N):
        m_i, l_i, acc = _tile_update(q, k_base, v_base, bt_row, start, pos, seq_len, m_i, l_i, acc,
                                     scale_log2, d, d_mask, stride_kc_blk, stride_kc_off,
                                     stride_vc_blk, stride_vc_off, tree_bits, tree_start,
                                     head_off, softcap, BLOCK_SIZE, BLOCK_N, True, DOT_PREC,
                                     TREE, HEAD_DIM, KV_FP8, Q_DT, OFF64, FP8_CVT, WINDOW,
                                     HAS_SOFTCAP)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def _config(head_dim_pad: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for H100-sized shared memory."""
    if dtype == torch.float32:
        return (64, 32, 4, 2) if head_dim_pad <= 128 else (32, 32, 4, 1)
    if head_dim_pad <= 128:
        # H100 sweep, D=128: within 6% of the best of 6 configs on every case, best on mixed
        # chunked batches (prefill rows + decode rows)
        return 64, 64, 4, 3
    return 64, 32, 8, 2


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, seq_lens: torch.Tensor,
                      query_start_loc: torch.Tensor, scale: float,
                      config: tuple[int, int, int, int] | None = None,
                      out: torch.Tensor | None = None, tree_mask: torch.Tensor | None = None,
                      tree_start: torch.Tensor | None = None, window: int = 0,
                      softcap: float = 0.0) -> torch.Tensor:
    """q: [num_tokens, H, D]; caches: [num_blocks, block_size, KVH, D], or uint8
    [num_blocks, block_size, KVH, D + 4] for fp8 (kv_quant's layout); block_tables:
    [num_seqs, max_blocks] int32; seq_lens: [num_seqs] int32; query_start_loc: [num_seqs+1]
    int32. Any query lengths (0 included). Returns [num_tokens, H, D] in q's dtype.

    Token trees (speculative verification of several branches): tree_mask [num_tokens] int64
    and tree_start [num_seqs] int32 restrict each query to the keys before its sequence's
    tree_start plus the tree positions tree_start + j whose bit j its mask sets (its
    ancestors and itself; at most 64 tree positions). Sequences without a tree: tree_start
    >= their seq_len. window > 0: a query at position p sees keys p - window + 1 .. p only;
    softcap > 0: Gemma 2's score soft-capping."""
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, row_len = k_cache.shape
    fp8 = k_cache.dtype == torch.uint8
    assert num_heads % num_kv_heads == 0 and q.stride(2) == 1 and k_cache.stride(3) == 1
    assert v_cache.stride(3) == 1 and block_tables.stride(1) == 1
    assert row_len == head_dim + (FP8_KV_EXTRA if fp8 else 0) and v_cache.dtype == k_cache.dtype
    # fp8: the scales stay 4-byte aligned; k and v rows share their offsets
    assert not fp8 or (head_dim % 4 == 0 and v_cache.stride() == k_cache.stride())
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    d_pad = max(16, triton.next_power_of_2(head_dim))
    block_m, block_n, num_warps, num_stages = config or _config(d_pad, q.dtype)
    block_m = max(block_m, group_pad, 16)
    block_q = block_m // group_pad
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    tree = tree_mask is not None
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out,
        tree_mask if tree else seq_lens, tree_start if tree else seq_lens,
        scale * _LOG2E, num_seqs, group,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        GROUP_PAD=group_pad, BLOCK_Q=block_q, HEAD_DIM=head_dim, D_PAD=d_pad,
        BLOCK_SIZE=block_size, BLOCK_N=block_n,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", TREE=tree,
        KV_FP8=fp8, Q_DT=_Q_DT.get(q.dtype, "fp32"), OFF64=fp8 and fp8_offsets_int64(k_cache),
        FP8_CVT=not fp8 or fp8_native_cvt(q.device),
        WINDOW=max(window, 0), HAS_SOFTCAP=softcap > 0, softcap=float(softcap or 1.0),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
