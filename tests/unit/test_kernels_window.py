"""Sliding-window attention and logit soft-capping in the Triton kernels (decode and ragged
prefill) against the PyTorch reference, on random batches: windows shorter and longer than
the contexts and than the kernels' tiles, mixed chunked batches, split decode partitions.
CUDA, or the CPU under TRITON_INTERPRET=1."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from servelm.attention.torch_ref import paged_attention_ref  # noqa: E402
from servelm.kernels.decode_attention import decode_attention  # noqa: E402
from servelm.kernels.prefill_attention import prefill_attention  # noqa: E402

from tests.unit.kernel_env import (INTERPRET, ON_CUDA,  # noqa: E402
                                   skip_half_on_interpreter)
from tests.unit.test_kernels import (ATTN_BF16, _mixed_batch, _poisoned,  # noqa: E402
                                     assert_attn_close, make_batch)
pytestmark = pytest.mark.skipif(not (ON_CUDA or INTERPRET),
                                reason="needs CUDA, or TRITON_INTERPRET=1 for the CPU interpreter")

# (window, softcap): a window under one tile, one over several tiles, longer than every
# context (a no-op), soft-capping alone and with a window (Gemma 2)
CASES = [(5, 0.0), (40, 0.0), (1000, 0.0), (0, 0.6), (24, 0.6)]


@pytest.mark.parametrize("window,softcap", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, ATTN_BF16])
def test_decode_window_softcap(window, softcap, dtype):
    skip_half_on_interpreter(CASES.index((window, softcap)), dtype != torch.float32)
    bs, heads, kv_heads, d = 16, 8, 2, 64
    # the interpreter pays ~5 ms a program: one context past two 64-token partitions there
    lens = [1, 7, 16, 17, 45, 200, 257] if ON_CUDA else [1, 7, 17, 45, 130]
    q, kc, vc, meta = make_batch([(n - 1, 1) for n in lens], heads, kv_heads, d, bs, dtype,
                                 seed=window + int(softcap * 10))
    scale = 0.3  # scores of a few units: the cap (0.6 / scale in raw units) bites
    ref = paged_attention_ref(q, kc, vc, meta, scale, window=window, softcap=softcap)
    for splits, min_part in ((1, None), (3, 64), (None, None)):
        out = _poisoned(q.shape, dtype)
        decode_attention(q, kc, vc, meta.block_tables, meta.seq_lens, scale, max_seq_len=257,
                         num_splits=splits, min_partition=min_part, out=out, window=window,
                         softcap=softcap)
        assert_attn_close(out, ref, dtype)


@pytest.mark.parametrize("window,softcap", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, ATTN_BF16])
def test_prefill_window_softcap(window, softcap, dtype):
    skip_half_on_interpreter(CASES.index((window, softcap)), dtype == torch.float32)
    bs, heads, kv_heads, d = 16, 8, 2, 64
    q, kc, vc, meta = make_batch(_mixed_batch(bs), heads, kv_heads, d, bs, dtype,
                                 seed=3 * window + int(softcap * 10))
    scale = 0.3
    ref = paged_attention_ref(q, kc, vc, meta, scale, window=window, softcap=softcap)
    out = _poisoned(q.shape, dtype)
    prefill_attention(q, kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale,
                      out=out, window=window, softcap=softcap)
    # rows of a zero-length query are not written: compare the rows that exist
    assert_attn_close(out, ref, dtype)
