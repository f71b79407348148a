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
    ran SmolLM2's Q4_1 layers at 101-133 GFLOP/s on 2 threads from 64 to 512 rows, as fast as
    dequantizing the blocks for MKL's fp32 GEMM at 512 rows and up to 1.9x faster at 64
    (NOTES.md "CPU fast path on an AVX2 machine"), and skips that dequantization pass."""
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
