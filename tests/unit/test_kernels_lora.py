"""The multi-LoRA kernels (segmented shrink and expand over tokens sorted by adapter slot)
against their PyTorch references on random inputs of many shapes: uneven merged parts, ranks
below tl.dot's 16, split-K, tokens without an adapter, unused slots, strided views; the
references against a per-token loop; and the device-side sort (lora_segments) by its
invariants. CUDA, or the CPU under TRITON_INTERPRET=1."""
from __future__ import annotations

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")

from servelm.kernels.lora import (_shrink_config, lora_expand,  # noqa: E402
                                  lora_expand_ref, lora_segments, lora_shrink,
                                  lora_shrink_ref)

from tests.unit.kernel_env import (DEVICE, INTERPRET, ON_CUDA,  # noqa: E402
                                   skip_half_on_interpreter)
pytestmark = pytest.mark.skipif(not (ON_CUDA or INTERPRET),
                                reason="needs CUDA, or TRITON_INTERPRET=1 for the CPU interpreter")
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="CUDA only")

# Triton's interpreter returns garbage from tl.dot on bf16 operands (tests/unit/test_kernels.py):
# bf16 runs on CUDA, fp16 everywhere
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_CUDA else [])
# shrink: the products are exact in fp32 for every dtype (only the order of the sum differs)
SHRINK_TOL = {torch.float32: 2e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}
# expand: y is rounded to its dtype once (either side may land on the next ulp)
EXPAND_TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}

# how the tokens use the slots: "mixed" (random, some tokens without an adapter), "unused"
# (random, slot S // 2 used by none), "one" (all on the last slot), "none" (all -1)
PATTERNS = ["mixed", "unused", "one", "none"]

# (tokens, K, R, slots): R = parts x rank; K and R not multiples of the blocks; K > 1024 at
# few tokens splits K; R = 192 takes three rank blocks
SHRINK_SHAPES = [(1, 40, 8, 1), (5, 100, 16, 4), (37, 72, 48, 8), (130, 52, 24, 4),
                 (1, 1100, 32, 8), (5, 1030, 12, 4), (37, 70, 192, 4)]
# (tokens, part sizes, rank, slots): unequal parts (q, k, v), parts spanning several column
# blocks and ending inside one, a rank of 4, five parts (two launches)
EXPAND_CASES = [(1, (40,), 8, 1), (5, (200, 40, 40), 16, 4), (37, (72, 24, 24), 8, 8),
                (130, (150, 150), 16, 4), (5, (36, 20, 20), 4, 4),
                (37, (48, 16, 16, 16, 8), 8, 4)]
if ON_CUDA:
    SHRINK_SHAPES += [(1, 4096, 192, 64), (7, 14336, 32, 8), (256, 4096, 48, 8),
                      (2048, 3584, 96, 16)]
    EXPAND_CASES += [(1, (4096, 1024, 1024), 64, 64), (9, (14336, 14336), 16, 8),
                     (512, (3584, 512, 512), 32, 16), (2048, (4096,), 64, 4)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype, seed, scale=1.0):
    return (torch.randn(*shape, generator=_gen(seed)) * scale).to(dtype).to(DEVICE)


def _token_lora(T: int, S: int, pattern: str, seed: int) -> torch.Tensor:
    g = _gen(seed)
    if pattern == "none":
        lora = torch.full((T,), -1)
    elif pattern == "one":
        lora = torch.full((T,), S - 1)
    else:
        lora = torch.randint(-1, S, (T,), generator=g)
        if pattern == "unused":
            lora[lora == S // 2] = -1
        else:
            lora[T // 2] = -1
            lora[0] = S - 1  # (T = 1: the one token has an adapter)
    return lora.to(DEVICE)


@pytest.mark.parametrize("pattern", PATTERNS + ["out_of_range"])
@pytest.mark.parametrize("T,S", [(1, 1), (9, 4), (50, 8), (130, 3)])
def test_lora_segments_invariants(T, S, pattern):
    if pattern == "out_of_range":  # garbage ids count as none, never index out of bounds
        lora = torch.randint(-9, S + 9, (T,), generator=_gen(T)).to(DEVICE)
        lora[0] = 1 << 40
    else:
        lora = _token_lora(T, S, pattern, seed=T * S)
    sorted_tokens, slot_start = lora_segments(lora, S)
    assert sorted_tokens.dtype == torch.int32 and slot_start.dtype == torch.int32
    assert sorted_tokens.shape == (T,) and slot_start.shape == (S + 1,)
    ids = lora.cpu().numpy()
    key = np.where((ids >= 0) & (ids < S), ids, S)
    np.testing.assert_array_equal(sorted_tokens.cpu().numpy(), np.argsort(key, kind="stable"))
    starts = np.concatenate([[0], np.cumsum(np.bincount(key, minlength=S + 1))[:S]])
    np.testing.assert_array_equal(slot_start.cpu().numpy(), starts)
    st, ss = sorted_tokens.cpu().numpy(), slot_start.cpu().numpy()
    assert sorted(st.tolist()) == list(range(T))  # a permutation
    for s in range(S):
        assert (ids[st[ss[s]:ss[s + 1]]] == s).all()
    assert not np.isin(ids[st[ss[S]:]], np.arange(S)).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("shape", SHRINK_SHAPES)
def test_lora_shrink_matches_reference(shape, pattern, dtype):
    skip_half_on_interpreter(SHRINK_SHAPES.index(shape), PATTERNS.index(pattern),
                             DTYPES.index(dtype))
    T, K, R, S = shape
    seed = sum(shape)
    x = _randn(T, K, dtype=dtype, seed=seed)
    a = _randn(S, R, K, dtype=dtype, seed=seed + 1, scale=K ** -0.5)
    lora = _token_lora(T, S, pattern, seed)
    got = lora_shrink(x, a, *lora_segments(lora, S))
    want = lora_shrink_ref(x, a, lora)
    assert got.shape == (T, R) and got.dtype == torch.float32
    tol = SHRINK_TOL[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert (got[lora < 0] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("case", EXPAND_CASES)
def test_lora_expand_matches_reference(case, pattern, dtype):
    skip_half_on_interpreter(EXPAND_CASES.index(case), PATTERNS.index(pattern),
                             DTYPES.index(dtype))
    T, parts, r, S = case
    offs = tuple(np.cumsum((0,) + parts).tolist())
    N, P = offs[-1], len(parts)
    seed = T + N + r + S
    y0 = _randn(T, N, dtype=dtype, seed=seed)
    t = _randn(T, P * r, dtype=torch.float32, seed=seed + 1)
    b = _randn(S, N, r, dtype=dtype, seed=seed + 2, scale=r ** -0.5)
    lora = _token_lora(T, S, pattern, seed)
    got, want = y0.clone(), y0.clone()
    lora_expand(got, t, b, *lora_segments(lora, S), offs)
    lora_expand_ref(want, t, b, lora, offs)
    tol = EXPAND_TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    assert torch.equal(got[lora < 0], y0[lora < 0])  # rows without an adapter untouched
    if (lora >= 0).any():
        assert not torch.equal(got[lora >= 0], y0[lora >= 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,K", [(5, 100), (1, 1100)])  # (1, 1100): split-K
def test_lora_shrink_strided_x_and_out_buffer(T, K, dtype):
    """x as a column slice of a wider tensor, and as a transposed one; out: a larger buffer
    holding garbage, whose first T rows are all written (zeros included) and the rest left."""
    S, R = 4, 24
    a = _randn(S, R, K, dtype=dtype, seed=K + 1, scale=K ** -0.5)
    lora = _token_lora(T, S, "mixed", seed=T)
    if T > 1:
        lora[1] = -1
    seg = lora_segments(lora, S)
    wide = _randn(T, K + 11, dtype=dtype, seed=K)
    views = [wide[:, 3:3 + K], _randn(K, T, dtype=dtype, seed=K + 2).t()]
    assert views[0].stride(0) == K + 11 and views[1].stride(0) == 1
    tol = SHRINK_TOL[dtype]
    for x in views:
        want = lora_shrink_ref(x.contiguous(), a, lora)
        out = torch.full((T + 3, R), float("nan"), device=DEVICE)
        got = lora_shrink(x, a, *seg, out=out)
        assert got.data_ptr() == out.data_ptr() and got.shape == (T, R)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        assert out[T:].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lora_expand_strided_views(dtype):
    """y and t as column slices of wider tensors: only y's own columns and rows change."""
    T, S, r, parts = 37, 4, 8, (40, 24, 24)
    offs = tuple(np.cumsum((0,) + parts).tolist())
    N, P = offs[-1], len(parts)
    y_wide = _randn(T, N + 9, dtype=dtype, seed=1)
    t_wide = _randn(T, P * r + 5, dtype=torch.float32, seed=2)
    b = _randn(S, N, r, dtype=dtype, seed=3, scale=r ** -0.5)
    lora = _token_lora(T, S, "mixed", seed=4)
    want = y_wide[:, 4:4 + N].clone()
    t = t_wide[:, 2:2 + P * r]
    lora_expand_ref(want, t, b, lora, offs)
    before = y_wide.clone()
    lora_expand(y_wide[:, 4:4 + N], t, b, *lora_segments(lora, S), offs)
    tol = EXPAND_TOL[dtype]
    torch.testing.assert_close(y_wide[:, 4:4 + N].float(), want.float(), rtol=tol, atol=tol)
    assert torch.equal(y_wide[:, :4], before[:, :4])
    assert torch.equal(y_wide[:, 4 + N:], before[:, 4 + N:])


def test_lora_split_k_is_deterministic():
    """Split-K partials are summed in a fixed order (no atomics): two runs agree bit for bit."""
    T, K, R, S = 3, 1300, 32, 4
    assert _shrink_config(T, K, R, S, torch.float16)["split_k"] > 1
    x = _randn(T, K, dtype=torch.float16, seed=0)
    a = _randn(S, R, K, dtype=torch.float16, seed=1, scale=K ** -0.5)
    seg = lora_segments(torch.tensor([2, 0, 2], device=DEVICE), S)
    assert torch.equal(lora_shrink(x, a, *seg), lora_shrink(x, a, *seg))


def test_references_match_a_per_token_loop():
    """The references (also the CPU path) against the definition, token by token."""
    T, K, S, r, parts = 7, 10, 3, 4, (6, 3, 3)
    offs = tuple(np.cumsum((0,) + parts).tolist())
    N, P = offs[-1], len(parts)
    x = _randn(T, K, dtype=torch.float16, seed=0).cpu()
    a = _randn(S, P * r, K, dtype=torch.float16, seed=1).cpu()
    b = _randn(S, N, r, dtype=torch.float16, seed=2).cpu()
    y0 = _randn(T, N, dtype=torch.float16, seed=3).cpu()
    lora = torch.tensor([2, -1, 0, 2, 7, 0, -1])  # slot 1 unused, 7 out of range: none
    shrink = lora_shrink_ref(x, a, lora)
    y = y0.clone()
    lora_expand_ref(y, shrink, b, lora, offs)
    for i in range(T):
        s = int(lora[i])
        if not 0 <= s < S:
            assert (shrink[i] == 0).all() and torch.equal(y[i], y0[i])
            continue
        h = x[i].double() @ a[s].double().T  # [P*r]
        torch.testing.assert_close(shrink[i].double(), h, rtol=1e-6, atol=1e-6)
        want = y0[i].double().clone()
        for p in range(P):
            lo, hi = offs[p], offs[p + 1]
            want[lo:hi] += b[s, lo:hi].double() @ shrink[i, p * r:(p + 1) * r].double()
        torch.testing.assert_close(y[i].double(), want.to(torch.float16).double(),
                                   rtol=1e-3, atol=1e-3)


@cuda_only
def test_lora_kernels_replay_in_a_cuda_graph():
    """segments + shrink + expand captured once replay for other adapter mixes (the grid and
    allocations depend on the shapes only, and nothing syncs with the host)."""
    T, K, S, r, parts = 4, 1024, 8, 16, (512, 128, 128)
    offs = tuple(np.cumsum((0,) + parts).tolist())
    N, P = offs[-1], len(parts)
    dtype = torch.bfloat16
    x = _randn(T, K, dtype=dtype, seed=0)
    a = _randn(S, P * r, K, dtype=dtype, seed=1, scale=K ** -0.5)
    b = _randn(S, N, r, dtype=dtype, seed=2, scale=r ** -0.5)
    y0 = _randn(T, N, dtype=dtype, seed=3)
    lora = torch.tensor([0, -1, 3, 0], device=DEVICE)
    y = y0.clone()

    def step():
        seg = lora_segments(lora, S)
        lora_expand(y, lora_shrink(x, a, *seg), b, *seg, offs)

    step()  # compiles
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for mix in ([5, 5, -1, 2], [-1, -1, -1, -1], [7, 6, 5, 4]):
        lora.copy_(torch.tensor(mix))
        y.copy_(y0)
        graph.replay()
        want = y0.clone()
        lora_expand_ref(want, lora_shrink_ref(x, a, lora), b, lora, offs)
        torch.testing.assert_close(y.float(), want.float(), rtol=2e-2, atol=2e-2)
