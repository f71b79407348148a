"""The grammar-mask kernel against its PyTorch reference: random masks (some rows all-allowed
or all-forbidden but one word), vocabularies not a multiple of 32 or of the block, a subset of
logits rows in any order; on CUDA and under Triton's interpreter on the CPU."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from servelm.kernels.bitmask import apply_bitmask  # noqa: E402
from servelm.structured_output.processor import apply_bitmask_ref  # noqa: E402
from tests.unit.kernel_env import DEVICE, INTERPRET, ON_CUDA  # noqa: E402


@pytest.mark.skipif(not (ON_CUDA or INTERPRET), reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("L,A,V", [(1, 1, 37), (5, 3, 1000), (8, 8, 4096 + 33), (16, 7, 49152)])
def test_apply_bitmask_matches_reference(L, A, V):
    dev = DEVICE
    g = torch.Generator().manual_seed(L * 1000 + V)
    W = -(-V // 32)
    logits = torch.randn(L, V, generator=g).to(dev)
    bitmask = torch.randint(-2**31, 2**31 - 1, (A, W), generator=g, dtype=torch.int64)
    bitmask = bitmask.to(torch.int32)
    bitmask[0, : W // 2] = 0  # half the vocabulary forbidden
    if A > 1:
        bitmask[1] = -1  # everything allowed
    rows = torch.randperm(L, generator=g)[:A].to(dev)
    bitmask = bitmask.to(dev)
    ref, got = logits.clone(), logits.clone()
    apply_bitmask_ref(ref, bitmask, rows)
    apply_bitmask(got, bitmask, rows)
    assert torch.equal(got, ref)
    assert torch.isinf(got).any() and torch.isfinite(got).any()
