"""Store this step's k and v into the paged KV cache, both in one launch; and the fp8 (e4m3 with
inline scales) helpers the other KV kernels share.

A uint8 cache is the fp8 layout of ``servelm.attention.kv_quant``: each head row is head_dim
e4m3 bytes and a float32 scale. The write computes the row's amax, the scale (a correctly
rounded division, as the reference) and the e4m3 bytes. The conversion of fp32 to e4m3 is
arithmetic on the bits: Triton's interpreter rounds fp32 -> float8e4nv wrongly (a carry into the
exponent is lost), and the same code must run there and on CUDA.

The attention kernels (decode_attention.py, prefill_attention.py) read fp8 rows with the
helpers below. e4m3 converts exactly to fp16 (one cvt per 2 bytes on sm_89+, bit arithmetic
on sm_80; to bf16 takes one more per byte), so q @ k^T runs in fp16 for bf16 and fp16 models
alike, q scaled by a power of two into fp16's range, each key's scale applied to its column of
the scores. p @ v runs in bf16 for bf16 models, each value row's scale folded into p's column
(bf16 has fp32's range: p * scale cannot flush); fp16 models dequantize v (in fp16, p * scale
could flush). fp32 models run both in fp32. A tile's rows share one offset computation for k
and v (the caches have equal strides), in int32 unless the cache holds 2^31 bytes or more.

Reference: ``servelm.attention.torch_ref.write_kv_ref`` (which has no skip rule: callers of the
reference pass only valid slots) and ``kv_quant.quantize_kv_rows`` for the bytes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from servelm.attention.kv_quant import FP8_E4M3_MAX, FP8_KV_EXTRA, FP8_KV_TINY

_TINY = tl.constexpr(FP8_KV_TINY)
_E4M3_MAX = tl.constexpr(FP8_E4M3_MAX)


def fp8_offsets_int64(cache: torch.Tensor) -> bool:
    """Whether byte offsets into an fp8 cache need int64 (OFF64 of the attention kernels)."""
    return cache.numel() >= 2 ** 31


def fp8_native_cvt(device: torch.device) -> bool:
    """Whether Triton converts e4m3 natively there (FP8_CVT of the attention kernels): CUDA
    sm_89+ and the interpreter; sm_80 (A100) lacks tl.float8e4nv and decodes the bits."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)


@triton.jit
def fp8_row_scale(amax):
    """amax: fp32 row maxima of |x| -> their scales max(amax, tiny) / 448 (correctly rounded)."""
    return tl.math.div_rn(tl.maximum(amax, _TINY), _E4M3_MAX)


@triton.jit
def fp8_encode(x, scale):
    """x: fp32 values, scale: fp32 (broadcast to x) -> e4m3fn bit patterns (uint8) of x / scale
    clamped to +-448, rounded to nearest even: ``torch.float8_e4m3fn``'s bytes exactly."""
    y = tl.math.div_rn(x, scale)
    y = tl.minimum(tl.maximum(y, -_E4M3_MAX), _E4M3_MAX)
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = bits & 0x7FFFFFFF  # |y| as fp32 bits
    # |y| >= 2^-6, e4m3 normals: keep 3 mantissa bits rounding to nearest even (a carry moves
    # into the exponent), then rebias the exponent 127 -> 7 (120 << 3 in the shifted bits)
    normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - 960
    # |y| < 2^-6, subnormals in steps of 2^-9: round-to-nearest-even of m * 2^(e - 141), m the
    # 24-bit mantissa with its implicit bit, e the biased exponent (a shift of 21..31: 0..8)
    shift = tl.minimum(tl.maximum(141 - (a >> 23), 21), 31)
    m = (a & 0x7FFFFF) | 0x800000
    half = (m * 0 + 1) << (shift - 1)  # 2^(shift-1), as a tensor of m's shape
    sub = (m + half - 1 + ((m >> shift) & 1)) >> shift
    return (sign | tl.where(a >= 0x3C800000, normal, sub)).to(tl.uint8)


@triton.jit
def fp8_decode(x8, dtype: tl.constexpr, CVT: tl.constexpr):
    """e4m3 bytes (uint8) -> their values in dtype (exact for fp16, bf16 and fp32). CVT: by
    tl.float8e4nv (sm_89+: one cvt per 2 bytes); else from the bits (sm_80): sign, exponent and
    mantissa moved into fp16's fields give value * 2^-8 exactly (e4m3 subnormals land on fp16
    subnormals), then * 2^8 in fp32."""
    if CVT:
        return x8.to(tl.float8e4nv, bitcast=True).to(dtype)
    h = x8.to(tl.int16)
    f = (((h & 0x80) << 8) | ((h & 0x7F) << 7)).to(tl.float16, bitcast=True)
    return (f.to(tl.float32) * 256.0).to(dtype)


@triton.jit
def fp8_scale_ptr(row_ptr, HEAD_DIM: tl.constexpr):
    """Pointer(s) to the fp32 scale behind head rows starting at row_ptr (4-byte aligned)."""
    return (row_ptr + HEAD_DIM).to(tl.pointer_type(tl.float32))


@triton.jit
def fp8_row_offsets(toks, t_mask, bt_row, head_off, stride_blk, stride_off,
                    BLOCK_SIZE: tl.constexpr, OFF64: tl.constexpr, MASKED: tl.constexpr):
    """[BLOCK_N] byte offsets of one kv head's fp8 rows of the tokens at positions toks (pages
    from the block-table row bt_row; t_mask: the valid ones, when MASKED). Multiples of 4
    (rows of head_dim + 4 bytes, head_dim % 4 == 0): the loads then move 4 bytes at a time."""
    ut = toks.to(tl.uint32)  # positions are >= 0: unsigned // and % are shifts and masks
    if MASKED:
        blk = tl.load(bt_row + ut // BLOCK_SIZE, mask=t_mask, other=0)
    else:
        blk = tl.load(bt_row + ut // BLOCK_SIZE)
    off = (ut % BLOCK_SIZE).to(tl.int32)
    if OFF64:
        blk = blk.to(tl.int64)
    return tl.multiple_of(head_off + blk * stride_blk + off * stride_off, 4)


@triton.jit
def fp8_dot_q(q, Q_DT: tl.constexpr):
    """q: [M, D] in Q_DT ("bf16", "fp16", "fp32") -> (q for the q @ k^T dot, fp16 or for fp32
    q fp32; the fp32 factor undoing its scaling). q is scaled by the power of two putting its
    amax in [2^14, 2^15): exact for bf16 and fp16 values (their mantissas fit fp16's) except
    entries under 2^-28 of the amax (fp16 subnormals; flushed under 2^-39), and nothing
    overflows fp16. One factor for the whole tile, not one per row: it folds into the softmax
    scale, with no multiply in the loop."""
    x = q.to(tl.float32)
    e = (tl.max(tl.max(tl.abs(x), 1), 0).to(tl.int32, bitcast=True) >> 23) & 0xFF  # exponent
    e = tl.minimum(tl.maximum(e, 15), 254)  # a zero tile: any finite factor
    up = ((268 - e) << 23).to(tl.float32, bitcast=True)  # 2^(141 - e)
    down = ((e - 14) << 23).to(tl.float32, bitcast=True)  # 2^(e - 141)
    x = x * up
    if Q_DT != "fp32":
        x = x.to(tl.float16)
    return x, down


@triton.jit
def fp8_scores(q_dot, k8, k_fac, DOT_PREC: tl.constexpr, CVT: tl.constexpr):
    """q_dot: [M, D] from fp8_dot_q; k8: [N, D] e4m3 bytes; k_fac: [N] fp32 per-key factors
    (the row's scale times the softmax scale times fp8_dot_q's factor) -> [M, N] fp32."""
    s = tl.dot(q_dot, tl.trans(fp8_decode(k8, q_dot.dtype, CVT)), input_precision=DOT_PREC)
    return s * k_fac[None, :]


@triton.jit
def fp8_pv(p, v8, v_sc, Q_DT: tl.constexpr, DOT_PREC: tl.constexpr, CVT: tl.constexpr):
    """p: [M, N] fp32 probabilities (<= 1); v8: [N, D] e4m3 bytes; v_sc: [N] their scales (0
    for masked keys) -> p @ (v8 * v_sc) [M, D] fp32, in the dtype the module docstring gives
    for q's dtype Q_DT."""
    if Q_DT == "fp16":  # v dequantized: [N, D] fp16 (the model's values: in fp16's range)
        v = (fp8_decode(v8, tl.float32, CVT) * v_sc[:, None]).to(tl.float16)
        return tl.dot(p.to(tl.float16), v, input_precision=DOT_PREC)
    pw = p * v_sc[None, :]  # [M, N]: the scales on p's columns
    if Q_DT == "bf16":
        return tl.dot(pw.to(tl.bfloat16), fp8_decode(v8, tl.bfloat16, CVT),
                      input_precision=DOT_PREC)
    return tl.dot(pw, fp8_decode(v8, tl.float32, CVT), input_precision=DOT_PREC)


@triton.jit
def fp8_store_rows(row_ptr, d, x, mask, row_mask, HEAD_DIM: tl.constexpr):
    """Quantizes and stores head rows. row_ptr: [R] uint8 pointers to the rows; d: [C] column
    ids (C >= HEAD_DIM); x: [R, C] values, mask: [R, C] (False past HEAD_DIM); row_mask: [R]."""
    x = tl.where(mask, x.to(tl.float32), 0.0)
    scale = fp8_row_scale(tl.max(tl.abs(x), 1))  # [R]
    tl.store(row_ptr[:, None] + d[None, :], fp8_encode(x, scale[:, None]), mask=mask)
    tl.store(fp8_scale_ptr(row_ptr, HEAD_DIM), scale, mask=row_mask)


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kc_blk, stride_kc_off, stride_kc_h,
    stride_vc_blk, stride_vc_off, stride_vc_h,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, KV_FP8: tl.constexpr,
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
    if KV_FP8:  # rows [BLOCK_H] of e4m3 bytes + fp32 scale
        h_mask = h < NUM_KV_HEADS
        fp8_store_rows(kc + h * stride_kc_h, d, k, mask, h_mask, HEAD_DIM)
        fp8_store_rows(vc + h * stride_vc_h, d, v, mask, h_mask, HEAD_DIM)
    else:
        tl.store(kc + h[:, None] * stride_kc_h + d[None, :], k.to(k_cache_ptr.dtype.element_ty),
                 mask=mask)
        tl.store(vc + h[:, None] * stride_vc_h + d[None, :], v.to(v_cache_ptr.dtype.element_ty),
                 mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: [num_tokens, KVH, D] (last dim contiguous; may be views into a fused qkv output).
    k_cache, v_cache: [num_blocks, block_size, KVH, D] (last dim contiguous), or uint8
    [num_blocks, block_size, KVH, D + 4] for fp8 (kv_quant's layout: quantized here).
    slot_mapping: [num_tokens] int32/int64; an entry < 0 skips that token (graph padding)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    fp8 = k_cache.dtype == torch.uint8
    assert k.stride(2) == 1 and v.stride(2) == 1, "k/v last dim must be contiguous"
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1 and v_cache.dtype == k_cache.dtype
    assert v.shape == k.shape
    assert k_cache.shape[2:] == (num_kv_heads, head_dim + (FP8_KV_EXTRA if fp8 else 0))
    assert not fp8 or head_dim % 4 == 0, "fp8 rows keep their fp32 scale 4-byte aligned"
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
        BLOCK_H=block_h, BLOCK_D=block_d, KV_FP8=fp8, num_warps=4,
    )
