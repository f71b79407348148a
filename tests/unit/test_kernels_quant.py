"""Quantized linear kernels (servelm/kernels/quant_matmul.py) vs the references of
servelm/quantization/ref.py, and the references' own round trips.

Kernel tests run on CUDA; on a CPU-only machine a small-shape subset runs under Triton's
interpreter (TRITON_INTERPRET=1, set by tests/conftest.py when there is no CUDA device). All three
formats run there, fp8 included: the interpreter loads e4m3 and multiplies it in tl.dot correctly
(its fp32 -> e4m3 cast of inexact values is wrong, which the kernels never rely on: they round in
integer arithmetic first). The interpreter's tl.dot on bf16 operands is wrong (see
test_kernels.py), so the int4/int8 tensor-core paths (M >= 2 by default, and every GEMM) run in
fp16 there and in both dtypes on CUDA. torch._scaled_mm (fp8, bf16, M > 16) is CUDA-only.
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from servelm.kernels.quant_matmul import (  # noqa: E402
    MAX_M, QGemmConfig, QGemvConfig, fp8_linear, fp8_quantize_per_token, int4_linear,
    int8_linear, select_gemm_config, select_gemv_config, use_quant_kernel, warmup_quant_matmul)
from servelm.quantization import ref  # noqa: E402

from tests.unit.kernel_env import DEVICE, INTERPRET, ON_CUDA, covering  # noqa: E402

needs_kernel = pytest.mark.skipif(not (ON_CUDA or INTERPRET),
                                  reason="needs CUDA, or TRITON_INTERPRET=1 for the interpreter")
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="CUDA only")

# ||out - ref|| / ||ref||: the output's own rounding is ~2e-3 (bf16), ~3e-4 (fp16); the int4
# FMA path does not round w to x's dtype as the reference does (~1e-3 more in bf16)
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = [torch.bfloat16, torch.float16]
LLAMA8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=DEVICE) * scale).to(dtype)


def _dot_dtype_ok(dtype, cfg) -> bool:
    """False where the config's path would run tl.dot on bf16 under the interpreter."""
    return not (INTERPRET and dtype == torch.bfloat16 and getattr(cfg, "use_dot", True))


def _make(method, n, k, g, dtype, seed, bias):
    """-> (weights tuple for the kernel, reference weight [N, K] fp32 as ref.py dequantizes it,
    bias or None); fp8's reference is the e4m3 weight times its scale."""
    w = _randn(n, k, dtype=dtype, seed=seed, scale=k ** -0.5)
    b = _randn(n, dtype=dtype, seed=seed + 1) if bias else None
    if method == "int4":
        qw, s, z = ref.quantize_int4(w, g)
        return (qw, s, z), ref.dequantize_int4(qw, s, z, g).float(), b
    if method == "int8":
        qw, s = ref.quantize_int8(w, g)
        return (qw, s), ref.dequantize_int8(qw, s, g).float(), b
    wq, ws = ref.quantize_fp8_per_channel(w)
    return (wq, ws), None, b


def _run(method, x, weights, g, b, cfg):
    if method == "int4":
        return int4_linear(x, *weights, g, b, config=cfg)
    if method == "int8":
        return int8_linear(x, *weights, g, b, config=cfg)
    return fp8_linear(x, *weights, b, config=cfg)


def _reference(method, x, weights, w32, b):
    """fp32 product with ref.py's semantics (w dequantized and rounded as ref.py does it; fp8:
    x quantized per token by the reference, both scales, fp32 accumulation)."""
    if method == "fp8":
        wq, ws = weights
        xq, xs = ref.quantize_fp8_per_token(x)
        y = (xq.float() @ wq.float().t()) * xs[:, None] * ws[None, :]
    else:
        y = x.float() @ w32.t()
    return y + b.float() if b is not None else y


def _check(method, m, n, k, g, dtype, bias, seed, cfg=None, x_pad=0, made=None, tol=None):
    """One call on random inputs; returns the relative error. x_pad: rows not contiguous."""
    weights, w32, b = made if made is not None else _make(method, n, k, g, dtype, seed, bias)
    x = _randn(m, k + x_pad, dtype=dtype, seed=seed + 7)[:, :k]
    out = _run(method, x, weights, g, b, cfg)
    assert out.shape == (m, n) and out.dtype == dtype
    assert torch.isfinite(out).all(), "output not fully written"
    want = _reference(method, x, weights, w32, b)
    err = ((out.float() - want).norm() / want.norm()).item()
    limit = tol or TOL[dtype]
    assert err < limit, f"{method} rel err {err:.2e} M={m} N={n} K={k} G={g} {dtype} {cfg}"
    return err


# ---- the references' own round trips (any device) ---------------------------------------------

def test_int4_pack_unpack_inverse():
    q = torch.randint(0, 16, (96, 37), generator=torch.Generator().manual_seed(0),
                      dtype=torch.int32)
    packed = ref.pack_int4(q)
    assert packed.shape == (12, 37) and packed.dtype == torch.int32
    assert torch.equal(ref.unpack_int4(packed), q)
    # the top nibble set makes the word negative: unpacking must still drop the sign bits
    assert (packed < 0).any()
    with pytest.raises(ValueError):
        ref.pack_int4(q[:95])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", [32, 128])
def test_int4_roundtrip_error_bounded(dtype, g):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(g)).to(dtype)
    qw, s, z = ref.quantize_int4(w, g)
    assert qw.shape == (32, 48) and s.shape == z.shape == (256 // g, 48)
    assert s.dtype == z.dtype == dtype and ((z >= 0) & (z <= 15)).all()
    deq = ref.dequantize_int4(qw, s, z, g)
    err = (deq.float() - w.float()).abs()  # [N, K]
    step = s.float().t().repeat_interleave(g, dim=1)  # each element's scale
    # round to nearest: half a step, plus the zero point's rounding where the range is clamped,
    # plus deq's own rounding to dtype
    bound = step * 1.02 + deq.float().abs() * torch.finfo(dtype).eps
    assert (err <= bound).all(), (err / step).max()
    assert (err / step).mean() < 0.3  # most elements well inside half a step


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", [32, 256])
def test_int8_roundtrip_error_bounded(dtype, g):
    w = torch.randn(40, 256, generator=torch.Generator().manual_seed(g)).to(dtype)
    qw, s = ref.quantize_int8(w, g)
    assert qw.dtype == torch.int8 and s.shape == (40, 256 // g) and s.dtype == dtype
    deq = ref.dequantize_int8(qw, s, g)
    err = (deq.float() - w.float()).abs()
    step = s.float().repeat_interleave(g, dim=1)
    bound = step * 0.51 + deq.float().abs() * torch.finfo(dtype).eps
    assert (err <= bound).all(), (err / step).max()


def test_fp8_roundtrip_error_bounded():
    w = torch.randn(24, 200, generator=torch.Generator().manual_seed(3))
    wq, ws = ref.quantize_fp8_per_channel(w)
    assert wq.dtype == torch.float8_e4m3fn and ws.shape == (24,) and ws.dtype == torch.float32
    assert torch.allclose(wq.float().abs().amax(dim=1), torch.full((24,), 448.0))
    deq = wq.float() * ws[:, None]
    # e4m3 keeps 3 mantissa bits: half an ulp is 2**-4 relative; below 2**-6 * scale the
    # subnormal step 2**-9 * scale applies
    bound = torch.maximum(w.abs() * 2.0 ** -4, ws[:, None] * 2.0 ** -10) * 1.0001
    assert ((deq - w).abs() <= bound).all()
    xq, xs = ref.quantize_fp8_per_token(w)
    assert torch.equal(xq.view(torch.uint8), wq.view(torch.uint8)) and torch.equal(xs, ws)


# ---- fp8 activation quantization: bit-identical to the reference ------------------------------

def _fp8_edge_rows(k: int) -> torch.Tensor:
    """Rows whose quantized values land exactly on e4m3 ties and in the subnormal range."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = codes[torch.isfinite(codes)].unique()  # sorted, 253 values incl. -0/+0 -> one 0
    mids = (grid[1:] + grid[:-1]) / 2
    row = torch.cat([mids, grid, -mids])[:k]
    row = torch.cat([row, torch.full((k - row.numel(),), 0.5)]) if row.numel() < k else row
    row[0] = 448.0  # amax exactly 448: the scale is exactly 1
    return torch.stack([row, row * 2.0 ** -5, row * 3.0])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k", [(1, 64), (3, 200), (5, 1000), (2, 16384 + 100)])
def test_fp8_quantize_matches_reference(dtype, m, k):
    # magnitudes over ~10 binades (finite in fp16), so rows reach e4m3's subnormals too
    x = _randn(m, k, seed=m * k) * torch.exp(_randn(m, k, seed=k) * 2).clamp(max=2000.0)
    if dtype == torch.float32 and k >= 600:
        x[:3] = _fp8_edge_rows(k)[:m].to(DEVICE)
    x = x.to(dtype)
    xq, xs = fp8_quantize_per_token(x)
    want_q, want_s = ref.quantize_fp8_per_token(x)
    assert torch.equal(xs, want_s)
    assert torch.equal(xq.view(torch.uint8), want_q.view(torch.uint8))


# ---- kernels vs references: small shapes (CUDA, or CPU under the interpreter) -----------------

# (M, N, K, G): odd M, N not a multiple of any tile, K a multiple of G, G == K, G not dividing K
# (the last group shorter, as ref.py allows), K not a multiple of the tiles; M = 33 and 130 take
# the GEMM
SHAPES = [(1, 37, 256, 64), (3, 50, 128, 32), (7, 24, 192, 64), (16, 33, 256, 128),
          (1, 20, 104, 104), (1, 30, 200, 64), (2, 72, 96, 64), (33, 40, 160, 64),
          (130, 29, 64, 64)]


def _default_config(method, m, n, k, g):
    sel = select_gemv_config if m <= MAX_M else select_gemm_config
    return sel(method, m, n, k, g)


# every combination on CUDA; on the interpreter every pair of values of two of method, shape
# and dtype meets (no tl.dot on bf16 there)
@needs_kernel
@pytest.mark.parametrize("method,shape,dtype", covering(
    ["int4", "int8", "fp8"], SHAPES, DTYPES,
    keep=lambda method, shape, dtype: method == "fp8" or _dot_dtype_ok(
        dtype, _default_config(method, *shape))), ids=str)
def test_default_config(method, shape, dtype):
    m, n, k, g = shape
    _check(method, m, n, k, g, dtype, bias=m % 2 == 1, seed=m + n + k + g)


# configs covering each small-M path: FMA (M=1, M>1 for int4/fp8), dot with and without
# SWAP_AB, split-K; block_k divides or is a multiple of every G below (the last shape's last
# group is shorter: 160 = 2 * 64 + 32)
GEMV_PATHS = [
    QGemvConfig(block_n=16, block_k=64),
    QGemvConfig(block_n=8, block_k=32, num_warps=2, split_k=3),
    QGemvConfig(block_n=16, block_k=32, use_dot=True, num_stages=2),
    QGemvConfig(block_n=32, block_k=32, use_dot=True, swap_ab=True, split_k=2),
]


# (N, K, G): with a bias; G == K, rows of x not contiguous; a shorter last group
GEMV_PATH_SHAPES = [(29, 128, 32), (48, 192, 192), (20, 160, 64)]


def _gemv_path_runs(method, cfg, m, shape) -> bool:
    # the int8 FMA path serves M = 1; FMA at M > 2 is slow in the interpreter
    return not ((method == "int8" and not cfg.use_dot and m > 1)
                or (INTERPRET and not cfg.use_dot and m > 2))


# every combination on CUDA; on the interpreter every pair of values of two of method,
# config, rows and shape meets
@needs_kernel
@pytest.mark.parametrize("method,cfg,m,shape", covering(
    ["int4", "int8", "fp8"], GEMV_PATHS, [1, 2, 5, 16], GEMV_PATH_SHAPES,
    keep=_gemv_path_runs), ids=str)
def test_gemv_paths(method, cfg, m, shape):
    dtype = torch.float16 if (INTERPRET and cfg.use_dot) else torch.bfloat16
    i = GEMV_PATH_SHAPES.index(shape)
    _check(method, m, *shape, dtype, bias=i == 0, seed=7 * m + i, cfg=cfg, x_pad=3 * i)


GEMM_PATHS = [
    QGemmConfig(block_m=32, block_n=32, block_k=32, group_m=2, num_warps=4, num_stages=2),
    QGemmConfig(block_m=16, block_n=64, block_k=32, group_m=1, num_warps=4, num_stages=3,
                swap_ab=True),
]


@needs_kernel
@pytest.mark.parametrize("method", ["int4", "int8", "fp8"])
@pytest.mark.parametrize("cfg", GEMM_PATHS, ids=str)
def test_gemm_paths(method, cfg):
    dtype = torch.float16 if INTERPRET else torch.bfloat16
    # M = 1 and 70 through the GEMM kernel; K not a multiple of block_k with G == K, and with
    # a shorter last group (112 = 64 + 48)
    for i, (m, n, k, g) in enumerate([(70, 45, 96, 32), (1, 40, 64, 64), (37, 24, 80, 80),
                                      (20, 24, 112, 64)]):
        _check(method, m, n, k, g, dtype, bias=i != 1, seed=11 * i, cfg=cfg, x_pad=5 * (i == 0))


@needs_kernel
@pytest.mark.parametrize("method", ["int4", "int8"])
def test_odd_group_sizes(method):
    # G = 24: the FMA path (any tile for int4, sub-tiles of 8 for int8); the dot path falls back
    # to the reference
    dtype = torch.float16
    made = _make(method, 21, 96, 24, dtype, seed=5, bias=True)
    _check(method, 1, 21, 96, 24, dtype, bias=True, seed=5, made=made)
    _check(method, 4, 21, 96, 24, dtype, bias=True, seed=6, made=made)


@needs_kernel
def test_leading_dims_and_empty():
    dtype = torch.float16
    (qw, s, z), w32, _ = _make("int4", 24, 64, 32, dtype, seed=1, bias=False)
    x = _randn(2, 3, 64, dtype=dtype, seed=2)
    out = int4_linear(x, qw, s, z, 32)
    assert out.shape == (2, 3, 24)
    want = x.float() @ w32.t()
    assert ((out.float() - want).norm() / want.norm()).item() < TOL[dtype]
    assert int4_linear(x.reshape(6, 64)[:0], qw, s, z, 32).shape == (0, 24)
    (wq, ws), _, _ = _make("fp8", 24, 64, 0, dtype, seed=1, bias=False)
    assert fp8_linear(x, wq, ws).shape == (2, 3, 24)
    assert fp8_linear(x.reshape(6, 64)[:0], wq, ws).shape == (0, 24)


def test_bad_inputs():
    x = torch.randn(2, 64).to(torch.bfloat16)
    qw, s, z = ref.quantize_int4(torch.randn(16, 64).to(torch.bfloat16), 32)
    with pytest.raises(ValueError):  # K mismatch
        int4_linear(torch.randn(2, 56).to(torch.bfloat16), qw, s, z, 32)
    with pytest.raises(ValueError):  # group size does not match the scales
        int4_linear(x, qw, s, z, 64)
    with pytest.raises(ValueError):  # scales in another dtype
        int4_linear(x, qw, s.half(), z, 32)
    with pytest.raises(ValueError):  # a group size that is not a multiple of 8
        int4_linear(x, qw, torch.zeros(6, 16).bfloat16(), torch.zeros(6, 16).bfloat16(), 12)
    with pytest.raises(ValueError):  # fp32 x
        int4_linear(x.float(), qw, s, z, 32)
    q8, s8 = ref.quantize_int8(torch.randn(16, 64).to(torch.bfloat16), 32)
    with pytest.raises(ValueError):
        int8_linear(x, q8.to(torch.int32), s8, 32)
    with pytest.raises(ValueError):
        int8_linear(x, q8, s8, 32, bias=torch.randn(15).to(torch.bfloat16))
    wq, ws = ref.quantize_fp8_per_channel(torch.randn(16, 64))
    with pytest.raises(ValueError):
        fp8_linear(x, wq, ws.half())
    with pytest.raises(ValueError):
        fp8_linear(x, wq.float(), ws)
    with pytest.raises(ValueError):  # a GEMV config past M = 16
        int8_linear(torch.randn(17, 64).to(torch.bfloat16), q8, s8, 32,
                    config=QGemvConfig(block_n=16, block_k=32))


def test_config_selection():
    shapes = LLAMA8B + [(37, 256), (4096, 104), (11008, 4096), (2048, 8192), (1536, 576)]
    for method in ("int4", "int8", "fp8"):
        for n, k in shapes:
            for g in (32, 64, 128, 96, k):
                for m in range(1, MAX_M + 1):
                    cfg = select_gemv_config(method, m, n, k, g)
                    assert cfg == select_gemv_config(method, m, n, k, g)  # deterministic
                    assert cfg.block_k & (cfg.block_k - 1) == 0
                    assert cfg.block_n & (cfg.block_n - 1) == 0 and 1 <= cfg.split_k <= 8
                    if cfg.use_dot and method != "fp8":  # every tile inside one group
                        assert g >= k or g % cfg.block_k == 0
                    if method == "int8" and not cfg.use_dot:
                        assert m == 1 and (g >= k or g % cfg.block_k == 0
                                           or cfg.block_k % g == 0)
                for m in (17, 64, 512, 8192):
                    cfg = select_gemm_config(method, m, n, k, g)
                    assert cfg == select_gemm_config(method, m, n, k, g)
                    if method != "fp8":
                        assert g >= k or g % cfg.block_k == 0
    with pytest.raises(ValueError):
        select_gemv_config("int3", 1, 64, 64)


def test_use_quant_kernel_rule():
    assert not use_quant_kernel(torch.zeros(2, 8, dtype=torch.bfloat16))  # CPU
    assert not use_quant_kernel(torch.zeros(2, 8))
    if ON_CUDA:
        assert use_quant_kernel(torch.zeros(2, 8, dtype=torch.bfloat16, device="cuda"))
        assert use_quant_kernel(torch.zeros(2, 8, dtype=torch.float16, device="cuda"))
        assert not use_quant_kernel(torch.zeros(2, 8, device="cuda"))


@needs_kernel
def test_warmup_runs():
    # every kernel a small layer needs at M = 1..16 and at one large M, with and without bias
    shapes = [("int4", 40, 64, 32), ("int8", 24, 64, 64, True), ("fp8", 48, 64)]
    warmup_quant_matmul(shapes, torch.float16, DEVICE, large_ms=(20,))
    with pytest.raises(ValueError):
        warmup_quant_matmul([("int2", 8, 64)], torch.float16, DEVICE)


# ---- CUDA only: many shapes, the Llama-3-8B shapes, _scaled_mm, CUDA graphs -------------------

@cuda_only
@pytest.mark.parametrize("method", ["int4", "int8", "fp8"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,g", [(7, 64, 32), (257, 1024, 128), (1000, 4096, 64),
                                   (4097, 2048, 2048), (3000, 768, 256), (129, 14336, 128),
                                   (1536, 576, 128), (640, 1000, 40)])
def test_many_shapes(method, dtype, n, k, g):
    made = _make(method, n, k, g, dtype, seed=n + k, bias=True)
    for m in list(range(1, 17)) + [17, 33, 130, 600]:
        _check(method, m, n, k, g, dtype, bias=True, seed=m + n, made=made,
               x_pad=8 * (m % 3 == 0))


@cuda_only
@pytest.mark.parametrize("method", ["int4", "int8", "fp8"])
@pytest.mark.parametrize("n,k", LLAMA8B)
def test_model_shapes(method, n, k):
    made = _make(method, n, k, 128, torch.bfloat16, seed=n, bias=False)
    for m in (1, 2, 3, 4, 8, 16, 64, 512):
        _check(method, m, n, k, 128, torch.bfloat16, bias=False, seed=n + m, made=made)


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_large_m_paths(dtype):
    # bf16: torch._scaled_mm; fp16: the Triton fp8 GEMM; and the Triton GEMM forced for bf16
    made = _make("fp8", 1024, 2048, 0, dtype, seed=3, bias=True)
    for m in (17, 256, 1000):
        _check("fp8", m, 1024, 2048, 0, dtype, bias=True, seed=m, made=made)
        _check("fp8", m, 1024, 2048, 0, dtype, bias=True, seed=m, made=made,
               cfg=select_gemm_config("fp8", m, 1024, 2048))


@cuda_only
def test_cuda_graph_capture():
    dtype = torch.bfloat16
    layers = [("int4", 6144, 4096, 128), ("int8", 4096, 4096, 128, True), ("fp8", 2048, 8192)]
    warmup_quant_matmul(layers, dtype, "cuda")
    for layer in layers:
        method, n, k = layer[:3]
        g = layer[3] if len(layer) > 3 else 0
        weights, w32, b = _make(method, n, k, g, dtype, seed=n, bias=len(layer) > 4)
        for m in (1, 4, 16, 64):
            x = _randn(m, k, dtype=dtype, seed=m)
            _run(method, x, weights, g, b, None)  # compiled by the warmup already
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = _run(method, x, weights, g, b, None)
            for seed in (11, 12):
                x.copy_(_randn(m, k, dtype=dtype, seed=seed))
                out.fill_(float("nan"))
                graph.replay()
                torch.cuda.synchronize()
                want = _reference(method, x, weights, w32, b)
                err = ((out.float() - want).norm() / want.norm()).item()
                assert torch.isfinite(out).all() and err < TOL[dtype], (method, m, err)


@needs_kernel
@pytest.mark.parametrize("n,k,g", [(40, 256, 128), (72, 576, 128), (300, 512, 64), (24, 64, 32)])
def test_int4_dequantize_t_matches_reference(n, k, g):
    from servelm.kernels.dequant_matmul import int4_dequantize_t, int4_matmul_dequant
    gen = torch.Generator().manual_seed(n + k)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(DEVICE, torch.float16)
    q, s, z = ref.quantize_int4(w, g)
    assert torch.equal(int4_dequantize_t(q, s, z, g), ref.dequantize_int4(q, s, z, g).t())
    x = torch.randn(33, k, generator=gen).to(DEVICE, torch.float16)
    bias = torch.randn(n, generator=gen).to(DEVICE, torch.float16)
    got = int4_matmul_dequant(x, q, s, z, g, bias).float()
    want = ref.int4_linear_ref(x.float(), q, s.float(), z.float(), g, bias.float())
    assert ((got - want).norm() / want.norm()).item() < 2e-3


@needs_kernel
@pytest.mark.parametrize("n,k,g", [(40, 256, 128), (72, 576, 128), (300, 512, 64), (24, 64, 64)])
def test_int8_dequantize_matches_reference(n, k, g):
    from servelm.kernels.dequant_matmul import int8_dequantize, int8_matmul_dequant
    gen = torch.Generator().manual_seed(n * k)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(DEVICE, torch.float16)
    q, s = ref.quantize_int8(w, g)
    assert torch.equal(int8_dequantize(q, s, g), ref.dequantize_int8(q, s, g))
    x = torch.randn(33, k, generator=gen).to(DEVICE, torch.float16)
    got = int8_matmul_dequant(x, q, s, g).float()
    want = ref.int8_linear_ref(x.float(), q, s.float(), g)
    assert ((got - want).norm() / want.norm()).item() < 2e-3
