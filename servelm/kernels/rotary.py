"""Rotary position embedding, NeoX / Hugging Face style (rotate_half over the two halves of the
head dim; rotary dim == head dim), applied in place to q and k.

Numerics match HF's ``apply_rotary_pos_emb`` exactly: cos/sin (fp32 in the cache) are cast to
the activation dtype, then ``q * cos`` and ``rotate_half(q) * sin`` each round to that dtype,
and so does their sum (the launch disables fma contraction, which would skip a rounding). For
fp32 activations this is plain fp32 arithmetic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def rotary_embedding_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                         cos_sin_cache: torch.Tensor) -> None:
    """positions: [T] int64; q: [T, H, D]; k: [T, KVH, D]; cos_sin_cache: [max_pos, D] fp32
    (cos of the D/2 frequencies, then their sin). In place, like HF."""
    half = q.shape[-1] // 2
    cs = cos_sin_cache[positions]  # [T, D]
    cos = torch.cat([cs[:, :half], cs[:, :half]], -1)[:, None, :]  # [T, 1, D]
    sin = torch.cat([cs[:, half:], cs[:, half:]], -1)[:, None, :]
    for x in (q, k):
        c, s = cos.to(x.dtype), sin.to(x.dtype)
        rot = torch.cat([-x[..., half:], x[..., :half]], -1)
        x.copy_(x * c + rot * s)


@triton.jit
def rotate_halves(x1, x2, c, s):
    """x1, x2: [BLOCK_H, HALF_PAD] tiles (first, second half of each head) in the activation
    dtype; c, s: [1, HALF_PAD] fp32 cos/sin -> the rotated halves in that dtype. Shared with the
    fused rotary + KV-write kernel (kernels/rotary_kv.py), so both round identically; launch
    with enable_fp_fusion=False."""
    dt = x1.dtype
    c = c.to(dt).to(tl.float32)
    s = s.to(dt).to(tl.float32)
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    # each product rounds to the activation dtype, then the sum does (as HF in bf16)
    o1 = (a * c).to(dt).to(tl.float32) - (b * s).to(dt).to(tl.float32)
    o2 = (b * c).to(dt).to(tl.float32) + (a * s).to(dt).to(tl.float32)
    return o1.to(dt), o2.to(dt)


@triton.jit
def _rope_one(x_ptr, stride_t, stride_h, t, cos, sin, NUM_H: tl.constexpr, HALF: tl.constexpr,
              BLOCK_H: tl.constexpr, HALF_PAD: tl.constexpr):
    d = tl.arange(0, HALF_PAD)
    for h0 in range(0, NUM_H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (h < NUM_H)[:, None] & (d < HALF)[None, :]
        p1 = x_ptr + t * stride_t + h[:, None] * stride_h + d[None, :]
        o1, o2 = rotate_halves(tl.load(p1, mask=mask, other=0.0),
                               tl.load(p1 + HALF, mask=mask, other=0.0),
                               cos[None, :], sin[None, :])
        tl.store(p1, o1, mask=mask)
        tl.store(p1 + HALF, o2, mask=mask)


@triton.jit
def _rotary_kernel(pos_ptr, q_ptr, k_ptr, cache_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_c, NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr,
                   HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, HALF_PAD)
    cos = tl.load(cache_ptr + pos * stride_c + d, mask=d < HALF, other=0.0)
    sin = tl.load(cache_ptr + pos * stride_c + HALF + d, mask=d < HALF, other=0.0)
    _rope_one(q_ptr, stride_qt, stride_qh, t, cos, sin, NUM_Q_HEADS, HALF, BLOCK_H, HALF_PAD)
    _rope_one(k_ptr, stride_kt, stride_kh, t, cos, sin, NUM_K_HEADS, HALF, BLOCK_H, HALF_PAD)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> None:
    """positions: [T] int; q: [T, H, D]; k: [T, KVH, D] (last dims contiguous, may be views of a
    fused qkv tensor); cos_sin_cache: [max_pos, D] fp32. Rotates q and k in place."""
    num_tokens, num_heads, head_dim = q.shape
    assert head_dim % 2 == 0 and q.stride(2) == 1 and k.stride(2) == 1
    assert cos_sin_cache.shape[1] == head_dim and cos_sin_cache.stride(1) == 1
    if num_tokens == 0:
        return
    half = head_dim // 2
    half_pad = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(max(num_heads, k.shape[1])), 4096 // half_pad))
    _rotary_kernel[(num_tokens,)](
        positions, q, k, cos_sin_cache, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        cos_sin_cache.stride(0), NUM_Q_HEADS=num_heads, NUM_K_HEADS=k.shape[1], HALF=half,
        HALF_PAD=half_pad, BLOCK_H=block_h, num_warps=4,
        # without this the compiler folds round(a*c) - round(b*s) into one fp16/bf16 fma
        enable_fp_fusion=False)
