"""Small-M linear layers (decode): ``out = x @ weight.T + bias`` for M = 1..16 tokens.

At batch 1..8 a decode step is bound by streaming the weights once from HBM. Measured on one H100
(benchmarks/gemv_bench.py, back-to-back calls in a CUDA graph): cuBLAS runs one Llama-3-8B layer's
four matmuls + lm_head at 2.5-2.8 TB/s of weight bytes (5.56 ms per token for the 32-layer stack);
these kernels at 2.5-3.16 TB/s (5.10 ms). Each program owns a tile of BLOCK_N weight rows and loops
over K with 16-byte coalesced loads (W is [N, K], K contiguous), accumulating in fp32:

* FMA path (USE_DOT=False; the table uses it at M <= 2, some shapes M <= 4): the products
  accumulate element-wise in a [BLOCK_M, BLOCK_N, BLOCK_K] fp32 register tile, reduced over K
  once at the end (no shuffles in the loop); with num_stages > 1 the weight tiles stream through
  shared memory (cp.async), else straight into registers.
* dot path (USE_DOT=True, any M <= 16): x is padded to 16 rows (masked: no traffic) and ``tl.dot``
  runs on the tensor cores; SWAP_AB computes W @ x.T so that W is the A operand (wgmma on Hopper
  for BLOCK_N >= 64), which won at M = 4..16 on nearly every shape.
* split-K (SPLIT): programs split K too when N alone gives too few programs to fill the
  132 SMs; fp32 partials go to a [SPLIT_K, M, N] workspace (or, ATOMIC, are summed with fp32
  atomics into a zeroed [M, N] one) and a second kernel reduces, adds the bias and rounds.
  Measured: it loses at M=1 on every swept shape (the second launch costs more than it gains);
  partial buffers beat atomics or tie.
* SiLU-and-mul prologue (SILU_MUL, ``linear_small_m(gate_up, w, silu_mul=True)``): x is the
  gate_up projection's [M, 2K] output and each x tile is computed on load as
  ``silu(gate) * up``, rounded as kernels/activation.py rounds it, so the down projection needs
  no separate activation kernel and no [M, K] intermediate; the result equals the unfused pair's
  bit for bit (same tiles, same config). Every program recomputes the activation of the K
  columns it reads (from L2): cheap next to its share of W at M <= 8.

Configs are a pure function of (M, N, K): a table tuned on one H100 for the Llama-3-8B,
Qwen2.5-7B and Llama-3.2-1B shapes, else a heuristic. Nothing is autotuned at call time, so a
call is CUDA-graph capturable once ``warmup_gemv`` has compiled its kernels (allocations depend
on shapes only; no host syncs).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from servelm.kernels.activation import silu_and_mul_ref, silu_mul_rounded

MAX_M = 16
_DTYPES = (torch.bfloat16, torch.float16)


def linear_small_m_ref(x: torch.Tensor, weight: torch.Tensor,
                       bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x: [M, K], weight: [N, K], bias: [N] -> [M, N] (cuBLAS via torch)."""
    return F.linear(x, weight, bias)


def linear_silu_mul_ref(gate_up: torch.Tensor, weight: torch.Tensor,
                        bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """gate_up: [M, 2K] (gate | up), weight: [N, K] -> [M, N] = silu(gate) * up @ weight.T."""
    return F.linear(silu_and_mul_ref(gate_up), weight, bias)


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 1
    use_dot: bool = False
    split_k: int = 1
    atomic: bool = False  # split-K partials summed by fp32 atomics instead of a [S, M, N] buffer
    swap_ab: bool = False  # dot path: W @ x.T (W is the MMA's A operand) instead of x @ W.T

    def block_m(self, m: int) -> int:
        # the dot path pads M to the 16 rows of an MMA tile
        return 16 if self.use_dot else triton.next_power_of_2(max(m, 1))


def _bucket(m: int) -> int:
    return 1 if m <= 1 else 2 if m <= 2 else 4 if m <= 4 else 8 if m <= 8 else 16


# (N, K) -> {M bucket: config}: the fastest of benchmarks/gemv_bench.py --sweep on one H100
# (CUDA-graph timing), for Llama-3-8B, Qwen2.5-7B and Llama-3.2-1B (qkv, o, gate_up, down, lm_head).
# The dot path pads M to 16 rows, so one dot config runs the same kernel at any M <= 16: bucket 16
# reuses bucket 8's winner, and bucket 2 takes bucket 4's where that beat the best FMA tile at M=2.
_C = GemvConfig
_TABLE: dict[tuple[int, int], dict[int, GemvConfig]] = {
    (2048, 2048): {
        1: _C(4, 1024, 4, 1),
        2: _C(4, 512, 4, 3),
        4: _C(64, 128, 4, 6, True, swap_ab=True),
        8: _C(64, 128, 4, 6, True, swap_ab=True),
        16: _C(64, 128, 4, 6, True, swap_ab=True),
    },
    (2048, 8192): {
        1: _C(8, 512, 4, 5),
        2: _C(4, 512, 4, 3),
        4: _C(4, 512, 4, 3),
        8: _C(128, 128, 4, 3, True, split_k=8, swap_ab=True),
        16: _C(128, 128, 4, 3, True, split_k=8, swap_ab=True),
    },
    (3072, 2048): {
        1: _C(4, 1024, 4, 1),
        2: _C(64, 128, 4, 6, True, swap_ab=True),
        4: _C(64, 128, 4, 6, True, swap_ab=True),
        8: _C(64, 128, 4, 6, True, swap_ab=True),
        16: _C(64, 128, 4, 6, True, swap_ab=True),
    },
    (3584, 3584): {
        1: _C(8, 1024, 4, 1),
        2: _C(64, 128, 4, 6, True, swap_ab=True),
        4: _C(64, 128, 4, 6, True, swap_ab=True),
        8: _C(64, 128, 4, 6, True, swap_ab=True),
        16: _C(64, 128, 4, 6, True, swap_ab=True),
    },
    (3584, 18944): {
        1: _C(4, 512, 4, 3),
        2: _C(4, 512, 4, 3),
        4: _C(32, 256, 4, 6, True),
        8: _C(32, 256, 4, 6, True),
        16: _C(32, 256, 4, 6, True),
    },
    (4096, 4096): {
        1: _C(8, 512, 4, 3),
        2: _C(64, 128, 4, 6, True, swap_ab=True),
        4: _C(64, 128, 4, 6, True, swap_ab=True),
        8: _C(64, 128, 4, 6, True, swap_ab=True),
        16: _C(64, 128, 4, 6, True, swap_ab=True),
    },
    (4096, 14336): {
        1: _C(8, 512, 4, 3),
        2: _C(8, 512, 4, 3),
        4: _C(64, 128, 4, 6, True, split_k=2, swap_ab=True),
        8: _C(32, 256, 4, 6, True),
        16: _C(32, 256, 4, 6, True),
    },
    (4608, 3584): {
        1: _C(4, 512, 4, 1),
        2: _C(64, 128, 4, 6, True, swap_ab=True),
        4: _C(64, 128, 4, 6, True, swap_ab=True),
        8: _C(64, 128, 4, 6, True, swap_ab=True),
        16: _C(64, 128, 4, 6, True, swap_ab=True),
    },
    (6144, 4096): {
        1: _C(4, 1024, 4, 1),
        2: _C(64, 128, 4, 6, True, swap_ab=True),
        4: _C(64, 128, 4, 6, True, swap_ab=True),
        8: _C(64, 128, 4, 6, True, swap_ab=True),
        16: _C(64, 128, 4, 6, True, swap_ab=True),
    },
    (16384, 2048): {
        1: _C(4, 1024, 4, 1),
        2: _C(64, 128, 4, 4, True, swap_ab=True),
        4: _C(64, 128, 4, 4, True, swap_ab=True),
        8: _C(64, 128, 4, 4, True, swap_ab=True),
        16: _C(64, 128, 4, 4, True, swap_ab=True),
    },
    (28672, 4096): {
        1: _C(4, 1024, 4, 1),
        2: _C(8, 512, 4, 3),
        4: _C(64, 128, 4, 6, True, swap_ab=True),
        8: _C(64, 128, 4, 6, True, swap_ab=True),
        16: _C(64, 128, 4, 6, True, swap_ab=True),
    },
    (37888, 3584): {
        1: _C(4, 2048, 4, 3),
        2: _C(8, 512, 4, 3),
        4: _C(64, 128, 4, 6, True, swap_ab=True),
        8: _C(64, 128, 4, 6, True, swap_ab=True),
        16: _C(64, 128, 4, 6, True, swap_ab=True),
    },
    (128256, 2048): {
        1: _C(4, 1024, 4, 1),
        2: _C(8, 512, 4, 3),
        4: _C(64, 128, 4, 6, True, swap_ab=True),
        8: _C(64, 128, 4, 6, True, swap_ab=True),
        16: _C(64, 128, 4, 6, True, swap_ab=True),
    },
    (128256, 4096): {
        1: _C(4, 2048, 4, 3),
        2: _C(8, 512, 4, 3),
        4: _C(64, 128, 4, 6, True, swap_ab=True),
        8: _C(64, 128, 4, 6, True, swap_ab=True),
        16: _C(64, 128, 4, 6, True, swap_ab=True),
    },
    (152064, 3584): {
        1: _C(4, 2048, 4, 3),
        2: _C(4, 512, 4, 3),
        4: _C(64, 128, 4, 6, True, swap_ab=True),
        8: _C(64, 128, 4, 6, True, swap_ab=True),
        16: _C(64, 128, 4, 6, True, swap_ab=True),
    },
}


def _heuristic(m: int, n: int, k: int) -> GemvConfig:
    """Shapes outside the table: tiles that were within a few % of the best on every swept shape."""
    if m <= 2:  # FMA path, W streamed through 3 shared-memory stages
        return GemvConfig(block_n=8, block_k=min(512, max(64, triton.next_power_of_2(k))),
                          num_warps=4, num_stages=3)
    cfg = GemvConfig(block_n=64, block_k=128, num_warps=4, num_stages=6, use_dot=True,
                     swap_ab=True)
    # split K when N alone gives fewer programs than SMs, keeping >= 2048 of K per split
    programs = triton.cdiv(n, cfg.block_n)
    split = 1
    while programs * split < 132 and k // (2 * split) >= 2048 and split < 8:
        split *= 2
    return dataclasses.replace(cfg, split_k=split)


def select_config(m: int, n: int, k: int, dtype: torch.dtype = torch.bfloat16) -> GemvConfig:
    """The launch config for x: [m, k] @ weight[n, k].T; deterministic in its arguments."""
    row = _TABLE.get((n, k))
    if row is not None and _bucket(m) in row:
        return row[_bucket(m)]
    return _heuristic(m, n, k)


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, ws_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                 k_per_split,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT: tl.constexpr, USE_DOT: tl.constexpr, ATOMIC: tl.constexpr,
                 HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, STAGES: tl.constexpr,
                 SWAP_AB: tl.constexpr, SILU_MUL: tl.constexpr):
    # grid: (cdiv(N, BLOCK_N), number of K splits); k_per_split is a multiple of BLOCK_K.
    # SILU_MUL: x_ptr holds [M, 2K] (gate | up) and the x tile is silu(gate) * up
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    # rows past N re-read valid rows (never stored), so W loads need no row mask; x rows past M
    # are masked (zero-filled, no memory traffic: the dot path pads M to 16 rows)
    rn = offs_n % N
    mask_m = offs_m < M
    k_lo = pid_k * k_per_split
    num_iters = tl.cdiv(tl.minimum(K - k_lo, k_per_split), BLOCK_K)
    # w_ptrs: [BLOCK_N, BLOCK_K], x_ptrs: [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + (k_lo + offs_k)[None, :]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_lo + offs_k)[None, :]
    if USE_DOT and SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    elif USE_DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    elif BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    # num_stages on the loop itself: Triton 3.6 then pipelines the FMA path's loads through
    # shared memory with cp.async too (the launch option alone pipelines only tl.dot operands)
    for it in tl.range(0, num_iters, num_stages=STAGES):
        if EVEN_K:
            w = tl.load(w_ptrs, eviction_policy="evict_first")
            if SILU_MUL:  # masked rows and columns load 0: silu(0) * 0 = 0
                x = silu_mul_rounded(tl.load(x_ptrs, mask=mask_m[:, None], other=0.0),
                                     tl.load(x_ptrs + K, mask=mask_m[:, None], other=0.0))
            else:
                x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
        else:
            kmask = (k_lo + it * BLOCK_K + offs_k) < K
            w = tl.load(w_ptrs, mask=kmask[None, :], other=0.0, eviction_policy="evict_first")
            xmask = mask_m[:, None] & kmask[None, :]
            if SILU_MUL:
                x = silu_mul_rounded(tl.load(x_ptrs, mask=xmask, other=0.0),
                                     tl.load(x_ptrs + K, mask=xmask, other=0.0))
            else:
                x = tl.load(x_ptrs, mask=xmask, other=0.0)
        if USE_DOT and SWAP_AB:  # W as the MMA's A operand: [BLOCK_N, BLOCK_K] @ [BLOCK_K, 16]
            acc = tl.dot(w, tl.trans(x), acc)
        elif USE_DOT:
            acc = tl.dot(x, tl.trans(w), acc)
        elif BLOCK_M == 1:
            acc += w.to(tl.float32) * x.to(tl.float32)
        else:
            acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    # res: [BLOCK_M, BLOCK_N] fp32
    if USE_DOT and SWAP_AB:
        res = tl.trans(acc)
    elif USE_DOT:
        res = acc
    elif BLOCK_M == 1:
        res = tl.sum(acc, axis=1)[None, :]
    else:
        res = tl.sum(acc, axis=2)
    om = offs_m[:, None]
    on = offs_n[None, :]
    mask = (om < M) & (on < N)
    if not SPLIT:
        if HAS_BIAS:
            res += tl.load(b_ptr + rn).to(tl.float32)[None, :]
        tl.store(out_ptr + om * stride_om + on, res.to(out_ptr.dtype.element_ty), mask=mask)
    elif ATOMIC:
        tl.atomic_add(ws_ptr + om * N + on, res, mask=mask, sem="relaxed")
    else:
        tl.store(ws_ptr + (pid_k * M + om) * N + on, res, mask=mask)


@triton.jit(do_not_specialize=["M"])
def _splitk_reduce_kernel(ws_ptr, b_ptr, out_ptr, M, N, stride_om, NUM_PARTS: tl.constexpr,
                          HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    # ws: [NUM_PARTS, M, N] fp32 -> out: [M, N]; grid: (cdiv(N, BLOCK), M)
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs = pid_n * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(NUM_PARTS):
        acc += tl.load(ws_ptr + (s * M + m) * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
           silu_mul: bool = False) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be [N, K], got shape {tuple(weight.shape)}")
    if silu_mul and x.shape[-1] != 2 * weight.shape[1]:
        raise ValueError(f"silu_mul takes x = gate | up of 2K columns; x has {x.shape[-1]} but "
                         f"weight is {tuple(weight.shape)}")
    if not silu_mul and x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has K={x.shape[-1]} but weight is {tuple(weight.shape)}")
    if x.dtype not in _DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"linear_small_m takes bf16/fp16 x and weight of one dtype, got "
                         f"{x.dtype} and {weight.dtype}; use F.linear otherwise")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be [{weight.shape[0]}] {x.dtype}, got "
                         f"{tuple(bias.shape)} {bias.dtype}")


def linear_small_m(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   out: Optional[torch.Tensor] = None,
                   config: Optional[GemvConfig] = None, silu_mul: bool = False) -> torch.Tensor:
    """x: [M, K] (or [..., K]), weight: [N, K], bias: [N] -> out [M, N] (or [..., N]) in x's dtype.

    For M <= 16 (larger M runs in chunks of 16 rows, each streaming W again: use F.linear there).
    ``out`` ([M, N], contiguous last dim) is written in place when given; ``config`` overrides the
    table (benchmarks, tests). ``silu_mul``: x is [M, 2K] (gate | up, as the gate_up projection
    writes it) and the product is ``silu_and_mul(x) @ weight.T``, bit for bit, in one launch.
    """
    _check(x, weight, bias, silu_mul)
    lead = x.shape[:-1]
    k = weight.shape[1]
    n = weight.shape[0]
    x2 = x.reshape(-1, x.shape[-1])  # x2: [M, K], or [M, 2K] with silu_mul
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(1) != 1:
        raise ValueError("weight must have a contiguous last dim (K)")
    if bias is not None:
        bias = bias.contiguous()
    m = x2.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or out.stride(1) != 1:
        raise ValueError(f"out must be [{m}, {n}] {x.dtype} with a contiguous last dim")
    if m == 0 or n == 0:
        return out.view(*lead, n)
    if m > MAX_M:  # correct but re-streams W per 16 rows: use F.linear for large M
        for i in range(0, m, MAX_M):
            linear_small_m(x2[i:i + MAX_M], weight, bias, out=out[i:i + MAX_M], config=config,
                           silu_mul=silu_mul)
        return out.view(*lead, n)
    if k == 0:
        out.copy_(bias.expand(m, n) if bias is not None else torch.zeros_like(out))
        return out.view(*lead, n)
    cfg = config or select_config(m, n, k, x.dtype)
    bm = cfg.block_m(m)
    nk_blocks = triton.cdiv(k, cfg.block_k)
    split = max(1, min(cfg.split_k, nk_blocks))
    k_per_split = triton.cdiv(nk_blocks, split) * cfg.block_k
    split = triton.cdiv(k, k_per_split)  # no empty splits
    even_k = k % cfg.block_k == 0
    b_arg = bias if bias is not None else out
    grid = (triton.cdiv(n, cfg.block_n), split)
    if split == 1:
        ws = out
    elif cfg.atomic:
        ws = torch.zeros((m, n), dtype=torch.float32, device=x.device)
    else:
        ws = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    _gemv_kernel[grid](
        x2, weight, b_arg, out, ws, m, n, k, x2.stride(0), weight.stride(0), out.stride(0),
        k_per_split,
        BLOCK_M=bm, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT=split > 1,
        USE_DOT=cfg.use_dot, ATOMIC=cfg.atomic, HAS_BIAS=bias is not None, EVEN_K=even_k,
        STAGES=cfg.num_stages, SWAP_AB=cfg.swap_ab, SILU_MUL=silu_mul,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(n, block), m)](
            ws, b_arg, out, m, n, out.stride(0), NUM_PARTS=1 if cfg.atomic else split,
            HAS_BIAS=bias is not None, BLOCK=block, num_warps=4)
    return out.view(*lead, n)


def use_small_m_kernel(m: int, n: int, k: int, dtype: torch.dtype,
                       device: torch.device | str) -> bool:
    """True where linear_small_m beats cuBLAS. Measured on one H100 (benchmarks/gemv_bench.py,
    CUDA-graph timing): at M = 1..8 it was faster on all 15 Llama-3-8B / Qwen2.5-7B /
    Llama-3.2-1B shapes (by 3-30%) but one tie (Llama-3.2-1B down at M=8); M=16 was not measured
    with the final configs."""
    dev = torch.device(device)
    if dev.type != "cuda" or dtype not in _DTYPES:
        return False
    # rows of W must be 16-byte aligned for Triton's vector loads: K a multiple of 16 elements
    return 1 <= m <= 8 and k % 16 == 0 and n >= 256


def _warm_n(n: int) -> int:
    """A small row count that Triton specializes like n (divisible by 16 or not, never 1)."""
    return n if n <= 64 else 48 + n % 16


def warmup_gemv(shapes: Iterable[Sequence], dtype: torch.dtype, device: torch.device | str,
                max_m: int = MAX_M) -> None:
    """Compiles the kernels that (N, K[, has_bias]) shapes use at M = 1..max_m, so that later
    calls (e.g. under CUDA-graph capture) never JIT. Runs on a few weight rows: no large
    allocation."""
    buckets = sorted({_bucket(m) for m in range(1, max_m + 1)})
    for shape in shapes:
        n, k = int(shape[0]), int(shape[1])
        has_bias = bool(shape[2]) if len(shape) > 2 else False
        wn = _warm_n(n)
        w = torch.randn(wn, k, device=device).to(dtype)
        b = torch.randn(wn, device=device).to(dtype) if has_bias else None
        for m in (min(bucket, max_m) for bucket in buckets):
            x = torch.randn(m, k, device=device).to(dtype)
            linear_small_m(x, w, b, config=select_config(m, n, k, dtype))
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
