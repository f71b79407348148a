"""Reference attention in plain PyTorch: runs on any device, defines the numerics the fast
backends are tested against. Loops over sequences on the host, so it is slow by design."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from servelm.attention.backend import AttentionBackend, AttentionMetadata


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    # flat caches: [num_blocks * block_size, num_kv_heads, head_dim]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [num_tokens, H, D] -> [num_tokens, H, D]; context gathered from the cache."""
    block_size = k_cache.shape[1]
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    q_lens = meta.query_lens_cpu or tuple(
        (meta.query_start_loc[1:] - meta.query_start_loc[:-1]).tolist())
    s_lens = meta.seq_lens_cpu or tuple(meta.seq_lens.tolist())
    start = 0
    for s, (q_len, ctx) in enumerate(zip(q_lens, s_lens)):
        n_blocks = (ctx + block_size - 1) // block_size
        blocks = meta.block_tables[s, :n_blocks].long()
        # [ctx, KVH, D] -> [KVH, ctx, D], computed in fp32 for a stable reference
        k = k_cache[blocks].reshape(-1, num_kv_heads, k_cache.shape[3])[:ctx].transpose(0, 1).float()
        v = v_cache[blocks].reshape(-1, num_kv_heads, v_cache.shape[3])[:ctx].transpose(0, 1).float()
        qs = q[start:start + q_len].transpose(0, 1).float()  # [H, q_len, D]
        # causal mask with the queries aligned to the end of the context
        pos_q = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
        mask = torch.arange(ctx, device=q.device)[None, :] <= pos_q  # [q_len, ctx]
        o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale,
                                           enable_gqa=num_heads != num_kv_heads)
        out[start:start + q_len] = o.transpose(0, 1).to(q.dtype)
        start += q_len
    return out


class TorchReferenceBackend(AttentionBackend):
    name = "torch"

    def write_kv(self, k, v, k_cache, v_cache, slot_mapping):
        write_kv_ref(k, v, k_cache, v_cache, slot_mapping)

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        return paged_attention_ref(q, k_cache, v_cache, meta, scale)
