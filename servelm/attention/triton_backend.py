"""Triton attention backend: paged flash-decoding for decode-only steps, a paged causal flash
attention kernel for every other step (chunked prefill, prefix hits, mixed decode rows), and
torch SDPA for steps made only of a few long fresh prompts (measured on an H100: SDPA's dense
causal kernel runs at ~560 TFLOP/s there, the paged Triton kernel at ~320-350).

Importing this module raises ImportError when triton is missing (the registry then falls back
to the torch reference). It imports on a CPU-only machine; the kernels need a CUDA device (or
``TRITON_INTERPRET=1`` for CPU tensors, slowly, in tests).

fp8 caches (uint8, kv_quant's layout) go through the same kernels, which quantize on write and
dequantize on read; the SDPA path then reads this step's k and v back from the cache.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from servelm.attention.backend import AttentionBackend, AttentionMetadata
from servelm.attention.kv_quant import dequantize_kv_rows, is_fp8_kv
from servelm.kernels.decode_attention import decode_attention
from servelm.kernels.kv_write import write_kv
from servelm.kernels.prefill_attention import prefill_attention
from servelm.kernels.rotary_kv import rotary_write_kv


class TritonAttentionBackend(AttentionBackend):
    """Decode launches are sized for ``meta.max_seq_len``: a CUDA graph must be captured with the
    longest context it will serve there (worker/cuda_graphs.py captures buckets of them)."""

    name = "triton"
    supports_window_softcap = True
    # SDPA path: every sequence fresh (query = whole context), at most this many sequences,
    # each at least this long (one SDPA launch per sequence, so few and long ones only)
    sdpa_max_seqs = 16
    sdpa_min_len = 512

    def __init__(self, max_model_len: int | None = None) -> None:
        self.max_model_len = max_model_len  # the registry's common constructor; sizes come per step

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        write_kv(k, v, k_cache, v_cache, slot_mapping)

    def rotate_and_write_kv(self, rotary, positions, q, k, v, k_cache, v_cache, slot_mapping):
        # one launch instead of rotary + write_kv, where the layer runs the Triton rotary (whose
        # rounding the fused kernel shares); q and k rotate in place: [T, H | KVH, D] views
        if not rotary.use_kernel:
            return super().rotate_and_write_kv(rotary, positions, q, k, v, k_cache, v_cache,
                                               slot_mapping)
        rotary_write_kv(positions, q, k, v, rotary.cos_sin_cache, k_cache, v_cache,
                        slot_mapping)
        return q, k

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                window: int = 0, softcap: float = 0.0) -> torch.Tensor:
        # q: [num_tokens, H, D] -> [num_tokens, H, D]
        if meta.tree_mask is not None:
            return prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                     meta.query_start_loc, scale, tree_mask=meta.tree_mask,
                                     tree_start=meta.tree_start, window=window,
                                     softcap=softcap)
        if meta.decode_only and q.shape[0] == meta.num_seqs:
            # the grid is sized for meta.max_seq_len: an eager step's longest context, or, in a
            # captured graph, the longest context the graph serves (DecodeGraphs sets it)
            return decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                    scale, max_seq_len=meta.max_seq_len, window=window,
                                    softcap=softcap)
        q_lens = meta.query_lens_cpu
        if (not window and not softcap and q_lens and q_lens == meta.seq_lens_cpu
                and len(q_lens) <= self.sdpa_max_seqs
                and min(q_lens) >= self.sdpa_min_len and sum(q_lens) == q.shape[0]):
            if is_fp8_kv(k_cache):
                # the values the cache holds (as every other path reads them), not k and v:
                # [T, KVH, D + 4] rows at this step's slots, dequantized to q's dtype
                slots = meta.slot_mapping.long()
                k = dequantize_kv_rows(k_cache.view(-1, *k_cache.shape[2:])[slots], q.dtype)
                v = dequantize_kv_rows(v_cache.view(-1, *v_cache.shape[2:])[slots], q.dtype)
            return _fresh_prefill_sdpa(q, k, v, q_lens, scale)
        return prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                 meta.query_start_loc, scale, window=window, softcap=softcap)


def _fresh_prefill_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        q_lens: tuple[int, ...], scale: float) -> torch.Tensor:
    """Causal attention of whole prompts over this step's own k, v (nothing cached before them).
    q: [T, H, D]; k, v: [T, KVH, D] -> [T, H, D]."""
    gqa = q.shape[1] != k.shape[1]
    if len(set(q_lens)) == 1:  # equal lengths: one batched call over [B, heads, n, D] views
        b, n = len(q_lens), q_lens[0]
        qs, ks, vs = (x.view(b, n, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks.to(q.dtype), vs.to(q.dtype), is_causal=True,
                                           scale=scale, enable_gqa=gqa)
        return o.transpose(1, 2).reshape(q.shape)
    out = torch.empty_like(q)
    start = 0
    for n in q_lens:
        # [1, heads, n, D] views of the token-major tensors (no copies)
        qs, ks, vs = (x[start:start + n].transpose(0, 1)[None] for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks.to(q.dtype), vs.to(q.dtype), is_causal=True,
                                           scale=scale, enable_gqa=gqa)
        out[start:start + n] = o[0].transpose(0, 1)
        start += n
    return out
