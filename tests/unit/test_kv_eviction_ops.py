"""KV eviction's pieces: which tokens each policy keeps, re-rotating keys to a new position,
and compaction moving KV and scores within and across blocks (read before written)."""
from __future__ import annotations

import pytest
import torch

from servelm.kv_eviction.compact import CompactionOp, compact, rotate_back
from servelm.kv_eviction.config import KVEvictionConfig, make_eviction_config
from servelm.kv_eviction.policy import keep_h2o, keep_streaming
from servelm.layers.rotary import RotaryEmbedding

CPU = torch.device("cpu")


@pytest.mark.parametrize("scaling", [
    {"rope_type": "default"},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
])
def test_rotate_back_lands_on_the_new_position(scaling):
    torch.manual_seed(0)
    rot = RotaryEmbedding(32, 256, 10000.0, scaling)
    k = torch.randn(7, 2, 32)
    old = torch.tensor([5, 9, 40, 100, 200, 255, 17])
    new = torch.tensor([0, 3, 12, 99, 4, 250, 17])
    _, k_old = rot(old, torch.zeros(7, 1, 32), k.clone())
    _, k_new = rot(new, torch.zeros(7, 1, 32), k.clone())
    torch.testing.assert_close(rotate_back(k_old, rot.cos_sin_cache, old - new), k_new,
                               rtol=1e-4, atol=1e-4)


def test_policies_keep_sinks_recent_and_heavy_hitters():
    cfg = KVEvictionConfig("streaming", 8, 2, 6)
    assert keep_streaming(cfg, 12, 8, None, CPU).tolist() == [0, 1, 6, 7, 8, 9, 10, 11]
    cfg = KVEvictionConfig("h2o", 8, 2, 3)
    scores = torch.tensor([9., 9., 1., 7., 2., 7., 0., 5., 1., 1., 1., 1.])
    # sinks 0-1, recent 9-11, and of 2..8 the 3 largest: 3 and 5 (7.0), then 7 (5.0)
    assert keep_h2o(cfg, 12, 8, scores, CPU).tolist() == [0, 1, 3, 5, 7, 9, 10, 11]
    # ties go to the older token
    flat = torch.ones(12)
    assert keep_h2o(cfg, 12, 8, flat, CPU).tolist() == [0, 1, 2, 3, 4, 9, 10, 11]


def test_compaction_moves_kv_and_scores_within_its_blocks():
    bs, KVH, D = 4, 2, 8
    torch.manual_seed(1)
    rot = RotaryEmbedding(D, 64, 10000.0, {"rope_type": "default"})
    k_cache, v_cache = torch.randn(6, bs, KVH, D), torch.randn(6, bs, KVH, D)
    scores = torch.arange(24, dtype=torch.float32)
    old_table, new_table = [3, 1, 5, 0], [3, 2]  # block 2 a fresh copy-on-write block
    kept = torch.tensor([0, 1, 9, 10, 12, 13, 14, 15])
    slot = lambda t, i: t[i // bs] * bs + i % bs  # noqa: E731
    want_k = [rotate_back(k_cache.view(-1, KVH, D)[slot(old_table, int(i))][None],
                          rot.cos_sin_cache, torch.tensor([int(i) - j]))[0]
              for j, i in enumerate(kept)]
    want_v = [v_cache.view(-1, KVH, D)[slot(old_table, int(i))].clone() for i in kept]
    want_s = [float(scores[slot(old_table, int(i))]) for i in kept]
    compact([(k_cache, v_cache)], [rot.cos_sin_cache],
            [CompactionOp(old_table, new_table, kept)], bs, scores)
    for j in range(8):
        s = slot(new_table, j)
        torch.testing.assert_close(k_cache.view(-1, KVH, D)[s], want_k[j])
        torch.testing.assert_close(v_cache.view(-1, KVH, D)[s], want_v[j])
        assert float(scores[s]) == want_s[j]


def test_config_defaults():
    ev = make_eviction_config("h2o", None, None, None, 16, 2048)
    assert (ev.budget, ev.sink_tokens, ev.recent_tokens) == (512, 4, 254)
    assert ev.fixed_blocks(16) == 0 and ev.fixed_blocks(4) == 1
    assert make_eviction_config("none", None, None, None, 16, 2048) is None


# ---- the H2O scores kernel (CUDA, or the CPU under TRITON_INTERPRET=1) ----------------------
@pytest.mark.parametrize("lens,H,KVH,softcap", [
    (((1, 9), (1, 30), (1, 3)), 4, 2, 0.0),  # decodes
    (((5, 5), (7, 20), (1, 70)), 4, 1, 0.0),  # whole prompts, a chunk after a prefix, a decode
    (((3, 12), (2, 40)), 2, 2, 30.0),  # soft-capped
])
def test_scores_kernel_matches_reference(lens, H, KVH, softcap):
    pytest.importorskip("triton")
    from tests.unit.kernel_env import DEVICE, INTERPRET, ON_CUDA
    if not (ON_CUDA or INTERPRET):
        pytest.skip("needs CUDA, or TRITON_INTERPRET=1")
    from servelm.attention.backend import AttentionMetadata
    from servelm.kernels.attention_scores import accumulate_scores_triton
    from servelm.kv_eviction.scores import accumulate_scores_ref
    g = torch.Generator().manual_seed(sum(c for _, c in lens))
    BS, D, nb = 4, 16, 64
    k_cache = torch.randn(nb, BS, KVH, D, generator=g).to(DEVICE)
    q_lens, ctx = [a for a, _ in lens], [b for _, b in lens]
    T = sum(q_lens)
    q = torch.randn(T, H, D, generator=g).to(DEVICE)
    perm = torch.randperm(nb, generator=g)
    width = max(-(-c // BS) for c in ctx)
    tables = torch.stack([perm[i * width:(i + 1) * width] for i in range(len(lens))]).to(
        torch.int32).to(DEVICE)
    qsl = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32).to(DEVICE)
    meta = AttentionMetadata(slot_mapping=torch.zeros(T, dtype=torch.int64, device=DEVICE),
                             query_start_loc=qsl,
                             seq_lens=torch.tensor(ctx, dtype=torch.int32, device=DEVICE),
                             block_tables=tables, max_query_len=max(q_lens),
                             max_seq_len=max(ctx), query_lens_cpu=tuple(q_lens),
                             seq_lens_cpu=tuple(ctx))
    want = torch.rand(nb * BS, generator=g).to(DEVICE)
    got = want.clone()
    accumulate_scores_ref(q, k_cache, meta, 0.25, want, softcap)
    accumulate_scores_triton(q, k_cache, meta, 0.25, got, softcap)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
