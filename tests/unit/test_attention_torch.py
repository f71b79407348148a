"""The PyTorch attention backend against the per-sequence reference."""
import pytest
import torch

from tests.conftest import shuffled_block_tables


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
    tables = shuffled_block_tables(lens, bs, nb, g)
    meta = AttentionMetadata(slot_mapping=torch.zeros(S, dtype=torch.int64),
                             query_start_loc=torch.arange(S + 1, dtype=torch.int32),
                             seq_lens=torch.tensor(lens, dtype=torch.int32), block_tables=tables,
                             max_query_len=1, max_seq_len=max(lens),
                             query_lens_cpu=(1,) * S, seq_lens_cpu=tuple(lens))
    q = torch.randn(S, H, D, generator=g)
    out = TorchReferenceBackend().forward(q, None, None, k_cache, v_cache, meta, D ** -0.5)
    ref = paged_attention_ref(q, k_cache, v_cache, meta, D ** -0.5)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


def _mixed_step(g, S, H, KVH, D, bs, tree: bool):
    """A step of whole prompts, chunks after a prefix, decodes and (tree) token trees over
    shuffled blocks: (q, k_cache, v_cache, meta)."""
    from servelm.attention.backend import AttentionMetadata
    q_lens, ctxs, bits, tstart = [], [], [], []
    for i in range(S):
        kind = i % 4
        ctx = int(torch.randint(1, 90, (1,), generator=g))
        q_len = {0: ctx, 1: min(ctx, int(torch.randint(1, 21, (1,), generator=g))),
                 2: 1, 3: min(ctx, int(torch.randint(2, 9, (1,), generator=g)))}[kind]
        q_lens.append(q_len)
        ctxs.append(ctx)
        if tree and kind == 3:  # the last q_len positions are a tree: self + some earlier
            tstart.append(ctx - q_len)
            for j in range(q_len):
                anc = int(torch.randint(0, 1 << j, (1,), generator=g)) if j else 0
                bits.append(anc | (1 << j))
        else:
            tstart.append(ctx)  # no tree
            bits += [0] * q_len
    nb = sum(-(-c // bs) for c in ctxs) + 5
    tables = shuffled_block_tables(ctxs, bs, nb, g)
    T = sum(q_lens)
    qsl = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    meta = AttentionMetadata(slot_mapping=torch.zeros(T, dtype=torch.int64),
                             query_start_loc=qsl, seq_lens=torch.tensor(ctxs, dtype=torch.int32),
                             block_tables=tables, max_query_len=max(q_lens),
                             max_seq_len=max(ctxs), query_lens_cpu=tuple(q_lens),
                             seq_lens_cpu=tuple(ctxs),
                             tree_mask=torch.tensor(bits, dtype=torch.int64) if tree else None,
                             tree_start=torch.tensor(tstart, dtype=torch.int32) if tree else None)
    q = torch.randn(T, H, D, generator=g)
    return (q, torch.randn(nb, bs, KVH, D, generator=g), torch.randn(nb, bs, KVH, D, generator=g),
            meta)


@pytest.mark.parametrize("tree,window,softcap", [(False, 0, 0.0), (True, 0, 0.0),
                                                 (False, 7, 0.0), (False, 0, 5.0),
                                                 (True, 11, 0.0)])
@pytest.mark.parametrize("S,H,KVH,D,bs", [(37, 8, 2, 32, 4), (9, 4, 4, 16, 16)])
def test_prefill_batches_short_queries_as_the_reference(tree, window, softcap, S, H, KVH, D, bs,
                                                       monkeypatch):
    """A mixed step (whole prompts, chunks, decodes, token trees): the short queries batched
    per group of similar contexts equal the per-sequence fp32 reference."""
    from servelm.attention import torch_ref
    from servelm.attention.torch_ref import paged_attention_ref, prefill_attention
    batched = []
    real = torch_ref.short_queries_batched
    monkeypatch.setattr(torch_ref, "short_queries_batched",
                        lambda *a: batched.append(len(a[4])) or real(*a))
    g = torch.Generator().manual_seed(S + 3 * window + int(tree))
    q, kc, vc, meta = _mixed_step(g, S, H, KVH, D, bs, tree)
    out = prefill_attention(q, kc, vc, meta, D ** -0.5, window, softcap)
    assert batched and batched[0] >= S // 2, batched
    ref = paged_attention_ref(q, kc, vc, meta, D ** -0.5, window, softcap)
    assert torch.allclose(out, ref, atol=2e-5, rtol=1e-5), (out - ref).abs().max()
