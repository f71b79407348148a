"""GGUF block formats: the PyTorch dequantizers (quantization/gguf_formats.py) against the gguf
package's numpy reference (bit-exact in fp32), and the Triton kernels (kernels/gguf_matmul.py)
against them.

Kernel tests run on CUDA; on a CPU-only machine a small-shape subset runs under Triton's
interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before the kernels are defined). The
interpreter's tl.dot is wrong on bf16 operands (see test_kernels.py), so there the dot path
(M = 2..16) runs in fp16 only; bf16 runs the FMA (M = 1) and prefill (dequantize + F.linear)
paths.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

gguf = pytest.importorskip("gguf")
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize_ref, quantize as gguf_quantize  # noqa: E402

from servelm.quantization.gguf_formats import (  # noqa: E402
    GGUF_BLOCK_SIZES, GGUF_QUANT_TYPES, dequantize_gguf, gguf_linear_ref, gguf_row_bytes,
    random_gguf_blocks)

QUANT = [2, 3, 8, 12, 13, 14]  # Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K
PLAIN = [0, 1, 30]  # F32, F16, BF16
NAME = {t: GGUF_QUANT_TYPES[t] for t in QUANT + PLAIN}


def _qk(t: int) -> int:
    return GGUF_BLOCK_SIZES[t][0]


def _raw(n: int, k: int, t: int, seed: int) -> torch.Tensor:
    return random_gguf_blocks(n, k, t, torch.Generator().manual_seed(seed))


def _ref32(raw: torch.Tensor, t: int) -> torch.Tensor:
    """The gguf package's dequantization, fp32 [N, K]."""
    out = gguf_dequantize_ref(raw.cpu().numpy(), GGMLQuantizationType(t))
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


# ---- PyTorch reference vs the gguf package ------------------------------------------------

def test_tables_match_gguf():
    for t, name in GGUF_QUANT_TYPES.items():
        assert GGMLQuantizationType(t).name == name
        assert GGUF_BLOCK_SIZES[t] == GGML_QUANT_SIZES[GGMLQuantizationType(t)]


@pytest.mark.parametrize("t", QUANT + PLAIN, ids=NAME.get)
@pytest.mark.parametrize("blocks,n", [(1, 1), (2, 7), (9, 33), (16, 4)])
def test_dequantize_matches_gguf(t, blocks, n):
    k = blocks * max(_qk(t), 32)
    raw = _raw(n, k, t, seed=blocks * 100 + n + t)
    ref = _ref32(raw, t)
    assert torch.isfinite(ref).all() and ref.abs().max() > 0
    out = dequantize_gguf(raw, t, k)
    assert out.dtype == torch.float32 and out.shape == (n, k)
    assert torch.equal(out, ref)
    for dt in (torch.bfloat16, torch.float16):  # one rounding of the fp32 values
        assert torch.equal(dequantize_gguf(raw, t, k, dt), ref.to(dt))


@pytest.mark.parametrize("t", [2, 3, 8], ids=NAME.get)
def test_dequantize_real_quantized_blocks(t):
    # blocks written by the gguf package's own quantizers (llama.cpp's rounding rules)
    w = np.random.default_rng(t).standard_normal((6, 256)).astype(np.float32)
    raw = gguf_quantize(w, GGMLQuantizationType(t))
    out = dequantize_gguf(torch.from_numpy(raw), t, 256)
    assert torch.equal(out, _ref32(torch.from_numpy(raw), t))
    assert (out - torch.from_numpy(w)).abs().max() < 0.5  # it is the weight, quantized


def test_row_bytes_and_errors():
    assert gguf_row_bytes(2, 4096) == 128 * 18
    assert gguf_row_bytes(12, 4096) == 16 * 144
    assert gguf_row_bytes(14, 14336) == 56 * 210
    assert gguf_row_bytes(30, 10) == 20
    with pytest.raises(ValueError, match="Q2_K"):
        gguf_row_bytes(10, 256)
    with pytest.raises(ValueError, match="Q4_K"):
        gguf_row_bytes(12, 300)
    with pytest.raises(ValueError, match="uint8"):
        dequantize_gguf(torch.zeros(2, 36, dtype=torch.uint8), 2, 32)


def test_linear_ref():
    raw = _raw(24, 512, 12, seed=1)
    x = torch.randn(5, 512).to(torch.bfloat16)
    b = torch.randn(24).to(torch.bfloat16)
    out = gguf_linear_ref(x, raw, 12, b)
    assert out.dtype == torch.bfloat16 and out.shape == (5, 24)
    assert torch.equal(out, F.linear(x, _ref32(raw, 12).to(torch.bfloat16), b))


# ---- kernels ----------------------------------------------------------------------------------

triton = pytest.importorskip("triton")
from servelm.kernels.gguf_matmul import (  # noqa: E402
    MAX_M, GgufConfig, gguf_dequantize, gguf_linear, select_config, use_gguf_kernel,
    warmup_gguf)

from tests.unit.kernel_env import DEVICE, INTERPRET, ON_CUDA, covering  # noqa: E402
needs_kernel = pytest.mark.skipif(not (ON_CUDA or INTERPRET),
                                  reason="needs CUDA, or TRITON_INTERPRET=1 for the interpreter")
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="CUDA only")

# ||out - ref|| / ||ref|| allowed against the fp32 product of the same inputs: the output's own
# rounding is ~2e-3 (bf16), ~3e-4 (fp16); the dot path's bf16 scaling adds up to ~2x that
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _check(t, m, n, k, dtype, *, bias=True, seed=0, config=None, x_pad=0, raw=None, w32=None):
    """One gguf_linear call on random inputs into a NaN-poisoned output; returns the rel error."""
    g = torch.Generator().manual_seed(seed)
    if raw is None:
        raw = _raw(n, k, t, seed)
        w32 = _ref32(raw, t)
        raw = raw.to(DEVICE)
    x = (torch.randn(m, k + x_pad, generator=g) * 0.5).to(dtype).to(DEVICE)[:, :k]
    b = torch.randn(n, generator=g).to(dtype).to(DEVICE) if bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    res = gguf_linear(x, raw, t, k, b, out=out, config=config)
    assert res.shape == (m, n) and res.dtype == dtype and res.data_ptr() == out.data_ptr()
    assert torch.isfinite(out).all(), "output not fully written"
    ref = x.float().cpu() @ w32.t()
    if b is not None:
        ref += b.float().cpu()
    err = ((out.float().cpu() - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype], f"rel err {err:.2e}: {NAME[t]} M={m} N={n} K={k} {dtype} {config}"
    return err


def _dot_dtype_ok(dtype, cfg) -> bool:
    return not (INTERPRET and dtype == torch.bfloat16 and cfg.use_dot)


def test_magic_int_to_float():
    # the kernels' int->float trick: OR-ing q into the mantissa of 2**23 / 2**10 / 2**7 gives
    # 2**23 + q (fp32), 1024 + q (fp16), 128 + q (bf16) exactly, for every q the formats use
    # (the interpreter's bf16 arithmetic is unusable, so the bf16 constants are checked here)
    q = torch.arange(256, dtype=torch.int32)
    assert torch.equal((q | 0x4B000000).view(torch.float32) - 2 ** 23, q.float())
    assert torch.equal(((q | 0x6400).to(torch.int16).view(torch.float16) - 1024).float(), q.float())
    q7 = q[:128]  # up to 6-bit quants (bf16 has 7 mantissa bits; Q8_0 under bf16 uses fp32)
    assert torch.equal(((q7 | 0x4300).to(torch.int16).view(torch.bfloat16) - 128).float(),
                       q7.float())


@needs_kernel
@pytest.mark.parametrize("t", QUANT, ids=NAME.get)
def test_kernel_dequantize(t):
    # fp32: the reference's values (bit-exact in the interpreter; on CUDA a fused multiply-add
    # may round a scaled quant and its offset once instead of twice)
    for n, blocks in ((19, 3), (8, 8)):
        k = blocks * _qk(t)
        raw = _raw(n, k, t, seed=n + t)
        ref = _ref32(raw, t)
        out = gguf_dequantize(raw.to(DEVICE), t, k, torch.float32).cpu()
        if INTERPRET:
            assert torch.equal(out, ref)
        else:
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-6 * ref.abs().max().item())
        lo = gguf_dequantize(raw.to(DEVICE), t, k, torch.bfloat16).cpu().float()
        torch.testing.assert_close(lo, ref, rtol=2 ** -7, atol=1e-30)  # one bf16 rounding


LINEAR_N, LINEAR_K = 40, 512
# default configs at M = 1 (FMA), 3 and 16 (dot), 40 (dequantize + F.linear): every
# combination with both dtypes on CUDA; on the interpreter every pair of values of two of
# format, dtype and M meets (no tl.dot on bf16 there)
LINEAR_CASES = covering(QUANT, [torch.bfloat16, torch.float16], [1, 3, 16, 40],
                        keep=lambda t, dtype, m: m > MAX_M or _dot_dtype_ok(
                            dtype, select_config(m, LINEAR_N, LINEAR_K, t)))


@needs_kernel
@pytest.mark.parametrize("t,dtype,m", LINEAR_CASES,
                         ids=[f"{NAME[t]}-{dtype}-{m}" for t, dtype, m in LINEAR_CASES])
def test_kernel_linear(t, dtype, m):
    raw = _raw(LINEAR_N, LINEAR_K, t, seed=t)
    w32 = _ref32(raw, t)
    _check(t, m, LINEAR_N, LINEAR_K, dtype, bias=m != 3, seed=m, raw=raw.to(DEVICE), w32=w32)


# configs covering each code path: FMA (masked / even, split), dot (split), fused GEMM over M
PATHS = [
    GgufConfig(block_n=4, blocks=2),
    GgufConfig(block_n=8, blocks=4, split_k=3),
    GgufConfig(block_n=16, blocks=2, use_dot=True, num_warps=2),
    GgufConfig(block_n=32, blocks=1, use_dot=True, split_k=2),
    GgufConfig(block_n=16, blocks=2, use_dot=True, block_m=32),
]


@needs_kernel
@pytest.mark.parametrize("t", QUANT, ids=NAME.get)
@pytest.mark.parametrize("cfg", PATHS, ids=str)
def test_kernel_paths_ragged(t, cfg):
    # N not a multiple of BLOCK_N, K not a multiple of the tile, non-contiguous x rows
    n, k = 21, 3 * _qk(t) if _qk(t) == 256 else 7 * _qk(t)
    dtype = torch.float16 if cfg.use_dot else torch.bfloat16
    m = 40 if cfg.block_m > MAX_M else 3 if cfg.use_dot else 2
    _check(t, m, n, k, dtype, bias=cfg.split_k > 1, seed=n + t, config=cfg, x_pad=6)


@needs_kernel
def test_leading_dims_and_plain_types():
    raw = _raw(24, 256, 12, seed=3).to(DEVICE)
    x = torch.randn(2, 3, 256).to(torch.float16).to(DEVICE)
    out = gguf_linear(x, raw, 12, 256)
    assert out.shape == (2, 3, 24)
    ref = x.float().reshape(6, 256).cpu() @ _ref32(raw.cpu(), 12).t()
    assert ((out.float().reshape(6, 24).cpu() - ref).norm() / ref.norm()).item() < 2e-3
    assert gguf_linear(x[:, :0].reshape(0, 256), raw, 12, 256).shape == (0, 24)
    for t in PLAIN:  # F32/F16/BF16 tensors: views, F.linear
        raw = _raw(8, 64, t, seed=t).to(DEVICE)
        x = torch.randn(3, 64).to(torch.bfloat16).to(DEVICE)
        torch.testing.assert_close(gguf_linear(x, raw, t, 64), gguf_linear_ref(x, raw, t))


def test_bad_inputs():
    raw = _raw(8, 64, 2, seed=0)
    with pytest.raises(ValueError, match="K=64"):
        gguf_linear(torch.randn(2, 32).half(), raw, 2, 64)
    with pytest.raises(ValueError, match="bf16/fp16"):
        gguf_linear(torch.randn(2, 64), raw, 2, 64)
    with pytest.raises(ValueError, match="uint8"):
        gguf_linear(torch.randn(2, 64).half(), raw[:, :30], 2, 64)
    with pytest.raises(ValueError, match="Q3_K"):
        gguf_linear(torch.randn(2, 256).half(), raw, 11, 256)
    with pytest.raises(ValueError, match="bias"):
        gguf_linear(torch.randn(2, 64).half(), raw, 2, 64, torch.randn(7).half())


def test_config_table():
    shapes = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096),
              (4608, 3584), (3584, 18944), (1024, 4096), (37, 512)]
    for t in QUANT:
        for n, k in shapes:
            for m in range(1, MAX_M + 1):
                cfg = select_config(m, n, k, t)
                assert cfg == select_config(m, n, k, t)  # deterministic, hashable
                assert cfg.block_n & (cfg.block_n - 1) == 0 and cfg.blocks & (cfg.blocks - 1) == 0
                assert 1 <= cfg.split_k <= 8 and cfg.num_warps in (1, 2, 4, 8)
                assert cfg.use_dot == (m > 1)
                if cfg.use_dot:
                    assert cfg.block_n >= 16 and cfg.blocks * _qk(t) >= 32


def test_use_gguf_kernel_rule():
    x = torch.randn(1, 256).to(torch.bfloat16)
    assert not use_gguf_kernel(x, 12)  # CPU: the reference
    if torch.cuda.is_available():
        xc = x.cuda()
        assert all(use_gguf_kernel(xc, t) for t in QUANT)
        assert not use_gguf_kernel(xc.float(), 12)
        assert not any(use_gguf_kernel(xc, t) for t in PLAIN + [10, 11])


@needs_kernel
def test_warmup():
    warmup_gguf([(40, 256, 12), (24, 64, 2, True)], torch.float16, DEVICE, max_m=4)


# ---- CUDA only: model shapes, graphs -----------------------------------------------------------

@cuda_only
@pytest.mark.parametrize("t", QUANT, ids=NAME.get)
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (1000, 4608)])
def test_model_shapes(t, n, k):
    raw = _raw(n, k, t, seed=n)
    w32 = _ref32(raw, t)
    raw = raw.cuda()
    for m in (1, 2, 3, 8, 16, 64):
        _check(t, m, n, k, torch.bfloat16, bias=m == 3, seed=m, raw=raw, w32=w32)
    _check(t, 1, n, k, torch.float16, seed=1, raw=raw, w32=w32)
    _check(t, 5, n, k, torch.float16, seed=5, raw=raw, w32=w32)


@cuda_only
@pytest.mark.parametrize("t", QUANT, ids=NAME.get)
def test_paths_large(t):
    n, k = 2304, 5 * 1024
    raw = _raw(n, k, t, seed=t)
    w32 = _ref32(raw, t)
    raw = raw.cuda()
    for cfg in PATHS + [GgufConfig(block_n=64, blocks=2, use_dot=True, block_m=64, num_warps=8)]:
        for m in ((3, 16, 100) if cfg.use_dot else (1, 2)):
            _check(t, m, n, k, torch.bfloat16, seed=m, config=cfg, raw=raw, w32=w32)


@cuda_only
def test_cuda_graph_capture():
    shapes = [(512, 1024, 2), (384, 1024, 12, True)]
    warmup_gguf(shapes, torch.bfloat16, "cuda")
    raws = [_raw(n, k, t, seed=n).cuda() for n, k, t, *_ in shapes]
    for m in (1, 4):
        x = torch.randn(m, 1024, device="cuda").bfloat16()
        b = torch.randn(384, device="cuda").bfloat16()
        eager = [gguf_linear(x, raws[0], 2, 1024), gguf_linear(x, raws[1], 12, 1024, b)]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = [gguf_linear(x, raws[0], 2, 1024), gguf_linear(x, raws[1], 12, 1024, b)]
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        fresh = [gguf_linear(x, raws[0], 2, 1024), gguf_linear(x, raws[1], 12, 1024, b)]
        for o, f, e in zip(outs, fresh, eager):
            assert torch.equal(o, f) and not torch.equal(o, e)
