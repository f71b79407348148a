"""Rotary embedding fused with the paged KV-cache write: one launch rotates q and k in place
(as kernels/rotary.py) and stores the rotated k and v at ``slot_mapping`` (as kernels/kv_write.py).

Unfused, a decode step per layer runs the rotary kernel, then the KV write re-reads k and v; here
the program that rotates k writes the result to both k and its cache slot, and v goes straight to
the cache. The rotation is ``rotary.rotate_halves``, so q, k and the cache hold the same bits as
the unfused pair. Grid: (num_tokens, 3) programs (q; k; v) so that a single decode token still
spreads its three loads over three SMs; a token with slot < 0 (CUDA-graph padding) is rotated
but not stored. Shapes depend on num_tokens only: capturable in a CUDA graph.

A uint8 cache is the fp8 layout of ``servelm.attention.kv_quant``: the rotated k (in k's dtype,
as the unfused pair stores it) and v are quantized per head row (kernels/kv_write.py's helpers).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from servelm.attention.kv_quant import FP8_KV_EXTRA, is_fp8_kv, quantize_kv_rows
from servelm.kernels.kv_write import fp8_encode, fp8_row_scale, fp8_scale_ptr
from servelm.kernels.rotary import _rope_one, rotary_embedding_ref, rotate_halves


def rotary_write_kv_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, cos_sin_cache: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """positions: [T]; q: [T, H, D]; k, v: [T, KVH, D]; cos_sin_cache: [max_pos, D] fp32;
    caches: [num_blocks, block_size, KVH, D] (or uint8 [..., D + 4]: fp8 rows, quantized);
    slot_mapping: [T], < 0 skips the token.
    Rotates q and k in place, then stores the rotated k and v at their slots."""
    rotary_embedding_ref(positions, q, k, cos_sin_cache)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    for x, cache in ((k, k_cache), (v, v_cache)):
        rows = quantize_kv_rows(x[keep]) if is_fp8_kv(cache) else x[keep].to(cache.dtype)
        cache.view(-1, *cache.shape[2:])[slots] = rows


@triton.jit
def _store_fp8_halves(row_ptr, c1, x1, x2, mask, row_mask, HALF: tl.constexpr):
    """One fp8 row per head from its two halves. row_ptr: [BLOCK_KVH] row starts; c1:
    [BLOCK_KVH, HALF_PAD] pointers to the first half's bytes; x1, x2: the halves' values;
    mask: [BLOCK_KVH, HALF_PAD] valid entries; row_mask: [BLOCK_KVH] rows to store."""
    a1 = tl.where(mask, x1.to(tl.float32), 0.0)
    a2 = tl.where(mask, x2.to(tl.float32), 0.0)
    scale = fp8_row_scale(tl.maximum(tl.max(tl.abs(a1), 1), tl.max(tl.abs(a2), 1)))  # [BLOCK_KVH]
    tl.store(c1, fp8_encode(a1, scale[:, None]), mask=mask)
    tl.store(c1 + HALF, fp8_encode(a2, scale[:, None]), mask=mask)
    tl.store(fp8_scale_ptr(row_ptr, 2 * HALF), scale, mask=row_mask)


@triton.jit
def _rotary_kv_kernel(
    pos_ptr, q_ptr, k_ptr, v_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_c,
    stride_kc_blk, stride_kc_off, stride_kc_h, stride_vc_blk, stride_vc_off, stride_vc_h,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    HALF_PAD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KVH: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, KV_FP8: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    role = tl.program_id(1)  # 0: rotate q; 1: rotate k, store it to k and its slot; 2: store v
    d = tl.arange(0, HALF_PAD)
    dmask = d < HALF
    if role == 0:
        pos = tl.load(pos_ptr + t).to(tl.int64)
        cos = tl.load(cos_sin_ptr + pos * stride_c + d, mask=dmask, other=0.0)
        sin = tl.load(cos_sin_ptr + pos * stride_c + HALF + d, mask=dmask, other=0.0)
        _rope_one(q_ptr, stride_qt, stride_qh, t, cos, sin, NUM_Q_HEADS, HALF, BLOCK_H, HALF_PAD)
    else:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        keep = slot >= 0
        blk = tl.maximum(slot, 0) // BLOCK_SIZE
        off = tl.maximum(slot, 0) % BLOCK_SIZE
        h = tl.arange(0, BLOCK_KVH)
        if role == 1:
            pos = tl.load(pos_ptr + t).to(tl.int64)
            cos = tl.load(cos_sin_ptr + pos * stride_c + d, mask=dmask, other=0.0)
            sin = tl.load(cos_sin_ptr + pos * stride_c + HALF + d, mask=dmask, other=0.0)
            kc = k_cache_ptr + blk * stride_kc_blk + off * stride_kc_off
            for h0 in range(0, NUM_KV_HEADS, BLOCK_KVH):
                hh = h0 + h
                mask = (hh < NUM_KV_HEADS)[:, None] & dmask[None, :]
                # p1, c1: [BLOCK_KVH, HALF_PAD] first halves in k and in the cache slot
                p1 = k_ptr + t * stride_kt + hh[:, None] * stride_kh + d[None, :]
                c1 = kc + hh[:, None] * stride_kc_h + d[None, :]
                o1, o2 = rotate_halves(tl.load(p1, mask=mask, other=0.0),
                                       tl.load(p1 + HALF, mask=mask, other=0.0),
                                       cos[None, :], sin[None, :])
                tl.store(p1, o1, mask=mask)
                tl.store(p1 + HALF, o2, mask=mask)
                if KV_FP8:
                    _store_fp8_halves(kc + hh * stride_kc_h, c1, o1, o2, mask & keep,
                                      (hh < NUM_KV_HEADS) & keep, HALF)
                else:
                    cdt = k_cache_ptr.dtype.element_ty
                    tl.store(c1, o1.to(cdt), mask=mask & keep)
                    tl.store(c1 + HALF, o2.to(cdt), mask=mask & keep)
        else:
            vc = v_cache_ptr + blk * stride_vc_blk + off * stride_vc_off
            for h0 in range(0, NUM_KV_HEADS, BLOCK_KVH):
                hh = h0 + h
                mask = (hh < NUM_KV_HEADS)[:, None] & dmask[None, :] & keep
                # the two halves of each v head: [BLOCK_KVH, HALF_PAD] each
                p1 = v_ptr + t * stride_vt + hh[:, None] * stride_vh + d[None, :]
                c1 = vc + hh[:, None] * stride_vc_h + d[None, :]
                if KV_FP8:
                    _store_fp8_halves(vc + hh * stride_vc_h, c1, tl.load(p1, mask=mask),
                                      tl.load(p1 + HALF, mask=mask), mask,
                                      (hh < NUM_KV_HEADS) & keep, HALF)
                else:
                    cdt = v_cache_ptr.dtype.element_ty
                    tl.store(c1, tl.load(p1, mask=mask).to(cdt), mask=mask)
                    tl.store(c1 + HALF, tl.load(p1 + HALF, mask=mask).to(cdt), mask=mask)


def rotary_write_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """positions: [T] int; q: [T, H, D]; k, v: [T, KVH, D] (last dims contiguous; may be views
    of a fused qkv output); cos_sin_cache: [max_pos, D] fp32 (cos | sin); caches:
    [num_blocks, block_size, KVH, D] (last dim contiguous), or uint8 [..., D + 4] for fp8
    (kv_quant's layout: quantized here); slot_mapping: [T] int, < 0 skips the token. Rotates
    q and k in place and stores the rotated k and v into the caches."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert head_dim % 2 == 0 and k.shape == v.shape == (num_tokens, num_kv_heads, head_dim)
    assert q.stride(2) == 1 and k.stride(2) == 1 and v.stride(2) == 1
    assert cos_sin_cache.shape[1] == head_dim and cos_sin_cache.stride(1) == 1
    fp8 = is_fp8_kv(k_cache)
    assert k_cache.shape[2:] == (num_kv_heads, head_dim + (FP8_KV_EXTRA if fp8 else 0))
    assert v_cache.shape == k_cache.shape and v_cache.dtype == k_cache.dtype
    assert not fp8 or head_dim % 4 == 0, "fp8 rows keep their fp32 scale 4-byte aligned"
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    if num_tokens == 0:
        return
    half = head_dim // 2
    half_pad = triton.next_power_of_2(half)
    # about 2 x 4k elements per tile, as kernels/rotary.py: all heads of a token at Llama sizes
    block_h = max(1, min(triton.next_power_of_2(num_heads), 4096 // half_pad))
    block_kvh = max(1, min(triton.next_power_of_2(num_kv_heads), 4096 // half_pad))
    _rotary_kv_kernel[(num_tokens, 3)](
        positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_sin_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_Q_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HALF=half, HALF_PAD=half_pad,
        BLOCK_H=block_h, BLOCK_KVH=block_kvh, BLOCK_SIZE=k_cache.shape[1], KV_FP8=fp8,
        num_warps=4,
        # as kernels/rotary.py: no fma contraction, which would skip a rounding
        enable_fp_fusion=False)
