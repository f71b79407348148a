"""Store this step's k and v into the paged KV cache, both in one launch.

Reference: ``servelm.attention.torch_ref.write_kv_ref`` (which has no skip rule: callers of the
reference pass only valid slots).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kc_blk, stride_kc_off, stride_kc_h,
    stride_vc_blk, stride_vc_off, stride_vc_h,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program per (token, chunk of BLOCK_H kv heads)
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padding token of a CUDA-graph batch
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < NUM_KV_HEADS) & (d[None, :] < HEAD_DIM)
    t64 = t.to(tl.int64)
    k = tl.load(k_ptr + t64 * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + t64 * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    kc = k_cache_ptr + blk * stride_kc_blk + off * stride_kc_off
    vc = v_cache_ptr + blk * stride_vc_blk + off * stride_vc_off
    tl.store(kc + h[:, None] * stride_kc_h + d[None, :], k.to(k_cache_ptr.dtype.element_ty),
             mask=mask)
    tl.store(vc + h[:, None] * stride_vc_h + d[None, :], v.to(v_cache_ptr.dtype.element_ty),
             mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: [num_tokens, KVH, D] (last dim contiguous; may be views into a fused qkv output).
    k_cache, v_cache: [num_blocks, block_size, KVH, D] (last dim contiguous).
    slot_mapping: [num_tokens] int32/int64; an entry < 0 skips that token (graph padding)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert k.stride(2) == 1 and v.stride(2) == 1, "k/v last dim must be contiguous"
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    assert v.shape == k.shape and k_cache.shape[2:] == (num_kv_heads, head_dim)
    block_d = triton.next_power_of_2(head_dim)
    # about 4k elements per program: all heads of a token for Llama-sized shapes
    block_h = max(1, min(triton.next_power_of_2(num_kv_heads), 4096 // block_d))
    grid = (num_tokens, triton.cdiv(num_kv_heads, block_h))
    _write_kv_kernel[grid](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
    )
