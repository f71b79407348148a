"""Quantized linear layers: ``out = x @ dequant(weight).T + bias`` for the layouts of
servelm/quantization/ref.py (N output rows, K input columns, G the group size along K):

* int4 weight-only, asymmetric (GPTQ): ``qweight`` int32 [K // 8, N], value (k, n) is nibble
  k % 8 of ``qweight[k // 8, n]``; ``scales``, ``zeros`` [ceil(K / G), N] in x's dtype (the last
  group shorter when G does not divide K); w[n, k] = (q - zeros[k // G, n]) * scales[k // G, n].
* int8 weight-only, symmetric: ``qweight`` int8 [N, K]; ``scales`` [N, ceil(K / G)] in x's dtype;
  w[n, k] = q * scales[n, k // G].
* fp8 W8A8: ``weight`` float8_e4m3fn [N, K], ``weight_scale`` fp32 [N]; x is quantized per token
  at run time exactly as ``ref.quantize_fp8_per_token`` does, and
  y = (xq @ wq^T) * x_scale[:, None] * weight_scale[None, :] (+ bias), rounded once.

Every path accumulates in fp32 and rounds once to x's dtype. Two regimes, as in kernels/gemv.py:

* small M (decode, M <= 16): a GEMV. Each program owns BLOCK_N output columns and streams its
  quantized weights once over K, dequantizing in registers. Programs split K too (SPLIT) where N
  alone gives too few programs to keep ~2 per SM of the 132 streaming; fp32 partials go to a
  [SPLIT_K, M, N] workspace and a second tiny kernel sums them (applying the fp8 scales and the
  bias). Two inner loops:
  - FMA (USE_DOT=False; by default at M = 1, and M = 2 for fp8): element-wise fp32 products in
    a register tile, reduced once after the loop. int4 masks each nibble j in place and ORs in
    the exponent of 2**23 (one LOP3), an exact subtract gives q * 16**j, x is pre-scaled by
    16**-j, and the zero point and scale are applied once per word (its 8 nibbles share a
    group): about 3 instructions per nibble plus a share of the per-word work.
  - dot (USE_DOT=True): the weight tile is dequantized to x's dtype (int4/int8) or kept fp8
    and multiplied on the tensor cores with x padded to 16 rows (masked loads: no traffic);
    SWAP_AB computes W @ x.T so that W is the MMA's A operand, as gemv.py found best at M >= 2.
  Integers become floats without the int-to-float instruction (quarter rate on Hopper: too slow
  to dequantize at HBM speed): ``(q | 0x4B000000)`` read as fp32 is 2**23 + q for 0 <= q < 2**23
  (int4), and ``(q + 0x4B400000)`` is 1.5 * 2**23 + q for |q| < 2**22 (int8); subtracting the
  constant (int4: together with the zero point) is exact.
* large M (prefill): a tiled GEMM (grouped program order for L2 reuse) whose K loop loads the
  packed weights (int4: [BLOCK_K // 8, BLOCK_N] words, unpacked to [BLOCK_N, BLOCK_K] with
  trans + three interleaves, no redundant loads) and dequantizes them to x's dtype, rounding
  w = (q - z) * s once as ref.dequantize_* does, before ``tl.dot``. fp8 at large M quantizes x
  with the Triton kernel below and calls ``torch._scaled_mm`` (row-wise scales, cuBLAS/CUTLASS)
  for bf16 x; a Triton fp8 GEMM serves fp16 x, shapes _scaled_mm refuses, and explicit configs.

fp8 activations: ``fp8_quantize_per_token`` (one program per row) writes xq [M, K] e4m3 and
x_scale [M] fp32 bit-identical to the reference: the division is IEEE (``div_rn``; Triton's ``/``
is approximate) and the rounding to e4m3 is done in integer arithmetic (round half to even),
so the final cast only converts exact values (Triton's interpreter mis-rounds inexact fp32 -> e4m3
casts). The fp8 GEMV reads xq (1 byte per element) after that kernel; quantizing inside every
GEMV program instead would repeat ~20 instructions per x element in each of them.

Group sizes (multiples of 8, or G >= K: one group; ceil(K / G) groups, the last one shorter): the
dot paths and the GEMMs need every BLOCK_K tile inside one group (G a multiple of BLOCK_K, or
G >= K), so configs take BLOCK_K from G's power-of-two part; G = 8, 24, 40, ... (power-of-two
part below the MMA's K of 16) fall back to the reference there. The int4 FMA path loads each
packed row's own scale and zero (any BLOCK_K works); the int8 FMA path splits its tile into
sub-tiles of one group each (BLOCK_K a multiple or a divisor of G).

Configs are a pure function of (method, M, N, K, G): heuristics, not yet tuned on a GPU
(benchmarks/quant_gemv_bench.py --sweep times candidates). Nothing is autotuned at call time and
nothing syncs with the host, so calls are CUDA-graph capturable once ``warmup_quant_matmul`` has
compiled their kernels.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Optional, Sequence, Union

import torch
import triton
import triton.language as tl

from servelm.quantization import ref

MAX_M = 16  # the GEMV regime
NUM_SMS = 132  # H100 SXM: split-K aims at >= 1 (FMA) or 2 (dot) programs per SM
_DTYPES = (torch.bfloat16, torch.float16)
_METHODS = ("int4", "int8", "fp8")
_F32_2POW23_BITS = 0x4B000000  # the int4 GEMV's run-time magic (see _int4_gemv_kernel)


# ---- configs ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class QGemvConfig:
    """Small-M (GEMV) launch config."""
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    use_dot: bool = False
    swap_ab: bool = False  # dot path: W @ x.T (W is the MMA's A operand) instead of x @ W.T
    split_k: int = 1

    def block_m(self, m: int) -> int:
        # the dot path pads M to the 16 rows of an MMA tile
        return 16 if self.use_dot else triton.next_power_of_2(max(m, 1))


@dataclasses.dataclass(frozen=True)
class QGemmConfig:
    """Large-M (tiled GEMM) launch config."""
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8  # programs walk GROUP_M row tiles per column tile (L2 reuse of W)
    num_warps: int = 8
    num_stages: int = 3
    swap_ab: bool = False  # acc^T = W @ x^T: the dequantized W is the A operand


QConfig = Union[QGemvConfig, QGemmConfig]


def _pow2_part(g: int) -> int:
    return g & -g


def _tile_k(desired: int, k: int, group_size: int) -> int:
    """The largest power-of-two BLOCK_K <= desired whose tiles lie inside one group."""
    if group_size >= k:  # one group: any tile
        return min(desired, max(16, triton.next_power_of_2(k)))
    return min(desired, _pow2_part(group_size))


def _split(programs: int, k: int, block_k: int, target: int) -> int:
    """Split K while N alone gives fewer than ``target`` programs, keeping >= 4 BLOCK_K tiles
    per split (each split costs a second, reducing launch)."""
    split = 1
    while programs * split < target and k // (2 * split * block_k) >= 4 and split < 8:
        split *= 2
    return split


def select_gemv_config(method: str, m: int, n: int, k: int, group_size: int = 0) -> QGemvConfig:
    """The small-M launch config for ``method`` in ("int4", "int8", "fp8"); deterministic.
    ``group_size`` 0 (or >= k): one group per row.

    Sized first with sm_90 SASS instruction counts (per weight in
    the K loop: int4 FMA ~5.6 per nibble, int4 dot ~7, int8 FMA ~7, int8 dot ~8, fp8 FMA ~3.5,
    fp8 dot < 1) and gemv.py's measured bf16 winners (FMA at M = 1, W @ x.T on the tensor cores
    above); then the int4 and int8 tiles were swept on one H100 (benchmarks/quant_gemv_bench.py
    --sweep, Llama-3-8B shapes, contiguous weights) and the winners put here. FMA programs
    split K only below one program per SM, dot programs below two."""
    k_pow2 = max(16, triton.next_power_of_2(k))
    group_size = group_size or k
    if method == "int4":
        if m == 1:  # [128, 16] words = 8 KB per tile; 256 programs at N = 4096
            cfg = QGemvConfig(block_n=16, block_k=min(1024, k_pow2), num_warps=4, num_stages=3)
            if n >= 65536:  # lm_head-sized: swept 127 vs 166 us (128256 x 4096)
                cfg = QGemvConfig(block_n=64, block_k=min(256, k_pow2), num_warps=4,
                                  num_stages=3)
            elif n >= 16384:  # gate_up-sized: swept 34.2 vs 41.3 us (28672 x 4096)
                cfg = QGemvConfig(block_n=32, block_k=min(256, k_pow2), num_warps=4,
                                  num_stages=4)
        else:  # swept at M = 4, 8, 16: 64-column tiles split over K (down: 28.5 vs 42.6 us)
            bn, stages = (128, 4) if n >= 16384 else (64, 4)
            if n >= 65536:
                bn, stages = 128, 6
            cfg = QGemvConfig(block_n=bn, block_k=_tile_k(64 if n >= 65536 else 128, k,
                                                          group_size),
                              num_warps=4, num_stages=stages, use_dot=True, swap_ab=True)
    elif method == "int8":
        if m == 1:  # [8, 1024] bytes = 8 KB per tile, in sub-tiles of one group each
            bk = min(1024, k_pow2)
            if group_size < k and group_size % bk and bk % group_size:
                bk = _pow2_part(group_size)
            cfg = QGemvConfig(block_n=8, block_k=bk, num_warps=4, num_stages=3)
        else:  # swept at M = 4, 8, 16: x @ W.T on 32-column tiles (qkv 15.0 vs 17.3 us)
            cfg = QGemvConfig(block_n=32, block_k=_tile_k(128, k, group_size), num_warps=4,
                              num_stages=4, use_dot=True, swap_ab=False)
    elif method == "fp8":
        if m <= 2:  # [8, 1024] bytes = 8 KB per tile (M=2: 4 rows, the same registers)
            cfg = QGemvConfig(block_n=8 // m, block_k=min(1024, k_pow2), num_warps=4,
                              num_stages=3)
        else:
            cfg = QGemvConfig(block_n=64, block_k=min(256, max(32, k_pow2)), num_warps=4,
                              num_stages=4, use_dot=True, swap_ab=True)
    else:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    target = (2 if cfg.use_dot else 1) * NUM_SMS
    return dataclasses.replace(
        cfg, split_k=_split(triton.cdiv(n, cfg.block_n), k, cfg.block_k, target))


def select_gemm_config(method: str, m: int, n: int, k: int, group_size: int = 0) -> QGemmConfig:
    """The large-M launch config; deterministic. Untuned: 128x128 tiles (64-row tiles up to
    M = 64), narrower column tiles while they give fewer programs than SMs."""
    group_size = group_size or k
    bm = 64 if m <= 64 else 128
    if method == "fp8":
        bk = min(128, max(32, triton.next_power_of_2(k)))
    else:
        bk = _tile_k(64, k, group_size)
    bn = 128
    while bn > 32 and triton.cdiv(m, bm) * triton.cdiv(n, bn) < NUM_SMS:
        bn //= 2
    warps = 8 if bm * bn >= 128 * 128 else 4
    return QGemmConfig(block_m=bm, block_n=bn, block_k=bk, group_m=8, num_warps=warps,
                       num_stages=4 if bm == 64 else 3)


# ---- shared device helpers --------------------------------------------------------------------
@triton.jit
def _int8_to_f32(q):
    # q: int8 -> fp32 q: 1.5 * 2**23 + q (exact for |q| < 2**22), then the constant removed
    return (q.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def _unpack_int4_nk(p, magic):
    """p: [BLOCK_K // 8, BLOCK_N] int32 (GPTQ words) -> [BLOCK_N, BLOCK_K] fp32 2**23 + q[n, k],
    q[n, k] = nibble k % 8 of p[k // 8, n]. Each word is repeated 8 times along K in registers
    (three interleaves), so the load stays [BLOCK_K // 8, BLOCK_N] and coalesced along N.
    magic: 0x4B000000 as a run-time value: "(w >> s | magic) & 0x4B00000F" is then one SHF and
    one LOP3 (one immediate per instruction; "(w >> s) & 0xF" alone becomes a bit-field extract,
    SHF + SGXT, before the OR)."""
    t = tl.trans(p)  # [BLOCK_N, BLOCK_K // 8]
    t = tl.interleave(t, t)
    t = tl.interleave(t, t)
    t = tl.interleave(t, t)  # [BLOCK_N, BLOCK_K]
    shifts = (tl.arange(0, t.shape[1]) % 8) * 4
    return (((t >> shifts[None, :]) | magic) & 0x4B00000F).to(tl.float32, bitcast=True)


@triton.jit
def _round_to_e4m3(v):
    """v: fp32 with |v| <= 448 -> the nearest float8_e4m3fn value (ties to even), as fp32."""
    bits = v.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    sign = bits ^ mag
    # normal e4m3 (|v| >= 2**-6): keep 3 of fp32's 23 mantissa bits, round half to even (a carry
    # into the exponent is the right answer)
    normal = (mag + 0x7FFFF + ((mag >> 20) & 1)) & 0x7FF00000
    # subnormal e4m3 (|v| < 2**-6): multiples of 2**-9; fp32's ulp at 1.5 * 2**14 is 2**-9, so the
    # add rounds half to even at exactly that step
    magf = mag.to(tl.float32, bitcast=True)
    sub = ((magf + 24576.0) - 24576.0).to(tl.int32, bitcast=True)
    return (tl.where(mag < 0x3C800000, sub, normal) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _load_x_tile(x_ptr, offs_m, mask_m, kk, K, stride_xm, BLOCK_M: tl.constexpr,
                 EVEN_K: tl.constexpr):
    # -> x[offs_m, kk]: [BLOCK_M, BLOCK_K], rows >= M and columns >= K zero (masks only where
    # needed: a per-element compare in the K loop costs as much as the FMA it feeds)
    ptrs = x_ptr + offs_m[:, None] * stride_xm + kk[None, :]
    if EVEN_K and BLOCK_M == 1:
        return tl.load(ptrs)
    elif EVEN_K:
        return tl.load(ptrs, mask=mask_m[:, None], other=0.0)
    else:
        return tl.load(ptrs, mask=mask_m[:, None] & (kk < K)[None, :], other=0.0)


@triton.jit
def _gemv_epilogue(res, offs_m, offs_n, rn, M, N, pid_k, out_ptr, stride_om, ws_ptr, b_ptr,
                   xs_ptr, wsc_ptr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                   HAS_SCALES: tl.constexpr):
    # res: [BLOCK_M, BLOCK_N] fp32. Split: raw partials to ws [SPLIT_K, M, N] (scales and bias
    # are applied once, by the reduce kernel). rn: offs_n clamped to N - 1 (in-bounds columns).
    om = offs_m[:, None]
    on = offs_n[None, :]
    mask = (om < M) & (on < N)
    if SPLIT:
        tl.store(ws_ptr + (pid_k * M + om) * N + on, res, mask=mask)
    else:
        if HAS_SCALES:  # fp8: (acc * x_scale) * w_scale, the reference's order
            xs = tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0)
            res = res * xs[:, None] * tl.load(wsc_ptr + rn)[None, :]
        if HAS_BIAS:
            res += tl.load(b_ptr + rn).to(tl.float32)[None, :]
        tl.store(out_ptr + om * stride_om + on, res.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])
def _splitk_reduce_kernel(ws_ptr, b_ptr, xs_ptr, wsc_ptr, out_ptr, M, N, stride_om,
                          NUM_PARTS: tl.constexpr, HAS_BIAS: tl.constexpr,
                          HAS_SCALES: tl.constexpr, BLOCK: tl.constexpr):
    # ws: [NUM_PARTS, M, N] fp32 -> out: [M, N]; grid: (cdiv(N, BLOCK), M)
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs = pid_n * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(NUM_PARTS):
        acc += tl.load(ws_ptr + (s * M + m) * N + offs, mask=mask, other=0.0)
    if HAS_SCALES:
        acc = acc * tl.load(xs_ptr + m) * tl.load(wsc_ptr + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---- small-M kernels --------------------------------------------------------------------------
@triton.jit(do_not_specialize=["M", "magic"])
def _int4_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, M, N, K, stride_xm,
                      stride_om, group_size, k_per_split, magic,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      SPLIT: tl.constexpr, USE_DOT: tl.constexpr, SWAP_AB: tl.constexpr,
                      HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, STAGES: tl.constexpr):
    # x: [M, K]; qweight: [K // 8, N] int32; scales, zeros: [ceil(K / G), N]; out: [M, N]
    # grid: (cdiv(N, BLOCK_N), K splits); k_per_split is a multiple of BLOCK_K.
    # magic: 0x4B000000 (fp32 2**23) passed at run time, so that it sits in a register and
    # "(p & mask) | magic" is one LOP3 (an instruction takes one immediate)
    R: tl.constexpr = BLOCK_K // 8  # packed rows per tile
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # qweight rows are contiguous along N: mask the columns (clamping them would hide the
    # contiguity that vectorizes the loads); N % 16 == 0 keeps the masked loads 16-byte wide
    mask_n = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_r = tl.arange(0, R)
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = pid_k * k_per_split
    num_iters = tl.cdiv(tl.minimum(K - k_lo, k_per_split), BLOCK_K)
    if USE_DOT and SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    elif USE_DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    elif BLOCK_M == 1:
        acc = tl.zeros([R, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, R, BLOCK_N], dtype=tl.float32)
    for it in tl.range(0, num_iters, num_stages=STAGES):
        k0 = k_lo + it * BLOCK_K
        rows = k0 // 8 + offs_r  # [R] packed rows of this tile
        kmask = rows < K // 8
        p_ptrs = qw_ptr + rows.to(tl.int64)[:, None] * N + offs_n[None, :]  # [R, BLOCK_N]
        if EVEN_K:
            pmask = mask_n[None, :]
        else:  # rows past K load 0 (and zero scales); their x is 0, so they add nothing
            pmask = kmask[:, None] & mask_n[None, :]
        p = tl.load(p_ptrs, mask=pmask, other=0, eviction_policy="evict_first")
        if USE_DOT:
            # one group per tile (host guarantee): scale and zero are [BLOCK_N] vectors
            g = k0 // group_size
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            zc = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            # w: [BLOCK_N, BLOCK_K] = (q - z) * s rounded once to x's dtype, as the reference;
            # 2**23 comes off first (exact), since zeros may be fractional (HQQ-refined)
            w = (((_unpack_int4_nk(p, magic) - 8388608.0) - zc[:, None]) * s[:, None])
            w = w.to(x_ptr.dtype.element_ty)
            x = _load_x_tile(x_ptr, offs_m, mask_m, k0 + offs_k, K, stride_xm, BLOCK_M, EVEN_K)
            if SWAP_AB:  # [BLOCK_N, BLOCK_K] @ [BLOCK_K, 16]
                acc = tl.dot(w, tl.trans(x), acc)
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        else:
            # each packed row (8 consecutive k) lies in one group: its own scale and zero (the
            # rows of one group hit the same lines in L1)
            gp = (rows // (group_size // 8)).to(tl.int64)[:, None] * N + offs_n[None, :]
            s = tl.load(s_ptr + gp, mask=pmask, other=0.0).to(tl.float32)  # [R, BLOCK_N]
            z = tl.load(z_ptr + gp, mask=pmask, other=0.0).to(tl.float32)
            # t[r, n] = sum_j x[k0 + 8r + j] * q_j - z * sum_j x[k0 + 8r + j]: per nibble one
            # LOP3 (nibble j masked in place, OR 2**23), one FADD (-2**23: exact q_j * 16**j) and
            # one FFMA with x_j / 16**j (exact); nibbles 5..7 come from the word shifted by 12
            ph = p >> 12
            if BLOCK_M == 1:
                t = tl.zeros([R, BLOCK_N], dtype=tl.float32)
                xsum = tl.zeros([R], dtype=tl.float32)
            else:
                t = tl.zeros([BLOCK_M, R, BLOCK_N], dtype=tl.float32)
                xsum = tl.zeros([BLOCK_M, R], dtype=tl.float32)
            for j in tl.static_range(8):
                if j < 5:
                    f = ((p & (0xF << (4 * j))) | magic).to(tl.float32, bitcast=True)
                else:
                    f = ((ph & (0xF << (4 * j - 12))) | magic).to(tl.float32, bitcast=True)
                f = f - 8388608.0  # [R, BLOCK_N]: q_j * 2**sh, sh = 4j (or 4j - 12)
                inv = 1.0 / (1 << (4 * j - 12 * (j >= 5)))  # 2**-sh
                if BLOCK_M == 1:
                    if EVEN_K:
                        xj = tl.load(x_ptr + rows * 8 + j).to(tl.float32)  # [R]
                    else:
                        xj = tl.load(x_ptr + rows * 8 + j, mask=kmask, other=0.0).to(tl.float32)
                    xsum += xj
                    t += (xj * inv)[:, None] * f
                else:
                    xj = tl.load(x_ptr + offs_m[:, None] * stride_xm + rows[None, :] * 8 + j,
                                 mask=mask_m[:, None] & kmask[None, :],
                                 other=0.0).to(tl.float32)  # [BLOCK_M, R]
                    xsum += xj
                    t += (xj * inv)[:, :, None] * f[None, :, :]
            if BLOCK_M == 1:
                acc += (t - z * xsum[:, None]) * s
            else:
                acc += (t - z[None, :, :] * xsum[:, :, None]) * s[None, :, :]
    if USE_DOT and SWAP_AB:
        res = tl.trans(acc)
    elif USE_DOT:
        res = acc
    elif BLOCK_M == 1:
        res = tl.sum(acc, axis=0)[None, :]
    else:
        res = tl.sum(acc, axis=1)
    _gemv_epilogue(res, offs_m, offs_n, tl.minimum(offs_n, N - 1), M, N, pid_k, out_ptr,
                   stride_om, ws_ptr, b_ptr, b_ptr, b_ptr, SPLIT, HAS_BIAS, False)


@triton.jit(do_not_specialize=["M"])
def _int8_gemv_kernel(x_ptr, qw_ptr, s_ptr, b_ptr, out_ptr, ws_ptr, M, N, K, stride_xm,
                      stride_wn, stride_sn, stride_om, group_size, k_per_split,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GB: tl.constexpr, SPLIT: tl.constexpr, USE_DOT: tl.constexpr,
                      SWAP_AB: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                      STAGES: tl.constexpr):
    # x: [M, K]; qweight: [N, K] int8; scales: [N, ceil(K / G)]; out: [M, N]
    # grid: (cdiv(N, BLOCK_N), K splits). A BLOCK_K tile is BLOCK_K // GB sub-tiles of GB
    # columns, each inside one group (GB == BLOCK_K on the dot path)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = tl.minimum(offs_n, N - 1)  # rows past N re-read row N-1 (never stored): no masks
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    k_lo = pid_k * k_per_split
    num_iters = tl.cdiv(tl.minimum(K - k_lo, k_per_split), BLOCK_K)
    if USE_DOT:
        offs_k = tl.arange(0, BLOCK_K)
        w_rows = qw_ptr + rn.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
        s_rows = s_ptr + rn.to(tl.int64) * stride_sn  # [BLOCK_N]
        if SWAP_AB:
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        # FMA at M = 1: [BLOCK_N, GPB, GB] tiles, x: [1, GPB, GB] (vector loads along K; each
        # thread's K columns lie in one group, so it loads one scale per row)
        tl.static_assert(BLOCK_M == 1, "the int8 FMA path serves M = 1")
        GPB: tl.constexpr = BLOCK_K // GB
        offs_g = tl.arange(0, GPB)
        offs_k3 = offs_g[None, :, None] * GB + tl.arange(0, GB)[None, None, :]  # [1, GPB, GB]
        w_rows = qw_ptr + rn.to(tl.int64)[:, None, None] * stride_wn  # [BLOCK_N, 1, 1]
        s_rows = s_ptr + rn.to(tl.int64)[:, None, None] * stride_sn
        acc = tl.zeros([BLOCK_N, GPB, GB], dtype=tl.float32)
    for it in tl.range(0, num_iters, num_stages=STAGES):
        k0 = k_lo + it * BLOCK_K
        if USE_DOT:
            kk = k0 + offs_k
            if EVEN_K:
                q = tl.load(w_rows + kk[None, :], eviction_policy="evict_first")
            else:
                q = tl.load(w_rows + kk[None, :], mask=(kk < K)[None, :], other=0,
                            eviction_policy="evict_first")
            s = tl.load(s_rows + k0 // group_size).to(tl.float32)  # [BLOCK_N]
            # w: [BLOCK_N, BLOCK_K] = q * s rounded once to x's dtype, as the reference
            w = (_int8_to_f32(q) * s[:, None]).to(x_ptr.dtype.element_ty)
            x = _load_x_tile(x_ptr, offs_m, mask_m, kk, K, stride_xm, BLOCK_M, EVEN_K)
            if SWAP_AB:
                acc = tl.dot(w, tl.trans(x), acc)
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        else:
            kk3 = k0 + offs_k3
            kg = (k0 + offs_g * GB)[None, :, None]  # [1, GPB, 1]: each sub-tile's first column
            if EVEN_K:
                s = tl.load(s_rows + kg // group_size)  # [BLOCK_N, GPB, 1]
                q = tl.load(w_rows + kk3, eviction_policy="evict_first")
                x = tl.load(x_ptr + kk3)
            else:  # sub-tiles past K: no scale to read (past the last group)
                s = tl.load(s_rows + kg // group_size, mask=kg < K, other=0.0)
                q = tl.load(w_rows + kk3, mask=kk3 < K, other=0, eviction_policy="evict_first")
                x = tl.load(x_ptr + kk3, mask=kk3 < K, other=0.0)
            acc += (_int8_to_f32(q) * s.to(tl.float32)) * x.to(tl.float32)
    if USE_DOT and SWAP_AB:
        res = tl.trans(acc)
    elif USE_DOT:
        res = acc
    else:
        res = tl.sum(tl.sum(acc, axis=2), axis=1)[None, :]
    _gemv_epilogue(res, offs_m, offs_n, rn, M, N, pid_k, out_ptr, stride_om, ws_ptr, b_ptr,
                   b_ptr, b_ptr, SPLIT, HAS_BIAS, False)


@triton.jit(do_not_specialize=["M"])
def _fp8_gemv_kernel(xq_ptr, xs_ptr, w_ptr, wsc_ptr, b_ptr, out_ptr, ws_ptr, M, N, K,
                     stride_xm, stride_wn, stride_om, k_per_split,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SPLIT: tl.constexpr, USE_DOT: tl.constexpr, SWAP_AB: tl.constexpr,
                     HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, STAGES: tl.constexpr):
    # xq: [M, K] e4m3, xs: [M] fp32; weight: [N, K] e4m3, weight_scale: [N] fp32; out: [M, N]
    # grid: (cdiv(N, BLOCK_N), K splits). The e4m3 products are exact in fp32.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = tl.minimum(offs_n, N - 1)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = pid_k * k_per_split
    num_iters = tl.cdiv(tl.minimum(K - k_lo, k_per_split), BLOCK_K)
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    if USE_DOT and SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    elif USE_DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    elif BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for it in tl.range(0, num_iters, num_stages=STAGES):
        kk = k_lo + it * BLOCK_K + offs_k
        if EVEN_K:
            w = tl.load(w_rows + kk[None, :], eviction_policy="evict_first")
        else:
            w = tl.load(w_rows + kk[None, :], mask=(kk < K)[None, :], other=0.0,
                        eviction_policy="evict_first")
        x = _load_x_tile(xq_ptr, offs_m, mask_m, kk, K, stride_xm, BLOCK_M, EVEN_K)
        if USE_DOT and SWAP_AB:  # e4m3 x e4m3 on the tensor cores, fp32 accumulation
            acc = tl.dot(w, tl.trans(x), acc)
        elif USE_DOT:
            acc = tl.dot(x, tl.trans(w), acc)
        elif BLOCK_M == 1:
            acc += w.to(tl.float32) * x.to(tl.float32)
        else:
            acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    if USE_DOT and SWAP_AB:
        res = tl.trans(acc)
    elif USE_DOT:
        res = acc
    elif BLOCK_M == 1:
        res = tl.sum(acc, axis=1)[None, :]
    else:
        res = tl.sum(acc, axis=2)
    _gemv_epilogue(res, offs_m, offs_n, rn, M, N, pid_k, out_ptr, stride_om, ws_ptr, b_ptr,
                   xs_ptr, wsc_ptr, SPLIT, HAS_BIAS, True)


@triton.jit(do_not_specialize=["M"])
def _fp8_quant_kernel(x_ptr, xq_ptr, xs_ptr, M, K, stride_xm, BLOCK: tl.constexpr,
                      ONE_PASS: tl.constexpr):
    # x: [M, K] -> xq: [M, K] e4m3 (contiguous), xs: [M] fp32; grid: (M,). ONE_PASS: the row
    # fits one BLOCK and stays in registers between the max and the quantization.
    m = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    row = x_ptr + m.to(tl.int64) * stride_xm
    qrow = xq_ptr + m.to(tl.int64) * K
    if ONE_PASS:
        xf = tl.load(row + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(xf), axis=0)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            v = tl.load(row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        amax = tl.max(amax, axis=0)
    # scale = max(amax * fp32(1/448), 1e-12) and x / scale with IEEE division, as the reference
    scale = tl.maximum(amax * 0.002232142857142857, 1e-12)
    tl.store(xs_ptr + m, scale)
    if ONE_PASS:
        v = tl.minimum(tl.maximum(tl.math.div_rn(xf, scale), -448.0), 448.0)
        tl.store(qrow + offs, _round_to_e4m3(v).to(xq_ptr.dtype.element_ty), mask=offs < K)
    else:
        for k0 in range(0, K, BLOCK):
            xf = tl.load(row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            v = tl.minimum(tl.maximum(tl.math.div_rn(xf, scale), -448.0), 448.0)
            tl.store(qrow + k0 + offs, _round_to_e4m3(v).to(xq_ptr.dtype.element_ty),
                     mask=k0 + offs < K)


# ---- large-M kernels --------------------------------------------------------------------------
@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # 1-D grid -> (pid_m, pid_n), GROUP_M row tiles per column sweep so W tiles are reused from L2
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _gemm_store(acc, pid_m, pid_n, M, N, out_ptr, stride_om, b_ptr, xs_ptr, wsc_ptr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWAP_AB: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_SCALES: tl.constexpr):
    # acc: [BLOCK_M, BLOCK_N] fp32, or [BLOCK_N, BLOCK_M] with SWAP_AB
    if SWAP_AB:
        acc = tl.trans(acc)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    if HAS_SCALES:
        xs = tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0)
        acc = acc * xs[:, None] * tl.load(wsc_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["M", "magic"])
def _int4_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, M, N, K, stride_xm,
                      stride_om, group_size, magic,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr, HAS_BIAS: tl.constexpr,
                      EVEN_K: tl.constexpr, STAGES: tl.constexpr):
    # x: [M, K]; qweight: [K // 8, N] int32; scales, zeros: [ceil(K / G), N]; out: [M, N]
    # grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),); each BLOCK_K tile lies in one group
    R: tl.constexpr = BLOCK_K // 8
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = tl.minimum(offs_m, M - 1)  # rows past M re-read row M-1 (never stored)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N  # masked, not clamped: qweight rows are contiguous along N
    offs_r = tl.arange(0, R)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm  # [BLOCK_M, 1]
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        rows = k0 // 8 + offs_r
        kk = k0 + offs_k
        p_ptrs = qw_ptr + rows.to(tl.int64)[:, None] * N + offs_n[None, :]
        if EVEN_K:
            p = tl.load(p_ptrs, mask=mask_n[None, :], other=0)
            x = tl.load(x_rows + kk[None, :])
        else:
            p = tl.load(p_ptrs, mask=(rows < K // 8)[:, None] & mask_n[None, :], other=0)
            x = tl.load(x_rows + kk[None, :], mask=(kk < K)[None, :], other=0.0)
        g = k0 // group_size
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        zc = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        w = (((_unpack_int4_nk(p, magic) - 8388608.0) - zc[:, None]) * s[:, None])
        w = w.to(x_ptr.dtype.element_ty)  # [BLOCK_N, BLOCK_K]
        if SWAP_AB:
            acc = tl.dot(w, tl.trans(x), acc)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    _gemm_store(acc, pid_m, pid_n, M, N, out_ptr, stride_om, b_ptr, b_ptr, b_ptr,
                BLOCK_M, BLOCK_N, SWAP_AB, HAS_BIAS, False)


@triton.jit(do_not_specialize=["M"])
def _int8_gemm_kernel(x_ptr, qw_ptr, s_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn,
                      stride_sn, stride_om, group_size,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr, HAS_BIAS: tl.constexpr,
                      EVEN_K: tl.constexpr, STAGES: tl.constexpr):
    # x: [M, K]; qweight: [N, K] int8; scales: [N, ceil(K / G)]; out: [M, N]
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = tl.minimum(pid_m * BLOCK_M + tl.arange(0, BLOCK_M), M - 1)
    rn = tl.minimum(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), N - 1)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    w_rows = qw_ptr + rn.to(tl.int64)[:, None] * stride_wn
    s_rows = s_ptr + rn.to(tl.int64) * stride_sn
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        kk = k0 + offs_k
        if EVEN_K:
            q = tl.load(w_rows + kk[None, :])
            x = tl.load(x_rows + kk[None, :])
        else:
            q = tl.load(w_rows + kk[None, :], mask=(kk < K)[None, :], other=0)
            x = tl.load(x_rows + kk[None, :], mask=(kk < K)[None, :], other=0.0)
        s = tl.load(s_rows + k0 // group_size).to(tl.float32)
        w = (_int8_to_f32(q) * s[:, None]).to(x_ptr.dtype.element_ty)  # [BLOCK_N, BLOCK_K]
        if SWAP_AB:
            acc = tl.dot(w, tl.trans(x), acc)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    _gemm_store(acc, pid_m, pid_n, M, N, out_ptr, stride_om, b_ptr, b_ptr, b_ptr,
                BLOCK_M, BLOCK_N, SWAP_AB, HAS_BIAS, False)


@triton.jit(do_not_specialize=["M"])
def _fp8_gemm_kernel(xq_ptr, xs_ptr, w_ptr, wsc_ptr, b_ptr, out_ptr, M, N, K, stride_xm,
                     stride_wn, stride_om,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr, HAS_BIAS: tl.constexpr,
                     EVEN_K: tl.constexpr, STAGES: tl.constexpr):
    # xq: [M, K] e4m3, xs: [M] fp32; weight: [N, K] e4m3, weight_scale: [N] fp32; out: [M, N]
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = tl.minimum(pid_m * BLOCK_M + tl.arange(0, BLOCK_M), M - 1)
    rn = tl.minimum(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), N - 1)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = xq_ptr + rm.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        kk = k0 + offs_k
        if EVEN_K:
            w = tl.load(w_rows + kk[None, :])
            x = tl.load(x_rows + kk[None, :])
        else:
            w = tl.load(w_rows + kk[None, :], mask=(kk < K)[None, :], other=0.0)
            x = tl.load(x_rows + kk[None, :], mask=(kk < K)[None, :], other=0.0)
        if SWAP_AB:
            acc = tl.dot(w, tl.trans(x), acc)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    _gemm_store(acc, pid_m, pid_n, M, N, out_ptr, stride_om, b_ptr, xs_ptr, wsc_ptr,
                BLOCK_M, BLOCK_N, SWAP_AB, HAS_BIAS, True)


# ---- host side --------------------------------------------------------------------------------
def use_quant_kernel(x: torch.Tensor) -> bool:
    """True where the Triton kernels run: CUDA bf16/fp16 activations (elsewhere use ref.py)."""
    return x.is_cuda and x.dtype in _DTYPES


def _fp8_supported(device: torch.device) -> bool:
    # e4m3 loads, casts and MMAs need sm_89+ in Triton; the CPU (interpreter) emulates them
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)


def _flatten(x: torch.Tensor, k: int, what: str) -> torch.Tensor:
    if x.shape[-1] != k:
        raise ValueError(f"{what}: x has K={x.shape[-1]} but the weight has K={k}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"{what} takes bf16/fp16 x, got {x.dtype}; use the reference otherwise")
    x2 = x.reshape(-1, k)  # [M, K]
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _check_vec(t: Optional[torch.Tensor], n: int, dtype: torch.dtype, name: str) -> None:
    if t is not None and (t.shape != (n,) or t.dtype != dtype):
        raise ValueError(f"{name} must be [{n}] {dtype}, got {tuple(t.shape)} {t.dtype}")


def _check_group(k: int, group_size: int) -> None:
    # ceil(K / G) groups, the last one shorter when G does not divide K (ref.py's layout)
    if group_size <= 0 or (group_size % 8 and group_size < k):
        raise ValueError(f"group_size must be a multiple of 8 (or >= K={k}), got {group_size}")


def _gemv_launch_dims(cfg: QGemvConfig, m: int, n: int, k: int) -> tuple[int, int, bool]:
    """-> (splits, k_per_split, even_k) for the GEMV grid (cdiv(n, block_n), splits)."""
    nk_blocks = triton.cdiv(k, cfg.block_k)
    split = max(1, min(cfg.split_k, nk_blocks))
    k_per_split = triton.cdiv(nk_blocks, split) * cfg.block_k
    split = triton.cdiv(k, k_per_split)  # no empty splits
    return split, k_per_split, k % cfg.block_k == 0


def _splitk_workspace(split: int, m: int, n: int, out: torch.Tensor) -> torch.Tensor:
    if split == 1:
        return out  # unused
    return torch.empty((split, m, n), dtype=torch.float32, device=out.device)


def _reduce(ws, split, out, bias, xs=None, wsc=None) -> None:
    m, n = out.shape
    b = bias if bias is not None else out
    block = 1024
    _splitk_reduce_kernel[(triton.cdiv(n, block), m)](
        ws, b, xs if xs is not None else ws, wsc if wsc is not None else ws, out, m, n,
        out.stride(0), NUM_PARTS=split, HAS_BIAS=bias is not None, HAS_SCALES=xs is not None,
        BLOCK=block, num_warps=4)


def _int8_sub_tile(block_k: int, k: int, group_size: int) -> int:
    """GB of the int8 GEMV: the BLOCK_K tile is split into sub-tiles of GB columns, each inside
    one group."""
    if group_size >= k or group_size % block_k == 0:
        return block_k
    if block_k % group_size == 0:
        return group_size
    raise ValueError(f"int8: block_k={block_k} must divide group_size={group_size} or be a "
                     f"multiple of it")


def _gemm_grid(cfg: QGemmConfig, m: int, n: int) -> tuple[int]:
    return (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)


def _check_tile_in_group(block_k: int, k: int, group_size: int, what: str) -> None:
    if group_size < k and group_size % block_k:
        raise ValueError(f"{what}: block_k={block_k} tiles must lie inside one group of "
                         f"{group_size}")


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor, group_size: int, bias: Optional[torch.Tensor] = None,
                config: Optional[QConfig] = None) -> torch.Tensor:
    """x: [M, K] (or [..., K]) bf16/fp16; qweight: int32 [K // 8, N]; scales, zeros:
    [ceil(K / G), N] in x's dtype; bias: [N] -> [M, N] in x's dtype (= ref.int4_linear_ref up
    to fp32 summation order; the M = 1 FMA path does not round w to x's dtype, the others do,
    as the reference). ``config`` (QGemvConfig for M <= 16, or QGemmConfig) overrides the
    selection."""
    if qweight.dim() != 2 or qweight.dtype != torch.int32:
        raise ValueError(f"qweight must be int32 [K // 8, N], got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    x2 = _flatten(x, k, "int4_linear")
    _check_group(k, group_size)
    groups = ref.num_groups(k, group_size)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t.shape != (groups, n) or t.dtype != x.dtype:
            raise ValueError(f"{name} must be [{groups}, {n}] {x.dtype}, got "
                             f"{tuple(t.shape)} {t.dtype}")
    _check_vec(bias, n, x.dtype, "bias")
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    bias = bias.contiguous() if bias is not None else None
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    lead = x.shape[:-1]
    if m == 0 or n == 0:
        return out.view(*lead, n)
    b = bias if bias is not None else out
    cfg = config
    if cfg is None:
        cfg = (select_gemv_config if m <= MAX_M else select_gemm_config)("int4", m, n, k,
                                                                         group_size)
    if getattr(cfg, "use_dot", True) and group_size < k and _pow2_part(group_size) < 16:
        # a dot tile can't fit inside such a group (e.g. G=8): the reference
        return ref.int4_linear_ref(x2, qweight, scales, zeros, group_size, bias).view(*lead, n)
    if isinstance(cfg, QGemvConfig):
        if m > MAX_M:
            raise ValueError(f"a QGemvConfig serves M <= {MAX_M}, got M={m}")
        if cfg.use_dot:
            _check_tile_in_group(cfg.block_k, k, group_size, "int4 dot path")
        split, k_per_split, even_k = _gemv_launch_dims(cfg, m, n, k)
        ws = _splitk_workspace(split, m, n, out)
        _int4_gemv_kernel[(triton.cdiv(n, cfg.block_n), split)](
            x2, qweight, scales, zeros, b, out, ws, m, n, k, x2.stride(0), out.stride(0),
            group_size, k_per_split, _F32_2POW23_BITS,
            BLOCK_M=cfg.block_m(m), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT=split > 1,
            USE_DOT=cfg.use_dot, SWAP_AB=cfg.swap_ab, HAS_BIAS=bias is not None,
            EVEN_K=even_k, STAGES=cfg.num_stages, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)
        if split > 1:
            _reduce(ws, split, out, bias)
    else:
        _check_tile_in_group(cfg.block_k, k, group_size, "int4 GEMM")
        _int4_gemm_kernel[_gemm_grid(cfg, m, n)](
            x2, qweight, scales, zeros, b, out, m, n, k, x2.stride(0), out.stride(0), group_size,
            _F32_2POW23_BITS,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            SWAP_AB=cfg.swap_ab, HAS_BIAS=bias is not None, EVEN_K=k % cfg.block_k == 0,
            STAGES=cfg.num_stages, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out.view(*lead, n)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                bias: Optional[torch.Tensor] = None,
                config: Optional[QConfig] = None) -> torch.Tensor:
    """x: [M, K] (or [..., K]) bf16/fp16; qweight: int8 [N, K]; scales: [N, ceil(K / G)] in x's
    dtype;
    bias: [N] -> [M, N] in x's dtype (= ref.int8_linear_ref up to fp32 summation order)."""
    if qweight.dim() != 2 or qweight.dtype != torch.int8:
        raise ValueError(f"qweight must be int8 [N, K], got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    n, k = qweight.shape
    x2 = _flatten(x, k, "int8_linear")
    _check_group(k, group_size)
    groups = ref.num_groups(k, group_size)
    if scales.shape != (n, groups) or scales.dtype != x.dtype:
        raise ValueError(f"scales must be [{n}, {groups}] {x.dtype}, got "
                         f"{tuple(scales.shape)} {scales.dtype}")
    _check_vec(bias, n, x.dtype, "bias")
    qweight, scales = qweight.contiguous(), scales.contiguous()
    bias = bias.contiguous() if bias is not None else None
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    lead = x.shape[:-1]
    if m == 0 or n == 0:
        return out.view(*lead, n)
    b = bias if bias is not None else out
    cfg = config
    if cfg is None:
        cfg = (select_gemv_config if m <= MAX_M else select_gemm_config)("int8", m, n, k,
                                                                         group_size)
    if isinstance(cfg, QGemvConfig) and not cfg.use_dot and m > 1:
        raise ValueError(f"the int8 FMA path (use_dot=False) serves M = 1, got M={m}")
    use_dot = not isinstance(cfg, QGemvConfig) or cfg.use_dot
    if use_dot and group_size < k and _pow2_part(group_size) < 16:
        # a dot tile can't fit inside such a group (e.g. G=8): the reference
        return ref.int8_linear_ref(x2, qweight, scales, group_size, bias).view(*lead, n)
    if use_dot:
        _check_tile_in_group(cfg.block_k, k, group_size, "int8 dot path")
    if isinstance(cfg, QGemvConfig):
        if m > MAX_M:
            raise ValueError(f"a QGemvConfig serves M <= {MAX_M}, got M={m}")
        split, k_per_split, even_k = _gemv_launch_dims(cfg, m, n, k)
        ws = _splitk_workspace(split, m, n, out)
        _int8_gemv_kernel[(triton.cdiv(n, cfg.block_n), split)](
            x2, qweight, scales, b, out, ws, m, n, k, x2.stride(0), qweight.stride(0),
            scales.stride(0), out.stride(0), group_size, k_per_split,
            BLOCK_M=cfg.block_m(m), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            GB=_int8_sub_tile(cfg.block_k, k, group_size), SPLIT=split > 1,
            USE_DOT=cfg.use_dot, SWAP_AB=cfg.swap_ab, HAS_BIAS=bias is not None,
            EVEN_K=even_k, STAGES=cfg.num_stages, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)
        if split > 1:
            _reduce(ws, split, out, bias)
    else:
        _int8_gemm_kernel[_gemm_grid(cfg, m, n)](
            x2, qweight, scales, b, out, m, n, k, x2.stride(0), qweight.stride(0),
            scales.stride(0), out.stride(0), group_size,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            SWAP_AB=cfg.swap_ab, HAS_BIAS=bias is not None, EVEN_K=k % cfg.block_k == 0,
            STAGES=cfg.num_stages, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out.view(*lead, n)


def fp8_quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] bf16/fp16/fp32 -> (xq e4m3 [M, K], x_scale fp32 [M]), bit-identical to
    ref.quantize_fp8_per_token; one program per row."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [M, K] with a contiguous last dim, got {tuple(x.shape)}")
    m, k = x.shape
    xq = torch.empty((m, k), dtype=ref.FP8_DTYPE, device=x.device)
    xs = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return xq, xs
    # rows up to 16K elements stay in registers (one load); longer ones are read twice
    block = min(16384, max(16, triton.next_power_of_2(k)))
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    _fp8_quant_kernel[(m,)](x, xq, xs, m, k, x.stride(0), BLOCK=block, ONE_PASS=block >= k,
                            num_warps=warps)
    return xq, xs


def _use_scaled_mm(x: torch.Tensor, n: int, k: int) -> bool:
    # cuBLAS/CUTLASS row-wise fp8: bf16 output (fp16 only with recent cuBLAS), dims % 16
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_scaled_mm")
            and n % 16 == 0 and k % 16 == 0)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: Optional[torch.Tensor] = None,
               config: Optional[QConfig] = None) -> torch.Tensor:
    """x: [M, K] (or [..., K]) bf16/fp16; weight: float8_e4m3fn [N, K]; weight_scale: fp32 [N];
    bias: [N] -> [M, N] in x's dtype (= ref.fp8_linear_ref up to fp32 summation order). x is
    quantized per token by fp8_quantize_per_token. M <= 16: the fp8 GEMV; larger M:
    torch._scaled_mm for bf16 (a QGemmConfig forces the Triton GEMM). On GPUs older than sm_89
    (no e4m3 in Triton) the reference runs."""
    if weight.dim() != 2 or weight.dtype != ref.FP8_DTYPE:
        raise ValueError(f"weight must be float8_e4m3fn [N, K], got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    n, k = weight.shape
    x2 = _flatten(x, k, "fp8_linear")
    _check_vec(weight_scale, n, torch.float32, "weight_scale")
    _check_vec(bias, n, x.dtype, "bias")
    weight, weight_scale = weight.contiguous(), weight_scale.contiguous()
    bias = bias.contiguous() if bias is not None else None
    m = x2.shape[0]
    lead = x.shape[:-1]
    if not _fp8_supported(x.device):
        return ref.fp8_linear_ref(x2, weight, weight_scale, bias).view(*lead, n)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.view(*lead, n)
    xq, xs = fp8_quantize_per_token(x2)
    b = bias if bias is not None else out
    cfg = config
    if cfg is None and m > MAX_M and _use_scaled_mm(x, n, k):
        # weight.t(): [K, N] column-major, as _scaled_mm wants its second operand
        return torch._scaled_mm(xq, weight.t(), scale_a=xs.view(m, 1),
                                scale_b=weight_scale.view(1, n), bias=bias,
                                out_dtype=x.dtype).view(*lead, n)
    if cfg is None:
        cfg = (select_gemv_config if m <= MAX_M else select_gemm_config)("fp8", m, n, k)
    if isinstance(cfg, QGemvConfig):
        if m > MAX_M:
            raise ValueError(f"a QGemvConfig serves M <= {MAX_M}, got M={m}")
        split, k_per_split, even_k = _gemv_launch_dims(cfg, m, n, k)
        ws = _splitk_workspace(split, m, n, out)
        _fp8_gemv_kernel[(triton.cdiv(n, cfg.block_n), split)](
            xq, xs, weight, weight_scale, b, out, ws, m, n, k, xq.stride(0), weight.stride(0),
            out.stride(0), k_per_split,
            BLOCK_M=cfg.block_m(m), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT=split > 1,
            USE_DOT=cfg.use_dot, SWAP_AB=cfg.swap_ab, HAS_BIAS=bias is not None,
            EVEN_K=even_k, STAGES=cfg.num_stages, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)
        if split > 1:
            _reduce(ws, split, out, bias, xs, weight_scale)
    else:
        _fp8_gemm_kernel[_gemm_grid(cfg, m, n)](
            xq, xs, weight, weight_scale, b, out, m, n, k, xq.stride(0), weight.stride(0),
            out.stride(0),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            SWAP_AB=cfg.swap_ab, HAS_BIAS=bias is not None, EVEN_K=k % cfg.block_k == 0,
            STAGES=cfg.num_stages, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out.view(*lead, n)


# ---- warmup -----------------------------------------------------------------------------------
def _warm_n(n: int) -> int:
    """A small column count that Triton specializes like n (divisible by 16 or not, never 1)."""
    return n if n <= 64 else 48 + n % 16


def _gemv_buckets(method: str, n: int, k: int, group_size: int) -> list[int]:
    """One M per distinct small-M config (configs depend on M only through these buckets)."""
    seen, ms = set(), []
    for m in range(1, MAX_M + 1):
        cfg = select_gemv_config(method, m, n, k, group_size)
        key = (cfg, cfg.block_m(m))
        if key not in seen:
            seen.add(key)
            ms.append(m)
    return ms


def warmup_quant_matmul(shapes: Iterable[Sequence], dtype: torch.dtype,
                        device: torch.device | str, large_ms: Sequence[int] = (64, 256)) -> None:
    """Compiles the kernels that the given layers use at M = 1..16 and at the large Ms, so that
    later calls (e.g. under CUDA-graph capture) never JIT. ``shapes``: (method, N, K[, group_size
    [, has_bias]]) with method in ("int4", "int8", "fp8"); group_size is ignored for fp8.
    Runs on a few weight columns/rows: no large allocation (large Ms allocate [M, K] x)."""
    dev = torch.device(device)
    for shape in shapes:
        method, n, k = str(shape[0]), int(shape[1]), int(shape[2])
        g = int(shape[3]) if len(shape) > 3 and shape[3] else k
        has_bias = bool(shape[4]) if len(shape) > 4 else False
        wn = _warm_n(n)
        b = torch.randn(wn, device=dev).to(dtype) if has_bias else None
        if method == "int4":
            w = ref.quantize_int4(torch.randn(wn, k, device=dev).to(dtype), g)
            fn = lambda x, c, w=w: int4_linear(x, *w, g, b, config=c)  # noqa: E731
        elif method == "int8":
            w = ref.quantize_int8(torch.randn(wn, k, device=dev).to(dtype), g)
            fn = lambda x, c, w=w: int8_linear(x, *w, g, b, config=c)  # noqa: E731
        elif method == "fp8":
            w = ref.quantize_fp8_per_channel(torch.randn(wn, k, device=dev))
            fn = lambda x, c, w=w: fp8_linear(x, *w, b, config=c)  # noqa: E731
        else:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        for m in _gemv_buckets(method, n, k, g):
            fn(torch.randn(m, k, device=dev).to(dtype), select_gemv_config(method, m, n, k, g))
        for m in large_ms:
            x = torch.randn(m, k, device=dev).to(dtype)
            if method == "fp8" and _use_scaled_mm(x, n, k):
                fn(x, None)  # x's quantization kernel and cuBLAS's first call (n as given)
            else:
                fn(x, select_gemm_config(method, m, n, k, g))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
