"""Single C kernels from csrc/decode.c as PyTorch-facing functions: the linear layers' CPU
matmul for small batches (``native_linear``), paged decode attention (``paged_attention``) and
a prompt's causal attention over the paged cache (``causal_attention``, attention/cpu_backend.py's
prefill)."""
from __future__ import annotations

from typing import Optional

import torch

from servelm.cpu import native
from servelm.cpu.plan import Unsupported, projection

# rows of x up to which the C kernels take a block-format layer's matmul where the CPU has
# AVX-512 (or neither vector set): above, the blocks are dequantized for one dense GEMM
# (SmolLM2 Q4_1 layers on the AVX-512 2-core machine: see NOTES.md "CPU fast path")
NATIVE_MAX_M = 64


def native_max_m() -> int:
    """Rows up to which the C kernels take a block-format layer's matmul on this CPU. AVX2:
    every M. There the C batched product (6 x 16 broadcast tiles over the rows decoded once)
    ran SmolLM2's Q4_1 layers at 100-117 GFLOP/s on 2 threads from 64 to 512 rows: 1.2-1.7x
    faster than dequantizing the blocks for MKL's fp32 GEMM at 64-128 rows, 2.4-2.7x at 16, and
    0.90-1.17x at 512 (benchmarks/cpu_prompt_gemm.py; NOTES.md "CPU fast path on the AVX2
    machine, fifth session"); a 512-token prefill gained 4% end to end."""
    return 1 << 30 if native.simd_level() == "avx2" else NATIVE_MAX_M


class NativeLinear:
    """One linear layer's weights as the C struct (built once, pointing into the layer's own
    tensors) and its matmul: y [M, N] = x [M, K] @ W^T in fp32, cast to x's dtype."""

    def __init__(self, lib, layer) -> None:
        self.lib, self.keep = lib, []
        self.proj = projection(layer, self.keep, with_bias=False)  # apply() adds it
        self.k = layer.input_size_per_rank

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        threads = torch.get_num_threads()
        xf = x.float().contiguous()
        y = torch.empty(m, self.proj.n, dtype=torch.float32)
        scratch = torch.empty(threads * self.lib.sl_linear_scratch(m, self.k), dtype=torch.float32)
        self.lib.sl_linear(self.proj, m, xf.data_ptr(), y.data_ptr(), scratch.data_ptr(), threads)
        return y if x.dtype == torch.float32 else y.to(x.dtype)


def native_linear_for(layer) -> Optional[NativeLinear]:
    """The C matmul for ``layer`` on the CPU, or None (no compiler, a layout it does not read)."""
    lib = native.load()
    if lib is None:
        return None
    try:
        return NativeLinear(lib, layer)
    except Unsupported:
        return None


def takes_elementwise(x: torch.Tensor) -> bool:
    """Whether the C elementwise ops below take x: fp32 on the CPU, with the kernels built."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and native.load() is not None


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] fp32 (gate | up) -> silu(gate) * up [T, I] in one pass (PyTorch's silu and
    mul write and read a [T, I] temporary: 1.26 ms against 0.65 for [512, 3072] on the 2-core
    AVX2 machine, medians of 7)."""
    x = x.contiguous()
    T, I2 = x.shape
    out = torch.empty(T, I2 // 2, dtype=torch.float32)
    native.load().sl_silu_mul(x.data_ptr(), out.data_ptr(), T, I2 // 2, torch.get_num_threads())
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: Optional[torch.Tensor] = None):
    """RMSNorm of x [T, n] fp32 (of x + residual, also returned, where residual is given), one
    pass per row: layers/norm.py's arithmetic, sums in vector order."""
    x = x.contiguous()
    T, n = x.shape
    out = torch.empty_like(x)
    w = weight.float().contiguous()
    res = residual.contiguous() if residual is not None else None
    r = torch.empty_like(x) if res is not None else None
    native.load().sl_rms_norm(x.data_ptr(), res.data_ptr() if res is not None else None,
                              r.data_ptr() if r is not None else None, w.data_ptr(),
                              out.data_ptr(), T, n, eps, torch.get_num_threads())
    return out if residual is None else (out, r)


def rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
         cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [T, H, D] and k [T, KVH, D] fp32 (rows may be strided views of a
    qkv output; heads contiguous) at positions [T] from cos_sin [P, D] (cos | sin): new
    contiguous tensors, layers/rotary.py's expression in one pass."""
    T, H, D = q.shape
    KVH = k.shape[1]
    if q.stride()[1:] != (D, 1) or k.stride()[1:] != (D, 1):
        q, k = q.contiguous(), k.contiguous()
    qo, ko = torch.empty(T, H, D), torch.empty(T, KVH, D)
    pos = positions.to(torch.int64).contiguous()
    cs = cos_sin.float().contiguous()
    native.load().sl_rope(q.data_ptr(), k.data_ptr(), q.stride(0), k.stride(0), qo.data_ptr(),
                          ko.data_ptr(), pos.data_ptr(), cs.data_ptr(), T, H, KVH, D,
                          torch.get_num_threads())
    return qo, ko


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                    threads: int = 1) -> torch.Tensor:
    """Decode attention, one query token per sequence: q [S, H, D] fp32 -> [S, H, D] fp32,
    over caches [blocks, block_size, KVH, D] (fp32 or bf16) read through block_tables [S, n]."""
    bt = block_tables.to(torch.int32).contiguous()
    return _attention(q, k_cache, v_cache, bt, bt.shape[1], seq_lens, scale, threads)


def causal_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_table: torch.Tensor, ctx: int, scale: float,
                     threads: int = 1) -> torch.Tensor:
    """One sequence's query rows q [T, H, D], the last T of its ctx tokens (all in the cache,
    read through block_table [n]), each attending causally: -> [T, H, D] fp32. The decode
    kernel once per row, every row on the one table, row i seeing ctx - T + i + 1 tokens."""
    T = q.shape[0]
    bt = block_table.to(torch.int32).contiguous()
    lens = torch.arange(ctx - T + 1, ctx + 1, dtype=torch.int32)
    return _attention(q, k_cache, v_cache, bt, 0, lens, scale, threads)


def _attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, bt: torch.Tensor,
               bt_stride: int, seq_lens: torch.Tensor, scale: float, threads: int) -> torch.Tensor:
    lib = native.load()
    if lib is None:
        raise RuntimeError("the CPU kernels are not available (no C compiler)")
    S, H, D = q.shape
    KVH, bsz = k_cache.shape[2], k_cache.shape[1]
    max_ctx = int(seq_lens.max())
    q = q.float().contiguous()
    out = torch.empty_like(q)
    lens = seq_lens.to(torch.int32).contiguous()
    scores = torch.empty(threads * (H // KVH) * max_ctx, dtype=torch.float32)
    lib.sl_attention(q.data_ptr(), out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                     int(k_cache.dtype == torch.bfloat16), bt.data_ptr(), bt_stride,
                     lens.data_ptr(), S, H, KVH, D, bsz, scale, scores.data_ptr(), max_ctx, threads)
    return out
