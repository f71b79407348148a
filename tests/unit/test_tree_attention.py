"""Token-tree attention (speculative verification of several branches in one pass): each query
sees its sequence's keys before the tree and, inside it, only its ancestors and itself. The
torch reference against an explicit per-query softmax, and the Triton paged kernel (CUDA, or
the interpreter on the CPU) against the reference, on random trees, contexts and block tables,
with a tree-less sequence in the same batch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from servelm.attention.backend import AttentionMetadata
from servelm.attention.torch_ref import paged_attention_ref
from servelm.spec_decode.tree import TreeShape
from tests.unit.kernel_env import DEVICE, INTERPRET, ON_CUDA


def _batch(seed: int, trees: list, bs: int, kvh: int = 2, h: int = 4, d: int = 32,
           dtype=torch.float32):
    """trees: per sequence (context length, TreeShape or None, query length if no tree). A
    tree sequence's queries are its newest context token (the root) and the tree's nodes."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    q_lens, s_lens, starts, bits = [], [], [], []
    for ctx, shape, ql in trees:
        if shape is None:
            q_lens.append(ql)
            s_lens.append(ctx + ql)
            starts.append(1 << 30)
            bits += [0] * ql
        else:
            q_lens.append(1 + shape.num_nodes)
            s_lens.append(ctx + shape.num_nodes)
            starts.append(ctx)
            bits += [0] + shape.ancestor_bits.tolist()
    width = max(-(-s // bs) for s in s_lens)
    num_blocks = len(trees) * width + 2
    tables = rng.permutation(num_blocks)[:len(trees) * width].reshape(len(trees), width)
    kc = torch.randn(num_blocks, bs, kvh, d, generator=g).to(dtype).to(DEVICE)
    vc = torch.randn(num_blocks, bs, kvh, d, generator=g).to(dtype).to(DEVICE)
    q = torch.randn(sum(q_lens), h, d, generator=g).to(dtype).to(DEVICE)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    t = lambda a, dt: torch.tensor(np.asarray(a), dtype=dt, device=DEVICE)  # noqa: E731
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(sum(q_lens), dtype=torch.int64, device=DEVICE),
        query_start_loc=t(cu, torch.int32), seq_lens=t(s_lens, torch.int32),
        block_tables=t(tables, torch.int32), max_query_len=max(q_lens),
        max_seq_len=max(s_lens), query_lens_cpu=tuple(q_lens), seq_lens_cpu=tuple(s_lens),
        tree_mask=t(bits, torch.int64), tree_start=t(starts, torch.int32))
    return q, kc, vc, meta


def _explicit(q, kc, vc, meta, scale):
    """Per query: softmax over the keys its mask allows, gathered one by one."""
    bs, kvh = kc.shape[1], kc.shape[2]
    grp = q.shape[1] // kvh
    out = torch.empty_like(q)
    t = 0
    for s, (ql, sl) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        ts = int(meta.tree_start[s])
        for j in range(ql):
            pos = sl - ql + j
            bits = int(meta.tree_mask[t])
            keys = [p for p in range(pos + 1) if p < ts or (bits >> (p - ts)) & 1]
            blk = meta.block_tables[s, torch.tensor(keys) // bs].long()
            off = torch.tensor(keys) % bs
            k, v = kc[blk, off].float(), vc[blk, off].float()  # [n, KVH, D]
            for hh in range(q.shape[1]):
                w = (k[:, hh // grp] @ q[t, hh].float()) * scale
                out[t, hh] = (w.softmax(0)[:, None] * v[:, hh // grp]).sum(0).to(q.dtype)
            t += 1
    return out


CASES = [
    ([(5, TreeShape((2, 2, 1, 1)), 0), (0, None, 3)], 4),
    ([(17, TreeShape((3, 1)), 0), (9, None, 1), (30, TreeShape((1, 1, 1)), 0)], 16),
    ([(40, TreeShape((2, 3, 2)), 0)], 8),  # 2 + 6 + 12 = 20 nodes
]


@pytest.mark.parametrize("trees,bs", CASES)
def test_reference_matches_explicit(trees, bs):
    q, kc, vc, meta = _batch(len(trees) + bs, trees, bs)
    scale = q.shape[-1] ** -0.5
    torch.testing.assert_close(paged_attention_ref(q, kc, vc, meta, scale),
                               _explicit(q, kc, vc, meta, scale), atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not (ON_CUDA or INTERPRET), reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("trees,bs", CASES)
def test_triton_kernel_matches_reference(trees, bs):
    pytest.importorskip("triton")
    from servelm.kernels.prefill_attention import prefill_attention
    q, kc, vc, meta = _batch(7 * len(trees) + bs, trees, bs)
    scale = q.shape[-1] ** -0.5
    out = prefill_attention(q, kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                            scale, tree_mask=meta.tree_mask, tree_start=meta.tree_start)
    torch.testing.assert_close(out, paged_attention_ref(q, kc, vc, meta, scale), atol=2e-4,
                               rtol=1e-3)


def test_tree_shape():
    t = TreeShape((2, 2, 1))
    assert t.num_nodes == 2 + 4 + 4 and t.depth == 3
    assert t.parents.tolist() == [-1, -1, 0, 0, 1, 1, 2, 3, 4, 5]
    assert t.depths.tolist() == [1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    # node 7 (depth 3) descends from 3, which descends from 0
    assert t.ancestor_bits[7] == (1 << 7) | (1 << 3) | (1 << 0)
    assert t.children(-1) == [0, 1] and t.children(1) == [4, 5] and t.children(9) == []
    with pytest.raises(ValueError, match="64"):
        TreeShape((4, 4, 4))
