"""Reference attention in plain PyTorch: runs on any device, defines the numerics the fast
backends are tested against. Loops over sequences on the host, so it is slow by design."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from servelm.attention.backend import AttentionBackend, AttentionMetadata
from servelm.attention.kv_quant import is_fp8_kv, kv_head_dim, kv_rows, quantize_kv_rows


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    # flat caches: [num_blocks * block_size, num_kv_heads, head_dim (+ 4 in fp8)]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, _cache_rows(k, k_cache))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, _cache_rows(v, v_cache))


def _cache_rows(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """x: [T, KVH, D] -> the rows stored for it in cache: e4m3 + scale (uint8) or cast."""
    return quantize_kv_rows(x) if is_fp8_kv(cache) else x.to(cache.dtype)


def tree_allowed(meta: AttentionMetadata, s: int, start: int, q_len: int, ctx: int,
                 device: torch.device, window: int = 0) -> torch.Tensor:
    """[q_len, ctx] keys each query of sequence s may see: causal, within a sliding window of
    ``window`` positions (itself and the window - 1 before it; 0: no window), and within a
    token tree (meta.tree_mask / tree_start) only its ancestors and itself."""
    pos_q = torch.arange(ctx - q_len, ctx, device=device)[:, None]
    keys = torch.arange(ctx, device=device)[None, :]
    allowed = keys <= pos_q
    if window:
        allowed &= keys > pos_q - window
    if meta.tree_mask is not None:
        ts = int(meta.tree_start[s])
        if ts < ctx:
            bits = meta.tree_mask[start:start + q_len].to(device)[:, None]  # [q_len, 1]
            rel = (keys - ts).clamp(0, 63)
            anc = ((bits >> rel) & 1) != 0
            allowed &= (keys < ts) | anc
    return allowed


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
           scale: float, softcap: float = 0.0) -> torch.Tensor:
    """Explicit attention in fp32, for what SDPA does not do (logit soft-capping, as Gemma 2:
    softcap * tanh(scores / softcap) before the mask). q: [KVH, G, q_len, D]; k, v:
    [KVH, 1, ctx, D]; allowed: [q_len, ctx] -> [KVH, G, q_len, D] in fp32."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v.float()


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, scale: float, window: int = 0,
                        softcap: float = 0.0) -> torch.Tensor:
    """q: [num_tokens, H, D] -> [num_tokens, H, D]; context gathered from the cache."""
    block_size = k_cache.shape[1]
    num_heads, num_kv_heads, head_dim = q.shape[1], k_cache.shape[2], q.shape[2]
    out = torch.empty_like(q)
    q_lens = meta.query_lens_cpu or tuple(
        (meta.query_start_loc[1:] - meta.query_start_loc[:-1]).tolist())
    s_lens = meta.seq_lens_cpu or tuple(meta.seq_lens.tolist())
    start = 0
    for s, (q_len, ctx) in enumerate(zip(q_lens, s_lens)):
        n_blocks = (ctx + block_size - 1) // block_size
        blocks = meta.block_tables[s, :n_blocks].long()
        # [ctx, KVH, D] -> [KVH, ctx, D], computed in fp32 for a stable reference (fp8 rows
        # dequantized: e4m3 * scale)
        k = kv_rows(k_cache[blocks], torch.float32).reshape(-1, num_kv_heads, head_dim)[:ctx]
        v = kv_rows(v_cache[blocks], torch.float32).reshape(-1, num_kv_heads, head_dim)[:ctx]
        k, v = k.transpose(0, 1), v.transpose(0, 1)
        qs = q[start:start + q_len].transpose(0, 1).float()  # [H, q_len, D]
        # causal mask with the queries aligned to the end of the context (tree-masked)
        mask = tree_allowed(meta, s, start, q_len, ctx, q.device, window)  # [q_len, ctx]
        if softcap:
            G = num_heads // num_kv_heads
            o = attend(qs.reshape(num_kv_heads, G, q_len, head_dim), k[:, None], v[:, None],
                       mask, scale, softcap).reshape(num_heads, q_len, head_dim)
        else:
            o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale,
                                               enable_gqa=num_heads != num_kv_heads)
        out[start:start + q_len] = o.transpose(0, 1).to(q.dtype)
        start += q_len
    return out


_DECODE_GROUP = 16


def decode_attention_grouped(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             meta: AttentionMetadata, scale: float, window: int = 0,
                             softcap: float = 0.0) -> torch.Tensor:
    """All query lengths 1. Sequences sorted by length and padded only within groups of 16, so
    one long context does not make every sequence gather (and copy) that many tokens."""
    S = q.shape[0]
    lens = meta.seq_lens_cpu
    if S <= _DECODE_GROUP or not lens:
        return decode_attention_batched(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                        meta.max_seq_len, scale, window, softcap)
    order = sorted(range(S), key=lens.__getitem__)
    out = torch.empty_like(q)
    for g in range(0, S, _DECODE_GROUP):
        idx = order[g:g + _DECODE_GROUP]
        rows = torch.tensor(idx, device=q.device)
        out[rows] = decode_attention_batched(q[rows], k_cache, v_cache, meta.block_tables[rows],
                                             meta.seq_lens[rows], lens[idx[-1]], scale, window,
                                             softcap)
    return out


def decode_attention_batched(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             block_tables: torch.Tensor, seq_lens: torch.Tensor, max_len: int,
                             scale: float, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """All query lengths 1, padded to max_len. q: [S, H, D] -> [S, H, D]."""
    S, H, D = q.shape
    bs, KVH = k_cache.shape[1], k_cache.shape[2]
    nblk = -(-max_len // bs)
    # entries past a sequence's own blocks are arbitrary: clamp them to a valid id, then mask
    bt = block_tables[:, :nblk].long().clamp_(0, k_cache.shape[0] - 1)
    k = kv_rows(k_cache[bt], torch.float32).view(S, nblk * bs, KVH, D)  # [S, L, KVH, D]
    v = kv_rows(v_cache[bt], torch.float32).view(S, nblk * bs, KVH, D)
    qg = q.view(S, KVH, H // KVH, D).float()
    scores = torch.einsum("skgd,slkd->skgl", qg, k) * scale  # [S, KVH, G, L]
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    keys = torch.arange(nblk * bs, device=q.device)[None, :]
    pad = keys >= seq_lens[:, None].long()
    if window:  # the query is at seq_len - 1: keys before seq_len - window are out
        pad |= keys < seq_lens[:, None].long() - window
    scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    out = torch.einsum("skgl,slkd->skgd", scores.softmax(-1), v)
    return out.reshape(S, H, D).to(q.dtype)


# a step's sequences with at most this many queries (decodes in a mixed step, token trees,
# short chunks) are batched, padded within groups of _DECODE_GROUP sorted by context, when
# there are at least _MIN_BATCHED of them and a group's scores stay under _MAX_SCORES floats
_SHORT_QUERY = 64
_MIN_BATCHED = 4
_MAX_SCORES = 1 << 24


def short_queries_batched(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          meta: AttentionMetadata, seqs: list[int], starts: list[int],
                          scale: float, window: int, softcap: float, out: torch.Tensor) -> None:
    """Attention of sequences ``seqs`` (tokens from ``starts``) into ``out``, one padded batch
    per group of similar contexts, in fp32: each query sees what tree_allowed gives it (causal,
    window, token tree). q, out: [num_tokens, H, D]."""
    bs, KVH, D = k_cache.shape[1], k_cache.shape[2], kv_head_dim(k_cache)
    H, dev = q.shape[1], q.device
    q_lens, ctxs = meta.query_lens_cpu, meta.seq_lens_cpu
    order = sorted(range(len(seqs)), key=lambda i: ctxs[seqs[i]])
    for g in range(0, len(order), _DECODE_GROUP):
        grp = order[g:g + _DECODE_GROUP]
        idx = [seqs[i] for i in grp]
        G, maxQ, maxC = len(idx), max(q_lens[s] for s in idx), ctxs[idx[-1]]
        nblk = -(-maxC // bs)
        L = nblk * bs
        # [G, maxQ] token of each query slot (padding slots repeat the sequence's first)
        ql = torch.tensor([q_lens[s] for s in idx], device=dev)
        ar = torch.arange(maxQ, device=dev)
        valid = ar[None, :] < ql[:, None]
        tok = torch.tensor([starts[i] for i in grp], device=dev)[:, None] + ar * valid
        bt = meta.block_tables[idx, :nblk].long().clamp_(0, k_cache.shape[0] - 1)
        k = kv_rows(k_cache[bt], torch.float32).view(G, L, KVH, D)
        v = kv_rows(v_cache[bt], torch.float32).view(G, L, KVH, D)
        qg = q[tok].float().view(G, maxQ, KVH, H // KVH, D)
        scores = torch.einsum("sqkgd,slkd->skgql", qg, k) * scale  # [G, KVH, Gh, maxQ, L]
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        ctx_t = torch.tensor([ctxs[s] for s in idx], device=dev)
        pos_q = (ctx_t - ql)[:, None] + ar[None, :]  # [G, maxQ]
        keys = torch.arange(L, device=dev)[None, None, :]
        allowed = keys <= pos_q[:, :, None]  # [G, maxQ, L]
        if window:
            allowed &= keys > pos_q[:, :, None] - window
        if meta.tree_mask is not None:
            ts = meta.tree_start[idx].to(dev).long()[:, None, None]
            bits = meta.tree_mask.to(dev)[tok][:, :, None]  # [G, maxQ, 1]
            anc = ((bits >> (keys - ts).clamp(0, 63)) & 1) != 0
            allowed &= (keys < ts) | anc
        allowed |= ~valid[:, :, None] & (keys == 0)  # padding slots: finite, then dropped
        scores.masked_fill_(~allowed[:, None, None], float("-inf"))
        o = torch.einsum("skgql,slkd->sqkgd", scores.softmax(-1), v).reshape(G, maxQ, H, D)
        out[tok[valid]] = o[valid].to(out.dtype)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, scale: float, window: int = 0,
                      softcap: float = 0.0) -> torch.Tensor:
    """Per sequence; a whole prompt (no cached prefix) takes SDPA's causal fast path, a chunk
    after a prefix an explicit mask. GQA through broadcasting, not repeat (no copies). Many
    short queries (see _SHORT_QUERY) are batched instead."""
    bs, KVH, D = k_cache.shape[1], k_cache.shape[2], kv_head_dim(k_cache)
    H = q.shape[1]
    out = torch.empty_like(q)
    q_lens, ctxs = meta.query_lens_cpu, meta.seq_lens_cpu
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    short = [s for s, (n, c) in enumerate(zip(q_lens, ctxs))
             if n <= _SHORT_QUERY and (n < c or meta.tree_mask is not None)
             and _DECODE_GROUP * H * n * c <= _MAX_SCORES]
    if len(short) >= _MIN_BATCHED:
        short_queries_batched(q, k_cache, v_cache, meta, short, [starts[s] for s in short],
                              scale, window, softcap, out)
        batched = set(short)
    else:
        batched = set()
    for s, (q_len, ctx) in enumerate(zip(q_lens, ctxs)):
        start = starts[s]
        if s in batched:
            continue
        blocks = meta.block_tables[s, :-(-ctx // bs)].long()
        # [KVH, 1, ctx, D] in q's dtype (fp8 rows dequantized; other caches hold q's dtype)
        k = kv_rows(k_cache[blocks], q.dtype).reshape(-1, KVH, D)[:ctx].transpose(0, 1)[:, None]
        v = kv_rows(v_cache[blocks], q.dtype).reshape(-1, KVH, D)[:ctx].transpose(0, 1)[:, None]
        qs = q[start:start + q_len].transpose(0, 1).reshape(KVH, H // KVH, q_len, D)
        tree = meta.tree_mask is not None
        if window or softcap:
            allowed = tree_allowed(meta, s, start, q_len, ctx, q.device, window)
            o = attend(qs, k, v, allowed, scale, softcap).to(q.dtype)
        elif q_len == ctx and not tree:
            o = F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=scale)
        elif q_len == 1 and not tree:
            o = F.scaled_dot_product_attention(qs, k, v, scale=scale)
        else:
            allowed = tree_allowed(meta, s, start, q_len, ctx, q.device)
            bias = torch.zeros(q_len, ctx, dtype=q.dtype, device=q.device)
            bias.masked_fill_(~allowed, float("-inf"))
            o = F.scaled_dot_product_attention(qs, k, v, attn_mask=bias, scale=scale)
        out[start:start + q_len] = o.reshape(H, q_len, D).transpose(0, 1)
    return out


class TorchReferenceBackend(AttentionBackend):
    """Plain PyTorch on any device: batched for decode-only steps, per sequence otherwise."""

    name = "torch"
    supports_window_softcap = True

    def __init__(self, max_model_len: int | None = None) -> None:
        pass  # launches are sized per step; nothing to size up front

    def write_kv(self, k, v, k_cache, v_cache, slot_mapping):
        write_kv_ref(k, v, k_cache, v_cache, slot_mapping)

    def forward(self, q, k, v, k_cache, v_cache, meta, scale, window=0, softcap=0.0):
        if meta.decode_only:
            return decode_attention_grouped(q, k_cache, v_cache, meta, scale, window, softcap)
        return prefill_attention(q, k_cache, v_cache, meta, scale, window, softcap)
