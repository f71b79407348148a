"""The PyTorch attention backend against the per-sequence reference."""
import torch


def test_torch_decode_attention_grouped_matches_reference():
    """The CPU decode path (sorted, padded per group of 16) equals the per-sequence reference
    on a batch of 40 sequences of very different lengths over shuffled blocks."""
    from servelm.attention.backend import AttentionMetadata
    from servelm.attention.torch_ref import TorchReferenceBackend, paged_attention_ref
    g = torch.Generator().manual_seed(0)
    S, H, KVH, D, bs, nb = 40, 8, 2, 32, 4, 3200
    lens = torch.randint(1, 300, (S,), generator=g).tolist()
    k_cache = torch.randn(nb, bs, KVH, D, generator=g)
    v_cache = torch.randn(nb, bs, KVH, D, generator=g)
    perm = torch.randperm(nb, generator=g)
    width = max(-(-n // bs) for n in lens)
    tables = torch.full((S, width), 10**6, dtype=torch.int32)  # unused entries: invalid ids
    used = 0
    for i, n in enumerate(lens):
        k = -(-n // bs)
        tables[i, :k] = perm[used:used + k].to(torch.int32)
        used += k
    meta = AttentionMetadata(slot_mapping=torch.zeros(S, dtype=torch.int64),
                             query_start_loc=torch.arange(S + 1, dtype=torch.int32),
                             seq_lens=torch.tensor(lens, dtype=torch.int32), block_tables=tables,
                             max_query_len=1, max_seq_len=max(lens),
                             query_lens_cpu=(1,) * S, seq_lens_cpu=tuple(lens))
    q = torch.randn(S, H, D, generator=g)
    out = TorchReferenceBackend().forward(q, None, None, k_cache, v_cache, meta, D ** -0.5)
    ref = paged_attention_ref(q, k_cache, v_cache, meta, D ** -0.5)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
