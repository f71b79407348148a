"""The fused MoE kernel (two grouped GEMM launches over tokens sorted by expert) against its
PyTorch reference on random inputs of many shapes, uneven and empty expert loads included; and
the device-side sort (moe_align) by its invariants. CUDA, or the CPU under
TRITON_INTERPRET=1."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from servelm.kernels.fused_moe import fused_experts, moe_align, route_topk  # noqa: E402
from servelm.layers.fused_moe import (dequantize_rows, fused_experts_ref,  # noqa: E402
                                      quantize_rows, select_experts)

from tests.unit.kernel_env import DEVICE, INTERPRET, ON_CUDA, covering  # noqa: E402
pytestmark = pytest.mark.skipif(not (ON_CUDA or INTERPRET),
                                reason="needs CUDA, or TRITON_INTERPRET=1 for the CPU interpreter")

# (tokens, hidden, expert intermediate, experts, top k)
SHAPES = [(1, 32, 48, 4, 2), (7, 64, 40, 8, 2), (40, 48, 80, 6, 3), (3, 32, 32, 4, 4),
          (70, 32, 24, 8, 1)]
if ON_CUDA:
    SHAPES += [(512, 1024, 768, 16, 2), (3, 2048, 1408, 60, 4), (257, 512, 1536, 8, 2)]


def _case(T, H, I, E, k, dtype, seed, skew=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype).to(DEVICE)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(dtype).to(DEVICE)
    w2 = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(dtype).to(DEVICE)
    logits = torch.randn(T, E, generator=g)
    if skew:  # most tokens to expert 0, none to the last experts
        logits[:, 0] += 6.0
        logits[:, E // 2:] -= 30.0
    weights, ids = select_experts(logits.to(DEVICE), k, renormalize=True)
    return x, w13, w2, weights, ids


# Triton's interpreter returns garbage from tl.dot on bf16 operands (tests/unit/test_kernels.py):
# bf16 runs on CUDA, fp16 everywhere
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_CUDA else [])


# every combination on CUDA; on the interpreter every pair of values of two of them meets
@pytest.mark.parametrize("shape,dtype,skew", covering(SHAPES, DTYPES, [False, True]), ids=str)
def test_fused_experts_matches_reference(shape, dtype, skew):
    T, H, I, E, k = shape
    x, w13, w2, weights, ids = _case(T, H, I, E, k, dtype, seed=sum(shape), skew=skew)
    got = fused_experts(x, w13, w2, weights, ids)
    want = fused_experts_ref(x, w13, w2, weights, ids)
    assert got.shape == (T, H) and got.dtype == dtype
    tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    tol = dict(rtol=tol, atol=tol)
    torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.mark.parametrize("T,E,k,block", [(1, 4, 2, 16), (9, 8, 3, 4), (50, 6, 2, 16)])
def test_moe_align_invariants(T, E, k, block):
    g = torch.Generator().manual_seed(T * E)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(DEVICE)
    sorted_ids, block_experts = moe_align(ids, E, block)
    n = T * k
    s, be = sorted_ids.cpu(), block_experts.cpu()
    flat = ids.reshape(-1).cpu()
    real = s[s < n]
    assert sorted(real.tolist()) == list(range(n))  # every pair exactly once
    assert s.numel() % block == 0 and be.numel() == s.numel() // block
    for b in range(be.numel()):
        rows = s[b * block:(b + 1) * block]
        rows = rows[rows < n]
        if be[b] < 0:
            assert rows.numel() == 0
        else:
            assert (flat[rows] == be[b]).all()  # a block holds one expert's pairs
    used = be[be >= 0]
    assert (used[1:] >= used[:-1]).all()  # experts in order, each a run of blocks


def test_moe_align_survives_ids_outside_the_experts():
    """The kernel warm-up's dry run skips the routing kernel and leaves its ids uninitialised:
    moe_align must not index with them out of bounds (a device assert on CUDA poisons the
    context before the weights load)."""
    ids = torch.tensor([[-5, 1 << 40], [3, 2], [7, -1]], device=DEVICE)
    sorted_ids, block_experts = moe_align(ids, 4, 4)
    s = sorted_ids.cpu()
    assert sorted(s[s < 6].tolist()) == list(range(6))
    assert int(block_experts.max()) < 4


@pytest.mark.parametrize("T,E,k", [(1, 8, 2), (5, 60, 4), (33, 128, 8), (4, 6, 3)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_topk_matches_select_experts(T, E, k, renormalize):
    g = torch.Generator().manual_seed(T * E + k)
    logits = (torch.randn(T, E, generator=g) * 3).to(DEVICE)
    w, ids = route_topk(logits, k, renormalize)
    w_ref, ids_ref = select_experts(logits, k, renormalize)
    assert torch.equal(ids.cpu(), ids_ref.cpu())  # both in descending order of weight
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
    if renormalize:
        torch.testing.assert_close(w.sum(-1), torch.ones(T, device=w.device))


@pytest.mark.parametrize("method", ["int8"] + (["fp8"] if ON_CUDA else []))
@pytest.mark.parametrize("shape", [(3, 64, 40, 8, 2), (40, 48, 80, 6, 3)])
def test_quantized_experts_kernel_matches_reference(method, shape):
    """int8 (and on CUDA e4m3) rows with per-row scales: the kernel converts tiles for the dot
    and scales the columns after; the reference dequantizes first."""
    T, H, I, E, k = shape
    dtype = torch.float16 if not ON_CUDA else torch.bfloat16
    x, w13, w2, weights, ids = _case(T, H, I, E, k, torch.float32, seed=sum(shape) + 1)
    q13, s13 = zip(*(quantize_rows(w13[e].cpu(), method) for e in range(E)))
    q2, s2 = zip(*(quantize_rows(w2[e].cpu(), method) for e in range(E)))
    q13, s13, q2, s2 = (torch.stack(t).to(x.device) for t in (q13, s13, q2, s2))
    x = x.to(dtype)
    got = fused_experts(x, q13, q2, weights, ids, s13, s2)
    want = fused_experts_ref(x, q13, q2, weights, ids, s13, s2)
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)
    deq = fused_experts_ref(x, torch.stack([dequantize_rows(q13[e], s13[e], dtype)
                                            for e in range(E)]),
                            torch.stack([dequantize_rows(q2[e], s2[e], dtype) for e in range(E)]),
                            weights, ids)
    torch.testing.assert_close(want, deq, rtol=0, atol=0)


def test_route_topk_ids_stay_in_range_on_nan():
    """Garbage router logits (the kernel warm-up runs on uninitialised weights) never give an
    expert id outside [0, E): the grouped GEMM would read past the weights."""
    logits = torch.full((3, 10), float("nan"), device=DEVICE)
    logits[1, 4] = 1.0
    _, ids = route_topk(logits, 4, True)
    assert bool(((ids >= 0) & (ids < 10)).all())
