"""Attention on the CPU: the C kernels of servelm/cpu (csrc/decode.c's paged attention, fp32
sums over the cache read in place) where they apply, the PyTorch reference elsewhere.

Why: PyTorch's CPU SDPA ran a 512-token SmolLM2 prompt's attention at about 11 GFLOP/s on the
2-core AVX2 machine (26 ms a layer alone, as much as the layer's matmuls: with GQA it falls to
its math path); the decode kernel once per query row against the prompt's own cache took 13-16
ms a layer with the test suite running beside it (benchmarks/NOTES.md, "CPU fast path on an
AVX2 machine"). The C path takes fp32/bf16 caches without a sliding window, soft-capping, a
token tree or H2O's score gathering; those steps take the reference."""
from __future__ import annotations

import torch

from servelm.attention.torch_ref import TorchReferenceBackend


class CpuAttentionBackend(TorchReferenceBackend):
    name = "cpu"

    def __init__(self, max_model_len: int | None = None) -> None:
        super().__init__(max_model_len)
        from servelm.cpu import native
        self.native = native.load() is not None

    def _takes(self, q, k_cache, meta, window, softcap) -> bool:
        return (self.native and q.device.type == "cpu" and not window and not softcap
                and meta.tree_mask is None and meta.kv_scores is None
                and k_cache.dtype in (torch.float32, torch.bfloat16))

    def forward(self, q, k, v, k_cache, v_cache, meta, scale, window=0, softcap=0.0):
        if not self._takes(q, k_cache, meta, window, softcap):
            return super().forward(q, k, v, k_cache, v_cache, meta, scale, window, softcap)
        from servelm.cpu.ops import causal_attention, paged_attention
        threads = torch.get_num_threads()
        if meta.decode_only:
            return paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale,
                                   threads).to(q.dtype)
        out = torch.empty_like(q)
        bs, start = k_cache.shape[1], 0
        for s, (q_len, ctx) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
            table = meta.block_tables[s, :-(-ctx // bs)]
            out[start:start + q_len] = causal_attention(q[start:start + q_len], k_cache, v_cache,
                                                        table, ctx, scale, threads)
            start += q_len
        return out
