"""Paged flash-decoding attention: every sequence has exactly one query token.

Stage 1 splits each context into up to ``num_splits`` partitions; one program takes one
(sequence, kv head, partition) and all the query heads of that kv head's GQA group, so each KV
tile is read from HBM once per group. A sequence's partition length is computed on the device
from its own length, ``max(min_partition, ceil(seq_len / num_splits))`` rounded up to a tile,
so short and long contexts both keep the programs busy under one fixed grid. Stage 2 merges the
partitions by log-sum-exp (skipped when num_splits == 1).

CUDA graphs: the grid is (num_seqs, num_kv_heads, num_splits), a function of tensor shapes and
the host int ``max_seq_len`` only (pass the model's max_model_len when capturing); programs
past a sequence's end return at once; a sequence of length 0 yields zeros.

fp8 caches (uint8, ``servelm.attention.kv_quant``'s layout: head rows of e4m3 bytes + an fp32
scale) go through kernels/kv_write.py's fp8 helpers: a tile's bytes convert exactly for the dots
(fp16 for q @ k^T, bf16 for p @ v in a bf16 model: see its docstring) and the per-key scales
apply to the columns of the scores and of p: in a bf16 model a byte costs a share of a 4-byte
load and a conversion, no multiply (sm_90 SASS of the loop, D=128: ~7.5 instructions per fp8
byte against ~2 per bf16 byte; rows of D + 4 bytes allow no wider loads).

Reference: ``servelm.attention.torch_ref.paged_attention_ref`` with all query lengths 1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from servelm.attention.kv_quant import FP8_KV_EXTRA
from servelm.kernels.kv_write import (fp8_dot_q, fp8_native_cvt, fp8_offsets_int64, fp8_pv,
                                      fp8_row_offsets, fp8_scale_ptr, fp8_scores)

_LOG2E = 1.4426950408889634
# the fp8 path's dot dtypes follow q's (kv_write.py's docstring)
_Q_DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@triton.jit
def _window_lo(seq_len, WINDOW: tl.constexpr):
    # first key the query (at seq_len - 1) sees: seq_len - WINDOW under a sliding window
    if WINDOW > 0:
        return tl.maximum(seq_len - WINDOW, 0)
    return seq_len * 0


@triton.jit
def softcap_log2(s, softcap):
    """Scores s in the log2 domain (raw * log2(e)) -> softcap * tanh(raw / softcap) in it
    (Gemma 2's logit soft-capping); tanh(x) = 1 - 2 / (exp(2x) + 1) saturates cleanly."""
    x = s * (2.0 / (1.4426950408889634 * softcap))
    t = 1.0 - 2.0 / (tl.exp(x) + 1.0)
    return t * (softcap * 1.4426950408889634)


@triton.jit
def _partition_len(seq_len, num_splits, min_part, BLOCK_N: tl.constexpr):
    # tokens per partition of this sequence: a multiple of BLOCK_N (min_part is one too)
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    return tl.maximum(per_split, min_part)


@triton.jit
def _decode_partition_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    scale_log2,
    stride_qb, stride_qh, stride_ob, stride_oh,
    stride_kc_blk, stride_kc_off, stride_kc_h,
    stride_vc_blk, stride_vc_off, stride_vc_h,
    stride_bt, max_parts, min_part, num_heads, group,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, SINGLE_PART: tl.constexpr, DOT_PREC: tl.constexpr,
    KV_FP8: tl.constexpr, Q_DT: tl.constexpr, OFF64: tl.constexpr,
    FP8_CVT: tl.constexpr, WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, softcap,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    # the keys the query sees, [lo, seq_len), split into partitions
    lo = _window_lo(seq_len, WINDOW)
    part_len = _partition_len(seq_len - lo, max_parts, min_part, BLOCK_N)
    start = lo + part * part_len
    if not SINGLE_PART:
        if start >= seq_len:
            return
    end = tl.minimum(start + part_len, seq_len)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D_PAD)
    d_mask = d < HEAD_DIM
    heads = kvh * group + g
    q_mask = (g < group)[:, None] & d_mask[None, :]
    b64 = b.to(tl.int64)
    # q: [GROUP_PAD, D_PAD], padded head rows are 0 (finite scores, never stored)
    q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=q_mask,
                other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    bt_row = block_tables_ptr + b64 * stride_bt
    k_base = k_cache_ptr + kvh * stride_kc_h
    v_base = v_cache_ptr + kvh * stride_vc_h
    if KV_FP8:  # q for the fp8 dots [GROUP_PAD, D_PAD]; the softmax scale undoes its scaling
        q_dot, q_down = fp8_dot_q(q, Q_DT)
        fp8_scale_log2 = scale_log2 * q_down
    for t0 in range(start, end, BLOCK_N):
        toks = t0 + tl.arange(0, BLOCK_N)
        t_mask = toks < end
        kv_mask = t_mask[:, None] & d_mask[None, :]
        if KV_FP8:
            # [BLOCK_N] byte offsets of the rows, for k and v alike (same strides); their e4m3
            # bytes [BLOCK_N, D_PAD] and scales [BLOCK_N]
            kv_row = fp8_row_offsets(toks, t_mask, bt_row, kvh * stride_kc_h, stride_kc_blk,
                                     stride_kc_off, BLOCK_SIZE, OFF64, True)
            k8 = tl.load(k_cache_ptr + kv_row[:, None] + d[None, :], mask=kv_mask, other=0)
            k_sc = tl.load(fp8_scale_ptr(k_cache_ptr + kv_row, HEAD_DIM), mask=t_mask, other=0.0)
            # s: [GROUP_PAD, BLOCK_N]
            s = fp8_scores(q_dot, k8, k_sc * fp8_scale_log2, DOT_PREC, FP8_CVT)
        else:
            blk = tl.load(bt_row + toks // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
            off = toks % BLOCK_SIZE
            # k, v: [BLOCK_N, D_PAD], gathered page by page
            k = tl.load(k_base + blk[:, None] * stride_kc_blk + off[:, None] * stride_kc_off
                        + d[None, :], mask=kv_mask, other=0.0)
            # s: [GROUP_PAD, BLOCK_N]
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
        if HAS_SOFTCAP:
            s = softcap_log2(s, softcap)
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if KV_FP8:
            v8 = tl.load(v_cache_ptr + kv_row[:, None] + d[None, :], mask=kv_mask, other=0)
            v_sc = tl.load(fp8_scale_ptr(v_cache_ptr + kv_row, HEAD_DIM), mask=t_mask, other=0.0)
            acc = acc * alpha[:, None] + fp8_pv(p, v8, v_sc, Q_DT, DOT_PREC, FP8_CVT)
        else:
            v = tl.load(v_base + blk[:, None] * stride_vc_blk + off[:, None] * stride_vc_off
                        + d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    if SINGLE_PART:
        # l_i == 0 only for an empty sequence: write zeros there
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + b64 * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        # partial results: [B, H, max_parts, D] unnormalised acc, [B, H, max_parts] m (log2) and l
        row = (b64 * num_heads + heads) * max_parts + part
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=q_mask)
        tl.store(part_m_ptr + row, m_i, mask=g < group)
        tl.store(part_l_ptr + row, l_i, mask=g < group)


@triton.jit
def _decode_reduce_kernel(
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, seq_lens_ptr,
    stride_ob, stride_oh, max_parts, min_part, num_heads,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    WINDOW: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    span = seq_len - _window_lo(seq_len, WINDOW)
    n_parts = tl.cdiv(span, _partition_len(span, max_parts, min_part, BLOCK_N))
    base = (b.to(tl.int64) * num_heads + h) * max_parts
    d = tl.arange(0, D_PAD)
    m_run = tl.max(tl.full([BLOCK_P], float("-inf"), tl.float32), 0)  # fp32 scalar
    den = tl.sum(tl.zeros([BLOCK_P], tl.float32), 0)
    acc = tl.zeros([D_PAD], tl.float32)
    # online merge over chunks of partitions; every chunk holds >= 1 valid partition
    for c in range(0, n_parts, BLOCK_P):
        pc = c + tl.arange(0, BLOCK_P)
        pm = pc < n_parts
        m_c = tl.load(part_m_ptr + base + pc, mask=pm, other=float("-inf"))
        l_c = tl.load(part_l_ptr + base + pc, mask=pm, other=0.0)
        o = tl.load(part_acc_ptr + (base + pc)[:, None] * HEAD_DIM + d[None, :],
                    mask=pm[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m_c, 0))
        alpha = tl.exp2(m_run - m_new)
        w = tl.exp2(m_c - m_new)
        den = den * alpha + tl.sum(l_c * w, 0)
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)
        m_run = m_new
    out = acc / tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + d,
             out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def pick_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int,
                block_n: int = 64) -> tuple[int, int]:
    """(num_splits, min_partition) from host ints only (graph-safe). From an H100 sweep
    (benchmarks/kernel_bench.py --sweep-decode): a few hundred busy programs stream the KV
    at near full bandwidth; partitions under 128 tokens, or many near-empty programs in large
    batches, cost more than they give; a context longer than 4096 tokens is split so that
    one long sequence in a batch of short ones does not run on a handful of SMs alone."""
    max_len = max(max_seq_len, 1)
    base = num_seqs * num_kv_heads
    min_part = max(block_n, 128 if base <= 512 else 512)
    splits = max(triton.cdiv(512, base), triton.cdiv(max_len, 4096))
    return max(1, min(splits, triton.cdiv(max_len, min_part))), min_part


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     max_seq_len: int, num_splits: int | None = None,
                     min_partition: int | None = None, block_n: int = 64,
                     num_warps: int | None = None, num_stages: int = 2,
                     out: torch.Tensor | None = None, window: int = 0,
                     softcap: float = 0.0) -> torch.Tensor:
    """q: [num_seqs, H, D]; caches: [num_blocks, block_size, KVH, D], or uint8
    [num_blocks, block_size, KVH, D + 4] for fp8 (kv_quant's layout); block_tables:
    [num_seqs, max_blocks] int32; seq_lens: [num_seqs] int32 (each <= max_seq_len; longer
    ones are still attended in full, with longer partitions). num_splits / min_partition
    override ``pick_splits``. window > 0: each query sees its last ``window`` keys only (the
    partitions cover those); softcap > 0: Gemma 2's score soft-capping. num_warps: 4, or 8 for fp8 caches with head_dim > 128 (4 spill
    registers there on sm_90). Returns [num_seqs, H, D] in q's dtype."""
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, row_len = k_cache.shape
    fp8 = k_cache.dtype == torch.uint8
    assert num_heads % num_kv_heads == 0 and q.stride(2) == 1 and k_cache.stride(3) == 1
    assert v_cache.stride(3) == 1 and block_tables.stride(1) == 1
    assert row_len == head_dim + (FP8_KV_EXTRA if fp8 else 0) and v_cache.dtype == k_cache.dtype
    # fp8: the scales stay 4-byte aligned; k and v rows share their offsets
    assert not fp8 or (head_dim % 4 == 0 and v_cache.stride() == k_cache.stride())
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    group_pad = max(16, triton.next_power_of_2(group))  # tl.dot needs M >= 16
    d_pad = max(16, triton.next_power_of_2(head_dim))
    num_warps = num_warps or (8 if fp8 and d_pad > 128 else 4)
    # a window bounds the keys any query reads
    span = min(max_seq_len, window) if window > 0 else max_seq_len
    splits, min_part = pick_splits(num_seqs, num_kv_heads, span, block_n)
    splits = num_splits or splits
    min_part = min_partition or min_part
    assert min_part % block_n == 0, "min_partition must be a multiple of block_n"
    single = splits == 1
    if single:
        part_acc = part_m = part_l = out  # unused
    else:
        part_acc = torch.empty(num_seqs, num_heads, splits, head_dim, dtype=torch.float32,
                               device=q.device)
        part_m = torch.empty(num_seqs, num_heads, splits, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
    _decode_partition_kernel[(num_seqs, num_kv_heads, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_acc, part_m, part_l,
        scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), splits, min_part, num_heads, group,
        GROUP_PAD=group_pad, HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_SIZE=block_size,
        BLOCK_N=block_n, SINGLE_PART=single, DOT_PREC=dot_prec,
        KV_FP8=fp8, Q_DT=_Q_DT.get(q.dtype, "fp32"), OFF64=fp8 and fp8_offsets_int64(k_cache),
        FP8_CVT=not fp8 or fp8_native_cvt(q.device),
        WINDOW=max(window, 0), HAS_SOFTCAP=softcap > 0, softcap=float(softcap or 1.0),
        num_warps=num_warps, num_stages=num_stages,
    )
    if not single:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            out, part_acc, part_m, part_l, seq_lens, out.stride(0), out.stride(1), splits,
            min_part, num_heads, HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_N=block_n, BLOCK_P=16,
            WINDOW=max(window, 0), num_warps=4,
        )
    return out
