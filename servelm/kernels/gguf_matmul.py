"""Linear layers on GGUF weights kept as llama.cpp stores them: ``out = x @ dequant(raw).T + b``.

``raw`` is uint8 [N, K // QK * TS], each row that row's blocks as the file holds them (layouts:
quantization/gguf_formats.py, which is also the reference these kernels are tested against).
Formats: Q4_0, Q4_1, Q8_0 (blocks of 32) and Q4_K, Q5_K, Q6_K (super-blocks of 256); F32, F16
and BF16 tensors are plain views (F.linear).

* Small M (<= 16, decode): one kernel, specialized per format (FMT). Each program owns BLOCK_N
  rows and walks K a tile of ``blocks`` blocks at a time, reading the tile's bytes once, straight
  from the block layout (no repacking), and dequantizing in registers. The bytes are read as
  16-bit words (every field of every format sits at an even offset; most blocks are only 2-byte
  aligned, so wider loads are not possible); a word holds two neighbouring quants of each of its
  nibble (or byte) planes, so a format helper returns the tile as two "pair planes" of even/odd
  K elements, with their scales and K indices.
  - FMA path (USE_DOT=False, BLOCK_M = 1, the M = 1 default; a program per row): fp32 products
    with x, read as 32-bit pairs (x[2j], x[2j+1]) indexed like the weights so both share one
    register layout; each piece's sum of q x is scaled once (sum w x = a sum q x + b sum x).
  - dot path (USE_DOT=True, M = 2..16): each pair plane is interleaved into a [BLOCK_N, HK] tile
    in x's dtype (8-bit Q8_0 under bf16: fp32, then rounded) and multiplied on the tensor cores
    by x's [BLOCK_M, HK] tile gathered at its K indices (W @ x.T; x padded to 16 rows, masked).
    Scales are applied in that dtype: with bf16 the weights carry up to ~2x the rounding error
    of the reference's (dequantized in fp32, rounded once), still far below 4-bit quantization.
  - split-K: when N alone gives too few programs for the 132 SMs, K is split too; fp32 partials
    go to a [SPLIT_K, M, N] workspace reduced (bias added) by gemv.py's reduce kernel.
  Quants become floats by OR-ing them into the mantissa of 2**23 (fp32), 2**10 (fp16) or 2**7
  (bf16) and subtracting (one integer and one float op, exact): the int->float instruction runs
  at 16/clk/SM on H100, below the rate 4-bit weights stream at.
* Large M (prefill): one Triton kernel dequantizes the weight into an [N, K] buffer of x's dtype
  (``gguf_dequantize``, fp32 arithmetic, rounded once), then F.linear (cuBLAS). The dot path with
  ``block_m`` > 16 (a grid over M too) is a fused GEMM; benchmarks/gguf_gemv_bench.py times both.

Configs are a pure function of (M, N, K, type); nothing is autotuned at call time, so a call is
CUDA-graph capturable once ``warmup_gguf`` has compiled its kernels (no host syncs; allocations
depend on shapes only). They were chosen from sm_90 SASS instruction counts per weight byte
(compiled without a GPU), not from timings: benchmarks/gguf_gemv_bench.py --sweep times others.
"""
from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from servelm.kernels.gemv import _splitk_reduce_kernel
from servelm.quantization.gguf_formats import (
    dequantize_gguf, gguf_row_bytes, gguf_type_name, random_gguf_blocks)

MAX_M = 16
NUM_SMS = 132  # H100 SXM: the split-K heuristic's target (a constant: configs depend on shapes)
_DTYPES = (torch.bfloat16, torch.float16)
_PLAIN = MappingProxyType({0: torch.float32, 1: torch.float16, 30: torch.bfloat16})
# ggml type -> QK, the elements per block
_FMT = MappingProxyType({2: 32, 3: 32, 8: 32, 12: 256, 13: 256, 14: 256})
KERNEL_TYPES = MappingProxyType({t: n for t, n in (
    (2, "Q4_0"), (3, "Q4_1"), (8, "Q8_0"), (12, "Q4_K"), (13, "Q5_K"), (14, "Q6_K"))})


@dataclasses.dataclass(frozen=True)
class GgufConfig:
    block_n: int
    blocks: int  # blocks (of 32, or super-blocks of 256) per loop iteration: BK = blocks * QK
    num_warps: int = 4
    num_stages: int = 1
    use_dot: bool = False
    split_k: int = 1
    block_m: int = 16  # dot path: x rows per program (> 16 with a grid over M: a fused GEMM)

    def rows(self, m: int) -> int:
        return self.block_m if self.use_dot else 1


def select_config(m: int, n: int, k: int, ggml_type: int) -> GgufConfig:
    """The launch config for x: [m, k] @ W[n, k].T with W in ``ggml_type``; deterministic in its
    arguments."""
    qk = _FMT[int(ggml_type)]
    nb = k // qk
    if m <= 1:  # FMA: 4 rows x 16 pieces per iteration (more pieces: layout conversions)
        cfg = GgufConfig(block_n=4, blocks={14: 2, 12: 4, 13: 4}.get(int(ggml_type), 16))
    elif qk == 256:  # dot: one super-block of 64 rows per step
        cfg = GgufConfig(block_n=64, blocks=1, use_dot=True)
    else:
        cfg = GgufConfig(block_n=64, blocks=4, use_dot=True)
    cfg = dataclasses.replace(cfg, blocks=max(1, min(cfg.blocks, triton.next_power_of_2(nb))))
    # split K when N alone gives fewer programs than 2 per SM, keeping >= 1024 of K per split
    programs = triton.cdiv(n, cfg.block_n)
    split = 1
    while programs * split < 2 * NUM_SMS and k // (2 * split) >= 1024 and split < 8:
        split *= 2
    return dataclasses.replace(cfg, split_k=split)


# ---- format helpers ---------------------------------------------------------------------------
# A tile is BB blocks of BLOCK_N rows, read as 16-bit words (s_ptr: the raw bytes as int16; every
# field of every format starts at an even byte). Each word holds two neighbouring quants' bits, so
# the tile comes out as two "pair planes" p = 0, 1: e_p, o_p [BLOCK_N, G, W] are the quants at
# the K indices 2 j_p, 2 j_p + 1 (j_p: [1, G, W] int32 pair indices), in CT, offset removed; a_p, b_p
# [BLOCK_N, G, 1] the pieces' scale and offset (w = a t + b; b = 0 where the format has none).
# row_b: [BLOCK_N, 1, 1] int64 byte offset of each row; blocks >= blk_end read as 0 (MASKED).

@triton.jit
def _ld(ptr, msk, MASKED: tl.constexpr):
    # a load masked (0 where msk is False) only where the tile may run past the blocks' end
    if MASKED:
        return tl.load(ptr, mask=msk, other=0)
    else:
        return tl.load(ptr)


@triton.jit
def _as(v, OFF: tl.constexpr, CT: tl.constexpr):
    # v: int32 integers below 2**23 (fp32), 2**10 (fp16), 2**7 (bf16) -> CT v - OFF, exactly: OR-ed
    # into the mantissa of 2**23 / 2**10 / 2**7 and subtracted (one integer and one float op; the
    # int->float instruction runs at 16/clk/SM on H100, below the rate 4-bit weights stream at)
    if CT == tl.float32:
        return (v | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFF)
    elif CT == tl.float16:
        return (v | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - (1024.0 + OFF)
    else:
        return (v | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True) - (128.0 + OFF)


@triton.jit
def _deq_32(s_ptr, h_ptr, row_b, blk0, blk_end, FMT: tl.constexpr, BB: tl.constexpr,
            MASKED: tl.constexpr, CT: tl.constexpr):
    # Q4_0 [d, qs[16]], Q4_1 [d, m, qs[16]], Q8_0 [d, qs[32]]: G = BB blocks, W = 8 words.
    # Q4: word i = qs[2i] | qs[2i+1] << 8 holds elements 2i, 2i+1 (low nibbles) and 16+2i, 17+2i
    # Q8: words i (bytes 2..17) hold elements 2i, 2i+1; words 8 + i, elements 16+2i, 17+2i
    g = tl.arange(0, BB)[None, :, None]
    i = tl.arange(0, 8)[None, None, :]
    blk = blk0 + g  # [1, BB, 1]
    msk = blk < blk_end  # only read where MASKED
    TS: tl.constexpr = 18 if FMT == 2 else 20 if FMT == 3 else 34
    hw = row_b // 2 + blk * (TS // 2)  # [BN, BB, 1]: the blocks' first word
    d = _ld(h_ptr + hw, msk, MASKED).to(tl.float32)
    if FMT == 8:  # int8 v as byte b: v + 128 = b ^ 0x80
        w0 = _ld(s_ptr + hw + 1 + i, msk, MASKED).to(tl.int32)
        w1 = _ld(s_ptr + hw + 9 + i, msk, MASKED).to(tl.int32)
        e0 = _as((w0 & 255) ^ 0x80, 128.0, CT)
        o0 = _as(((w0 >> 8) & 255) ^ 0x80, 128.0, CT)
        e1 = _as((w1 & 255) ^ 0x80, 128.0, CT)
        o1 = _as(((w1 >> 8) & 255) ^ 0x80, 128.0, CT)
        b = d * 0.0
    else:
        if FMT == 3:
            b = _ld(h_ptr + hw + 1, msk, MASKED).to(tl.float32)
            w = _ld(s_ptr + hw + 2 + i, msk, MASKED).to(tl.int32)
        else:
            b = d * 0.0
            w = _ld(s_ptr + hw + 1 + i, msk, MASKED).to(tl.int32)
        OFF: tl.constexpr = 0.0 if FMT == 3 else 8.0
        e0 = _as(w & 15, OFF, CT)
        o0 = _as((w >> 8) & 15, OFF, CT)
        e1 = _as((w >> 4) & 15, OFF, CT)
        o1 = _as((w >> 12) & 15, OFF, CT)
    j0 = blk * 16 + i
    return e0, o0, e1, o1, d, d, b, b, j0, j0 + 8


@triton.jit
def _k_scale_min(s_ptr, c, msk, MASKED: tl.constexpr):
    # s_ptr: [BN, G, 1] int16 pointers to a K-quant block's 12 packed scale bytes s; c: [1, G, 1]
    # chunk 0..3 -> 6-bit scales and mins (sc, m) of sub-blocks j = 2c, 2c + 1 as fp32
    # [BN, G, 1]. j < 4: sc = s[j] & 63, m = s[j + 4] & 63; j >= 4: sc = (s[j + 4] & 15) |
    # (s[j - 4] >> 6) << 4, m = (s[j + 4] >> 4) | (s[j] >> 6) << 4. Words: p = s[2c] | s[2c+1] << 8,
    # q = s[2c+4] | .., r = s[(2c+4) % 8] | .. (= s[j - 4] for c >= 2)
    first = c < 2
    p = _ld(s_ptr + c, msk, MASKED).to(tl.int32)
    q = _ld(s_ptr + c + 2, msk, MASKED).to(tl.int32)
    r = _ld(s_ptr + (c + 2) % 4, msk, MASKED).to(tl.int32)
    sc0 = tl.where(first, p & 63, (q & 15) | ((r >> 2) & 48))
    sc1 = tl.where(first, (p >> 8) & 63, ((q >> 8) & 15) | ((r >> 10) & 48))
    m0 = tl.where(first, q & 63, ((q >> 4) & 15) | ((p >> 2) & 48))
    m1 = tl.where(first, (q >> 8) & 63, ((q >> 12) & 15) | ((p >> 10) & 48))
    return (_as(sc0, 0.0, tl.float32), _as(sc1, 0.0, tl.float32), _as(m0, 0.0, tl.float32),
            _as(m1, 0.0, tl.float32))


@triton.jit
def _deq_k45(q_ptr, s_ptr, h_ptr, row_b, blk0, blk_end, FMT: tl.constexpr, BB: tl.constexpr,
             MASKED: tl.constexpr, CT: tl.constexpr):
    # Q4_K [d, dmin, scales[12], qs[128]], Q5_K [d, dmin, scales[12], qh[32], qs[128]]: piece =
    # 32-byte chunk c of qs (sub-block 2c in its low nibbles, 2c + 1 in its high), G = 4 BB,
    # W = 16 words: word i = elements 2i, 2i + 1 of both sub-blocks (pair plane 0: 2c, 1: 2c + 1)
    G: tl.constexpr = 4 * BB
    g = tl.arange(0, G)[None, :, None]
    i = tl.arange(0, 16)[None, None, :]
    sb = blk0 + g // 4  # [1, G, 1] super-block
    c = g % 4
    msk = sb < blk_end  # only read where MASKED
    TS: tl.constexpr = 176 if FMT == 13 else 144
    QS: tl.constexpr = 48 if FMT == 13 else 16
    base = row_b + sb * TS  # [BN, G, 1] bytes
    hw = base // 2
    d = _ld(h_ptr + hw, msk, MASKED).to(tl.float32)
    dmin = _ld(h_ptr + hw + 1, msk, MASKED).to(tl.float32)
    sc0, sc1, m0, m1 = _k_scale_min(s_ptr + hw + 2, c, msk, MASKED)
    w = _ld(s_ptr + hw + QS // 2 + c * 16 + i, msk, MASKED).to(tl.int32)  # [BN, G, 16]
    qe0 = w & 15
    qo0 = (w >> 8) & 15
    qe1 = (w >> 4) & 15
    qo1 = (w >> 12) & 15
    if FMT == 13:  # bit j of qh[l] is bit 4 of element l of sub-block j; qh word i: l = 2i, 2i+1
        qh = _ld(s_ptr + hw + 8 + i, msk, MASKED).to(tl.int32)
        qe0 = qe0 | (((qh >> (2 * c)) & 1) << 4)
        qo0 = qo0 | (((qh >> (2 * c + 8)) & 1) << 4)
        qe1 = qe1 | (((qh >> (2 * c + 1)) & 1) << 4)
        qo1 = qo1 | (((qh >> (2 * c + 9)) & 1) << 4)
    j0 = sb * 128 + c * 32 + i
    return (_as(qe0, 0.0, CT), _as(qo0, 0.0, CT), _as(qe1, 0.0, CT), _as(qo1, 0.0, CT),
            d * sc0, d * sc1, -(dmin * m0), -(dmin * m1), j0, j0 + 16)


@triton.jit
def _deq_q6_k(q_ptr, s_ptr, h_ptr, row_b, blk0, blk_end, BB: tl.constexpr, MASKED: tl.constexpr,
              CT: tl.constexpr):
    # Q6_K [ql[128], qh[64], scales int8[16], d]: piece (half h, u) = elements r = 16u .. 16u+15
    # (pair plane 0, low nibbles of ql) and 64 + 16u .. (plane 1, high nibbles) of half h, one
    # scale each; G = 8 BB, W = 8 words (ql word i: r = 2i, 2i + 1; qh word i: the same r's bits)
    G: tl.constexpr = 8 * BB
    g = tl.arange(0, G)[None, :, None]
    i = tl.arange(0, 8)[None, None, :]
    sb = blk0 + g // 8
    h = (g // 4) % 2
    u = g % 4
    msk = sb < blk_end  # only read where MASKED
    base = row_b + sb * 210  # [BN, G, 1] bytes
    hw = base // 2
    ql = _ld(s_ptr + hw + 32 * h + 8 * u + i, msk, MASKED).to(tl.int32)
    qh = _ld(s_ptr + hw + 64 + 16 * h + 8 * (u % 2) + i, msk, MASKED).to(tl.int32)
    sc0 = _ld(q_ptr + base + 192 + 8 * h + u, msk, MASKED)
    sc1 = _ld(q_ptr + base + 196 + 8 * h + u, msk, MASKED)
    d = _ld(h_ptr + hw + 104, msk, MASKED).to(tl.float32)
    sh = 2 * (u // 2)  # qh bits of r: 2 (r // 32) in qh[32h + r % 32]
    qe0 = (ql & 15) | (((qh >> sh) & 3) << 4)
    qo0 = ((ql >> 8) & 15) | (((qh >> (sh + 8)) & 3) << 4)
    qe1 = ((ql >> 4) & 15) | (((qh >> (sh + 4)) & 3) << 4)
    qo1 = ((ql >> 12) & 15) | (((qh >> (sh + 12)) & 3) << 4)
    a0 = d * sc0.to(tl.int8, bitcast=True).to(tl.float32)
    a1 = d * sc1.to(tl.int8, bitcast=True).to(tl.float32)
    j0 = sb * 128 + 64 * h + 8 * u + i
    return (_as(qe0, 32.0, CT), _as(qo0, 32.0, CT), _as(qe1, 32.0, CT), _as(qo1, 32.0, CT),
            a0, a1, a0 * 0.0, a1 * 0.0, j0, j0 + 32)


@triton.jit
def _deq_tile(q_ptr, s_ptr, h_ptr, row_b, blk0, blk_end, FMT: tl.constexpr, BB: tl.constexpr,
              MASKED: tl.constexpr, CT: tl.constexpr):
    if FMT == 14:
        out = _deq_q6_k(q_ptr, s_ptr, h_ptr, row_b, blk0, blk_end, BB, MASKED, CT)
    elif FMT >= 12:
        out = _deq_k45(q_ptr, s_ptr, h_ptr, row_b, blk0, blk_end, FMT, BB, MASKED, CT)
    else:
        out = _deq_32(s_ptr, h_ptr, row_b, blk0, blk_end, FMT, BB, MASKED, CT)
    return out


@triton.jit
def _pair(e, o, a, b, j, HAS_MIN: tl.constexpr, CT: tl.constexpr):
    # one pair plane -> (w [BN, G * W * 2] in CT, its K indices [G * W * 2]): e and o interleaved,
    # so each piece's 2W weights are contiguous in K
    a = a.to(CT)
    if HAS_MIN:
        b = b.to(CT)
        w = tl.join(e * a + b, o * a + b)
    else:
        w = tl.join(e * a, o * a)
    kk = tl.join(2 * j, 2 * j + 1)
    n: tl.constexpr = w.shape[0]
    return tl.reshape(w, [n, w.numel // n]), tl.reshape(kk, [kk.numel])


@triton.jit
def _dot_pair(acc, w, kk, x_ptr, offs_m, mask_m, stride_xm, k_end, EVEN: tl.constexpr):
    # acc [BN, BM] += w [BN, HK] @ x[:, kk].T
    xm = mask_m[:, None]
    if not EVEN:
        xm = xm & (kk < k_end)[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=xm, other=0.0)
    return tl.dot(w.to(x.dtype), tl.trans(x), acc)


@triton.jit
def _x_pair(x32_row, j, k_end, EVEN: tl.constexpr, X_BF16: tl.constexpr):
    # x[2j], x[2j + 1] ([BN, G, W]) as fp32, from one 32-bit load
    if EVEN:
        p = tl.load(x32_row + j)
    else:
        p = tl.load(x32_row + j, mask=2 * j < k_end, other=0)
    if X_BF16:  # a bf16 is the top half of an fp32
        return (p << 16).to(tl.float32, bitcast=True), (p & -65536).to(tl.float32, bitcast=True)
    else:
        lo = (p & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (p >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return lo, hi


# ---- kernels ----------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["M"])
def _gguf_gemv_kernel(x_ptr, x32_ptr, q_ptr, s_ptr, h_ptr, b_ptr, out_ptr, ws_ptr, M, N, NB,
                      stride_xm, stride_q, stride_om, blocks_per_split,
                      FMT: tl.constexpr, QK: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BB: tl.constexpr, SPLIT: tl.constexpr,
                      USE_DOT: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr,
                      STAGES: tl.constexpr):
    # grid: (cdiv(N, BLOCK_N), K splits, cdiv(M, BLOCK_M)); blocks_per_split is a multiple of BB;
    # EVEN: NB % BB == 0, so no tile runs past its split's end and nothing is masked along K
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # rows past N re-read valid rows (never stored): no row masks on W
    rn = offs_n % N
    row_b = (rn.to(tl.int64) * stride_q)[:, None, None]  # [BN, 1, 1]
    mask_m = offs_m < M
    blk_lo = pid_k * blocks_per_split
    blk_end = tl.minimum(NB, blk_lo + blocks_per_split)
    k_end = blk_end * QK
    num_iters = tl.cdiv(blk_end - blk_lo, BB)
    HAS_MIN: tl.constexpr = FMT == 3 or FMT == 12 or FMT == 13  # w = a t + b, b != 0
    SAME_A: tl.constexpr = FMT == 2 or FMT == 3 or FMT == 8  # one scale for both planes
    X_BF16: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
    if USE_DOT:
        # the MMA operand's dtype, exact for the quants (bf16 holds integers up to 256 only)
        CT: tl.constexpr = tl.float32 if FMT == 8 and X_BF16 else x_ptr.dtype.element_ty
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        CT: tl.constexpr = tl.float32
        G: tl.constexpr = BB * (8 if FMT == 14 else 4 if FMT >= 12 else 1)  # pieces per tile
        acc = tl.zeros([BLOCK_N, G, 1], dtype=tl.float32)  # per-piece sums
        # x as int32 pairs, through index tensors of the weights' shape so that both get one
        # register layout (no conversions)
        x32_row = x32_ptr + pid_m * (stride_xm // 2) + (offs_n * 0)[:, None, None]
    for it in tl.range(0, num_iters, num_stages=STAGES):
        blk0 = blk_lo + it * BB
        e0, o0, e1, o1, a0, a1, b0, b1, k0, k1 = _deq_tile(
            q_ptr, s_ptr, h_ptr, row_b, blk0, blk_end, FMT, BB, not EVEN, CT)
        if USE_DOT:  # one MMA per pair plane: [BN, HK] @ [HK, BM]
            w, kk = _pair(e0, o0, a0, b0, k0, HAS_MIN, CT)
            acc = _dot_pair(acc, w, kk, x_ptr, offs_m, mask_m, stride_xm, k_end, EVEN)
            w, kk = _pair(e1, o1, a1, b1, k1, HAS_MIN, CT)
            acc = _dot_pair(acc, w, kk, x_ptr, offs_m, mask_m, stride_xm, k_end, EVEN)
        else:
            # BLOCK_M == 1 (program pid_m is row pid_m); each piece's sum of t x is scaled once:
            # sum(w x) = a sum(t x) + b sum(x)
            xe0, xo0 = _x_pair(x32_row, k0, k_end, EVEN, X_BF16)
            xe1, xo1 = _x_pair(x32_row, k1, k_end, EVEN, X_BF16)
            if SAME_A:
                acc += tl.sum(e0 * xe0 + o0 * xo0 + e1 * xe1 + o1 * xo1, axis=2,
                              keep_dims=True) * a0
                if HAS_MIN:
                    acc += tl.sum(xe0 + xo0 + xe1 + xo1, axis=2, keep_dims=True) * b0
            else:
                acc += tl.sum(e0 * xe0 + o0 * xo0, axis=2, keep_dims=True) * a0
                acc += tl.sum(e1 * xe1 + o1 * xo1, axis=2, keep_dims=True) * a1
                if HAS_MIN:
                    acc += tl.sum(xe0 + xo0, axis=2, keep_dims=True) * b0
                    acc += tl.sum(xe1 + xo1, axis=2, keep_dims=True) * b1
    if USE_DOT:
        res = tl.trans(acc)  # [BM, BN]
    else:
        res = tl.sum(tl.sum(acc, axis=2), axis=1)[None, :]  # [1, BN]
    om = offs_m[:, None]
    on = offs_n[None, :]
    mask = (om < M) & (on < N)
    if not SPLIT:
        if HAS_BIAS:
            res += tl.load(b_ptr + rn).to(tl.float32)[None, :]
        tl.store(out_ptr + om * stride_om + on, res.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ws_ptr + (pid_k * M + om) * N + on, res, mask=mask)


@triton.jit
def _gguf_dequant_kernel(q_ptr, s_ptr, h_ptr, out_ptr, N, NB, stride_q, stride_o,
                         FMT: tl.constexpr, QK: tl.constexpr, BLOCK_N: tl.constexpr,
                         BB: tl.constexpr, EVEN: tl.constexpr):
    # raw [N, row bytes] -> out [N, K] in out's dtype; grid: (cdiv(N, BLOCK_N), cdiv(NB, BB))
    pid_n = tl.program_id(0)
    blk0 = tl.program_id(1) * BB
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = offs_n % N
    row_b = (rn.to(tl.int64) * stride_q)[:, None, None]
    e0, o0, e1, o1, a0, a1, b0, b1, k0, k1 = _deq_tile(
        q_ptr, s_ptr, h_ptr, row_b, blk0, NB, FMT, BB, not EVEN, tl.float32)
    HAS_MIN: tl.constexpr = FMT == 3 or FMT == 12 or FMT == 13
    o_row = out_ptr + rn.to(tl.int64)[:, None] * stride_o  # [BN, 1]
    n_ok = (offs_n < N)[:, None]
    w, kk = _pair(e0, o0, a0, b0, k0, HAS_MIN, tl.float32)
    tl.store(o_row + kk[None, :], w.to(out_ptr.dtype.element_ty),
             mask=n_ok & (kk < NB * QK)[None, :])
    w, kk = _pair(e1, o1, a1, b1, k1, HAS_MIN, tl.float32)
    tl.store(o_row + kk[None, :], w.to(out_ptr.dtype.element_ty),
             mask=n_ok & (kk < NB * QK)[None, :])


# ---- host side --------------------------------------------------------------------------------

def _views(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same bytes as 16-bit words (quants) and fp16 (block scales): rows and fields are at
    even byte offsets in every format."""
    return raw.view(torch.int16), raw.view(torch.float16)


def _check(x: torch.Tensor, raw: torch.Tensor, ggml_type: int, k: int,
           bias: Optional[torch.Tensor]) -> None:
    row_bytes = gguf_row_bytes(ggml_type, k)  # ValueError for unsupported types / ragged K
    if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[1] != row_bytes:
        raise ValueError(f"a {gguf_type_name(ggml_type)} weight of K={k} is uint8 [N, "
                         f"{row_bytes}], got {raw.dtype} {tuple(raw.shape)}")
    if x.shape[-1] != k:
        raise ValueError(f"x has K={x.shape[-1]} but the weight has K={k}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"gguf_linear takes bf16/fp16 activations, got {x.dtype}")
    if bias is not None and (bias.shape != (raw.shape[0],) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be [{raw.shape[0]}] {x.dtype}, got "
                         f"{tuple(bias.shape)} {bias.dtype}")


def gguf_dequantize(raw: torch.Tensor, ggml_type: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """raw uint8 [N, row_bytes] -> [N, k] in dtype (bf16/fp16/fp32), dequantized by one Triton
    kernel (values as dequantize_gguf's, up to the fp32 ops' order and one rounding)."""
    ggml_type = int(ggml_type)
    if ggml_type not in _FMT:
        return dequantize_gguf(raw, ggml_type, k, dtype)
    qk = _FMT[ggml_type]
    raw = raw.contiguous()
    n, nb = raw.shape[0], k // qk
    out = torch.empty((n, k), dtype=dtype, device=raw.device)
    if n == 0:
        return out
    bb = max(1, min(256 // qk, triton.next_power_of_2(nb)))  # 256 elements of 16 rows a program
    block_n = 16
    s16, h = _views(raw)
    _gguf_dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(nb, bb))](
        raw, s16, h, out, n, nb, raw.stride(0), out.stride(0), FMT=ggml_type, QK=qk,
        BLOCK_N=block_n, BB=bb, EVEN=nb % bb == 0, num_warps=4)
    return out


def gguf_linear(x: torch.Tensor, raw: torch.Tensor, ggml_type: int, k: int,
                bias: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                config: Optional[GgufConfig] = None) -> torch.Tensor:
    """x: [M, K] (or [..., K]) bf16/fp16, raw: uint8 [N, row_bytes] in ``ggml_type``, bias: [N]
    -> [M, N] (or [..., N]) in x's dtype.

    M <= 16 (or any M with an explicit ``config``): the GEMV/GEMM kernel on the raw blocks; larger
    M: the weight dequantized to x's dtype by one kernel, then F.linear. ``out`` ([M, N],
    contiguous last dim) is written in place when given (kernel paths)."""
    ggml_type = int(ggml_type)
    _check(x, raw, ggml_type, k, bias)
    lead = x.shape[:-1]
    n = raw.shape[0]
    x2 = x.reshape(-1, k)  # x2: [M, K]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if ggml_type in _PLAIN or (config is None and m > MAX_M):
        w = dequantize_gguf(raw, ggml_type, k, x.dtype) if ggml_type in _PLAIN else \
            gguf_dequantize(raw, ggml_type, k, x.dtype)
        y = F.linear(x2, w, bias)
        if out is not None:
            out.copy_(y)
            y = out
        return y.view(*lead, n)
    raw = raw.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or out.stride(1) != 1:
        raise ValueError(f"out must be [{m}, {n}] {x.dtype} with a contiguous last dim")
    if m == 0 or n == 0:
        return out.view(*lead, n)
    qk = _FMT[ggml_type]
    nb = k // qk
    cfg = config or select_config(m, n, k, ggml_type)
    bb = cfg.blocks
    bm = cfg.rows(m)
    nbb = triton.cdiv(nb, bb)  # tiles along K
    split = max(1, min(cfg.split_k, nbb))
    blocks_per_split = triton.cdiv(nbb, split) * bb
    split = triton.cdiv(nb, blocks_per_split)  # no empty splits
    ws = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    b_arg = bias if bias is not None else out
    s16, h = _views(raw)
    # the FMA path reads x as 32-bit pairs: rows at 4-byte-aligned addresses
    if not cfg.use_dot and (x2.stride(0) % 2 or x2.data_ptr() % 4):
        x2 = x2.clone()
    x32 = x2.view(torch.int32) if not cfg.use_dot else x2
    grid = (triton.cdiv(n, cfg.block_n), split, triton.cdiv(m, bm))
    _gguf_gemv_kernel[grid](
        x2, x32, raw, s16, h, b_arg, out, ws, m, n, nb, x2.stride(0), raw.stride(0),
        out.stride(0), blocks_per_split, FMT=ggml_type, QK=qk, BLOCK_M=bm,
        BLOCK_N=cfg.block_n, BB=bb, SPLIT=split > 1, USE_DOT=cfg.use_dot,
        HAS_BIAS=bias is not None, EVEN=nb % bb == 0, STAGES=cfg.num_stages,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(n, block), m)](
            ws, b_arg, out, m, n, out.stride(0), NUM_PARTS=split, HAS_BIAS=bias is not None,
            BLOCK=block, num_warps=4)
    return out.view(*lead, n)


def use_gguf_kernel(x: torch.Tensor, ggml_type: int) -> bool:
    """True where gguf_linear runs its kernels: CUDA, bf16/fp16 x, a block format of KERNEL_TYPES
    (F32/F16/BF16 weights are plain tensors: the reference's F.linear is the same thing)."""
    return x.is_cuda and x.dtype in _DTYPES and int(ggml_type) in KERNEL_TYPES


def _warm_n(n: int) -> int:
    """A small row count that Triton specializes like n (divisible by 16 or not, never 1)."""
    return n if n <= 64 else 48 + n % 16


def warmup_gguf(shapes: Iterable[Sequence], dtype: torch.dtype, device: torch.device | str,
                max_m: int = MAX_M, prefill: bool = True) -> None:
    """Compiles the kernels that (N, K, ggml_type[, has_bias]) weights use at M = 1..max_m (and
    the prefill dequantizer), so that later calls (e.g. under CUDA-graph capture) never JIT.
    Runs on a few random weight rows: no large allocation."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    for shape in shapes:
        n, k, ggml_type = int(shape[0]), int(shape[1]), int(shape[2])
        has_bias = bool(shape[3]) if len(shape) > 3 else False
        if ggml_type not in _FMT:
            continue
        wn = _warm_n(n)
        raw = random_gguf_blocks(wn, k, ggml_type, gen).to(device)
        b = torch.randn(wn, device=device).to(dtype) if has_bias else None
        configs = {}
        for m in range(1, max_m + 1):  # one launch per distinct kernel specialization
            cfg = select_config(m, n, k, ggml_type)
            configs.setdefault((cfg, cfg.rows(m)), m)
        for (cfg, _), m in configs.items():
            x = torch.randn(m, k, device=device).to(dtype)
            gguf_linear(x, raw, ggml_type, k, b, config=cfg)
        if prefill:
            gguf_dequantize(raw, ggml_type, k, dtype)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)

