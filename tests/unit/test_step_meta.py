"""worker/step_meta.py: a ragged batch of short queries and its one-sequence-per-token form give
the same attention (the torch reference on both; the Triton decode kernel on the per-token form,
on CUDA or under the interpreter), with the same slots written."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from servelm.attention.torch_ref import paged_attention_ref
from servelm.worker.step_meta import ragged_positions, step_meta
from tests.unit.kernel_env import DEVICE, INTERPRET, ON_CUDA


def _case(seed: int, ranges: list[tuple[int, int]], bs: int, kvh: int = 2, h: int = 4,
          d: int = 32, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    width = max(-(-e // bs) for _, e in ranges) + 1
    num_blocks = len(ranges) * width + 3
    # distinct shuffled blocks per sequence; unused entries point at real blocks too
    perm = rng.permutation(num_blocks)[:len(ranges) * width].reshape(len(ranges), width)
    tables = perm.astype(np.int32)
    kc = torch.randn(num_blocks, bs, kvh, d, generator=g).to(dtype).to(DEVICE)
    vc = torch.randn(num_blocks, bs, kvh, d, generator=g).to(dtype).to(DEVICE)
    T = sum(e - s for s, e in ranges)
    q = torch.randn(T, h, d, generator=g).to(dtype).to(DEVICE)
    return tables, kc, vc, q


@pytest.mark.parametrize("ranges,bs", [
    ([(5, 10), (0, 1), (31, 33)], 4),  # verification-like rows: 1 + k drafts after a context
    ([(16, 17), (7, 15), (40, 45), (0, 3)], 16),
    ([(100, 108)], 8),
])
def test_per_token_equals_ragged(ranges, bs):
    tables, kc, vc, q = _case(len(ranges) + bs, ranges, bs)
    starts, ends = np.array([s for s, _ in ranges]), np.array([e for _, e in ranges])
    seq, pos, ragged = step_meta(tables, starts, ends, bs, torch.device(DEVICE))
    seq2, pos2, tok = step_meta(tables, starts, ends, bs, torch.device(DEVICE), per_token=True)
    assert (seq == seq2).all() and (pos == pos2).all()
    assert torch.equal(ragged.slot_mapping, tok.slot_mapping)
    assert tok.decode_only and tok.num_seqs == q.shape[0]
    assert tok.seq_lens.tolist() == (pos + 1).tolist()
    scale = q.shape[-1] ** -0.5
    ref = paged_attention_ref(q, kc, vc, ragged, scale)
    torch.testing.assert_close(paged_attention_ref(q, kc, vc, tok, scale), ref)
    if ON_CUDA or INTERPRET:
        pytest.importorskip("triton")
        from servelm.kernels.decode_attention import decode_attention
        out = decode_attention(q, kc, vc, tok.block_tables, tok.seq_lens, scale,
                               max_seq_len=tok.max_seq_len)
        torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-3)


def test_ragged_positions():
    seq, pos = ragged_positions(np.array([3, 0, 7]), np.array([5, 1, 10]))
    assert seq.tolist() == [0, 0, 1, 2, 2, 2]
    assert pos.tolist() == [3, 4, 0, 7, 8, 9]
