"""linear_small_m (small-M GEMV kernels) vs the fp32 product of the same bf16/fp16 inputs.

Kernel tests run on CUDA; on a CPU-only machine with triton installed, a small-shape subset runs
under the interpreter when TRITON_INTERPRET=1 is set before the kernels are defined (as
tests/conftest.py does when there is no CUDA device). The config-table tests are plain Python and
run wherever triton imports.
"""
from __future__ import annotations


import pytest
import torch

triton = pytest.importorskip("triton")

from servelm.kernels.gemv import (  # noqa: E402
    _TABLE, GemvConfig, _bucket, linear_small_m, linear_small_m_ref, select_config,
    use_small_m_kernel, warmup_gemv)

from tests.unit.kernel_env import DEVICE, INTERPRET, ON_CUDA, covering  # noqa: E402
needs_kernel = pytest.mark.skipif(not (ON_CUDA or INTERPRET),
                                  reason="needs CUDA, or TRITON_INTERPRET=1 for the interpreter")
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="CUDA only")

# ||out - ref|| / ||ref|| allowed; the output's own rounding is ~2e-3 (bf16), ~3e-4 (fp16)
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = [torch.bfloat16, torch.float16]

LLAMA8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]
QWEN7B = [(4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944), (152064, 3584)]
LLAMA1B = [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (128256, 2048)]

# configs covering each code path: FMA at BLOCK_M 1/2/4/8, dot, split-K (buffer, atomics)
PATHS = [
    GemvConfig(block_n=8, block_k=64),
    GemvConfig(block_n=4, block_k=32, num_warps=2),
    GemvConfig(block_n=8, block_k=64, split_k=3),
    GemvConfig(block_n=16, block_k=32, num_stages=3),
    GemvConfig(block_n=8, block_k=32, split_k=4, atomic=True),
    GemvConfig(block_n=16, block_k=64, use_dot=True, num_stages=3),
    GemvConfig(block_n=32, block_k=32, use_dot=True, num_stages=2, split_k=2),
    GemvConfig(block_n=16, block_k=32, use_dot=True, split_k=3, atomic=True),
    GemvConfig(block_n=64, block_k=32, use_dot=True, num_stages=3, swap_ab=True),
    GemvConfig(block_n=16, block_k=64, use_dot=True, split_k=2, swap_ab=True),
]


def _randn(*shape, dtype, seed, scale=1.0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=DEVICE) * scale).to(dtype)


def _weights(n, k, dtype, seed, bias):
    w = _randn(n, k, dtype=dtype, seed=seed + 1, scale=k ** -0.5)
    b = _randn(n, dtype=dtype, seed=seed + 2) if bias else None
    return w, b


def _check(m, n, k, dtype, bias, seed, config=None, x_pad=0, wb=None, w32=None):
    """One call on fresh random inputs into a NaN-poisoned output; returns the relative error.
    wb: (weight, bias) to reuse, w32: weight.float() to reuse (large shapes)."""
    x = _randn(m, k + x_pad, dtype=dtype, seed=seed)[:, :k]  # x_pad: rows not contiguous
    w, b = wb if wb is not None else _weights(n, k, dtype, seed, bias)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    res = linear_small_m(x, w, b, out=out, config=config)
    assert res.data_ptr() == out.data_ptr() and res.shape == (m, n)
    assert torch.isfinite(out).all(), "output not fully written"
    ref = x.float() @ (w32 if w32 is not None else w.float()).t()
    if b is not None:
        ref += b.float()
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype], f"rel err {err:.2e} for M={m} N={n} K={k} {dtype} {config}"
    return err


def _interp_dtypes(cfg):
    # the interpreter's tl.dot on bf16 operands is wrong (see test_kernels.py): fp16 there
    return [torch.float16] if (INTERPRET and cfg.use_dot) else DTYPES


# ---- small shapes: CUDA, or CPU under TRITON_INTERPRET=1 -----------------------------------

@needs_kernel
@pytest.mark.parametrize("m,n,k", [(1, 37, 100), (2, 64, 256), (3, 19, 200), (4, 33, 72),
                                   (5, 40, 136), (8, 7, 64), (16, 50, 96)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_small_default_config(m, n, k, dtype, bias):
    cfg = select_config(m, n, k, dtype)
    if INTERPRET and cfg.use_dot and dtype == torch.bfloat16:
        pytest.skip("interpreter tl.dot on bf16")
    _check(m, n, k, dtype, bias, seed=m * 1000 + n + k)


# (N, K): with a bias, a tail of K; rows of x not contiguous, an even K
SMALL_PATH_SHAPES = [(29, 130), (48, 256)]


def _small_path_runs(cfg, m, shape, dtype) -> bool:
    # FMA past 8 rows is slow in the interpreter
    return dtype in _interp_dtypes(cfg) and not (INTERPRET and not cfg.use_dot and m > 8)


# every combination on CUDA; on the interpreter every pair of values of two of config, rows,
# shape and dtype meets
@needs_kernel
@pytest.mark.parametrize("cfg,m,shape,dtype", covering(
    PATHS, [1, 2, 3, 4, 7, 16], SMALL_PATH_SHAPES, DTYPES, keep=_small_path_runs), ids=str)
def test_small_paths(cfg, m, shape, dtype):
    i = SMALL_PATH_SHAPES.index(shape)
    _check(m, *shape, dtype, bias=i == 0, seed=7 * m + i, config=cfg, x_pad=3 * i)


@needs_kernel
@pytest.mark.parametrize("cfg", [None, PATHS[0], PATHS[5]], ids=str)
def test_m_over_16_chunks(cfg):
    _check(37, 24, 48, torch.float16, bias=True, seed=37, config=cfg)


@needs_kernel
def test_leading_dims_and_empty():
    x = _randn(2, 3, 40, dtype=torch.float16, seed=3)
    w = _randn(24, 40, dtype=torch.float16, seed=4)
    out = linear_small_m(x, w)
    assert out.shape == (2, 3, 24)
    ref = linear_small_m_ref(x.float(), w.float())
    assert ((out.float() - ref).norm() / ref.norm()).item() < TOL[torch.float16]
    empty = linear_small_m(x[:0].reshape(0, 40), w)
    assert empty.shape == (0, 24)


def test_bad_inputs():
    w = torch.randn(8, 16).to(torch.bfloat16)
    with pytest.raises(ValueError):
        linear_small_m(torch.randn(2, 16).to(torch.float16), w)
    with pytest.raises(ValueError):
        linear_small_m(torch.randn(2, 15).to(torch.bfloat16), w)
    with pytest.raises(ValueError):
        linear_small_m(torch.randn(2, 16), torch.randn(8, 16))
    with pytest.raises(ValueError):
        linear_small_m(torch.randn(2, 16).to(torch.bfloat16), w, torch.randn(7).bfloat16())


def test_config_table():
    shapes = set(LLAMA8B + QWEN7B + LLAMA1B) | set(_TABLE)
    for n, k in shapes:
        for m in range(1, 17):
            cfg = select_config(m, n, k, torch.bfloat16)
            assert cfg == select_config(m, n, k, torch.bfloat16)  # deterministic
            assert cfg.block_k & (cfg.block_k - 1) == 0 and cfg.block_n & (cfg.block_n - 1) == 0
            assert cfg.split_k >= 1 and cfg.num_warps in (1, 2, 4, 8, 16)
            if cfg.use_dot:
                assert cfg.block_n >= 16 and cfg.block_k >= 16
            else:  # the FMA path's fp32 register tile stays small
                assert cfg.block_m(m) * cfg.block_n * cfg.block_k <= 64 * 32 * cfg.num_warps
    assert _bucket(1) == 1 and _bucket(3) == 4 and _bucket(9) == 16


def test_use_small_m_kernel_rule():
    assert not use_small_m_kernel(1, 4096, 4096, torch.bfloat16, "cpu")
    assert not use_small_m_kernel(1, 4096, 4096, torch.float32, "cuda")
    assert use_small_m_kernel(1, 4096, 4096, torch.bfloat16, "cuda")
    assert use_small_m_kernel(8, 128256, 4096, torch.float16, "cuda")
    assert not use_small_m_kernel(64, 4096, 4096, torch.bfloat16, "cuda")
    assert not use_small_m_kernel(1, 4096, 4104, torch.bfloat16, "cuda")  # rows not 16B-aligned


# ---- CUDA only: many shapes, the model shapes with their tuned configs, graphs ---------------

@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(1, 8), (7, 24), (257, 1000), (1000, 4095), (4097, 4096),
                                 (3000, 777), (129, 14336), (6144, 4096)])
def test_many_shapes(dtype, n, k):
    w, b = _weights(n, k, dtype, seed=n + k, bias=True)
    for m in range(1, 17):
        _check(m, n, k, dtype, bias=m % 2 == 0, seed=m + n + k, x_pad=8 * (m % 3 == 0),
               wb=(w, b if m % 2 == 0 else None))


@cuda_only
@pytest.mark.parametrize("n,k", LLAMA8B + QWEN7B + LLAMA1B)
def test_model_shapes(n, k):
    w, b = _weights(n, k, torch.bfloat16, seed=n, bias=True)
    w32 = w.float()
    for m in (1, 2, 3, 4, 6, 8, 12, 16):
        _check(m, n, k, torch.bfloat16, bias=m == 3, seed=n + m, wb=(w, b if m == 3 else None),
               w32=w32)
    del w, b, w32
    _check(1, n, k, torch.float16, bias=True, seed=n)


@cuda_only
@pytest.mark.parametrize("cfg", PATHS + [
    GemvConfig(block_n=8, block_k=512, split_k=4, num_stages=4),
    GemvConfig(block_n=64, block_k=256, use_dot=True, num_warps=8, num_stages=3, split_k=8),
    GemvConfig(block_n=128, block_k=128, use_dot=True, num_warps=8, num_stages=4, swap_ab=True),
    GemvConfig(block_n=64, block_k=128, use_dot=True, num_stages=6, swap_ab=True)], ids=str)
def test_paths_large(cfg):
    for m in (1, 3, 4, 8, 16):
        if not cfg.use_dot and m > 4:  # the FMA tile of 8 or 16 rows would spill here
            continue
        _check(m, 2304, 5000, torch.bfloat16, bias=m == 3, seed=m, config=cfg)
    _check(2, 2304, 5000, torch.float16, bias=False, seed=2, config=cfg)


@cuda_only
def test_cuda_graph_capture():
    shapes = [(6144, 4096, False), (4608, 3584, True), (2048, 8192, False)]
    warmup_gemv(shapes, torch.bfloat16, "cuda", max_m=8)
    for n, k, has_bias in shapes:
        for m in (1, 4, 8):
            w = _randn(n, k, dtype=torch.bfloat16, seed=n, scale=k ** -0.5)
            b = _randn(n, dtype=torch.bfloat16, seed=k) if has_bias else None
            x = _randn(m, k, dtype=torch.bfloat16, seed=m)
            out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
            linear_small_m(x, w, b, out=out)  # warm: compiled by warmup_gemv already
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                linear_small_m(x, w, b, out=out)
            for seed in (11, 12):
                x.copy_(_randn(m, k, dtype=torch.bfloat16, seed=seed))
                out.fill_(float("nan"))
                g.replay()
                torch.cuda.synchronize()
                ref = linear_small_m_ref(x.float(), w.float(), None if b is None else b.float())
                assert torch.isfinite(out).all()
                err = ((out.float() - ref).norm() / ref.norm()).item()
                assert err < TOL[torch.bfloat16], (n, k, m, err)
