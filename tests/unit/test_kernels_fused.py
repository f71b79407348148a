"""Fused decode kernels vs the unfused kernels they replace (bit for bit) and vs plain PyTorch
references (within rounding), on fresh random inputs of many shapes:

* the small-M GEMV with the SiLU-and-mul prologue (``linear_small_m(gate_up, w, silu_mul=True)``)
  and its seam (``Linear.forward_silu_mul`` -> ``LinearMethod.apply_silu_mul``);
* rotary embedding fused with the paged KV write (``rotary_write_kv``) and its seam
  (``AttentionBackend.rotate_and_write_kv``);
* a Llama model on the kernel path, fused vs unfused, every output bit equal.

Runs on CUDA; on a CPU-only machine under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 there), small shapes only.
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from servelm.attention.torch_ref import TorchReferenceBackend  # noqa: E402
from servelm.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from servelm.kernels.activation import silu_and_mul  # noqa: E402
from servelm.kernels.gemv import (  # noqa: E402
    GemvConfig, linear_silu_mul_ref, linear_small_m, select_config)
from servelm.kernels.kv_write import write_kv  # noqa: E402
from servelm.kernels.rotary import rotary_embedding  # noqa: E402
from servelm.kernels.rotary_kv import rotary_write_kv, rotary_write_kv_ref  # noqa: E402

from tests.unit.kernel_env import DEVICE, INTERPRET, ON_CUDA, covering  # noqa: E402
pytestmark = pytest.mark.skipif(not (ON_CUDA or INTERPRET),
                                reason="needs CUDA, or TRITON_INTERPRET=1 for the CPU interpreter")
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="large shapes: CUDA only")

# the interpreter casts fp32 -> bf16 by truncation, and its tl.dot on bf16 is wrong
# (tests/unit/test_kernels.py): bf16 checks against fp32 math widen there, dot paths run fp16
EXACT_BF16 = ON_CUDA


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _randn(*shape, dtype, seed, scale=1.0):
    return (torch.randn(*shape, generator=_gen(seed)) * scale).to(dtype).to(DEVICE)


# ================================================================ SiLU-and-mul + down GEMV

# one config per code path: FMA at BLOCK_M 1/2/4/8/16, pipelined FMA, split-K (buffer,
# atomics), dot, dot + split-K, swap-AB dot
GEMV_PATHS = [
    GemvConfig(block_n=8, block_k=64),
    GemvConfig(block_n=4, block_k=32, num_warps=2, num_stages=3),
    GemvConfig(block_n=8, block_k=64, split_k=3),
    GemvConfig(block_n=8, block_k=32, split_k=4, atomic=True),
    GemvConfig(block_n=16, block_k=64, use_dot=True, num_stages=3),
    GemvConfig(block_n=32, block_k=32, use_dot=True, split_k=2),
    GemvConfig(block_n=64, block_k=32, use_dot=True, num_stages=3, swap_ab=True),
]
GEMV_TOL = {torch.bfloat16: 1e-2 if EXACT_BF16 else 3e-2, torch.float16: 2e-3}


def _gemv_dtypes(cfg):
    if INTERPRET and cfg is not None and cfg.use_dot:
        return [torch.float16]
    return [torch.bfloat16, torch.float16]


def _gate_up(m, k, dtype, seed, pad=0):
    """[M, 2K] gate | up, rows padded by ``pad`` columns (not contiguous rows when pad > 0);
    gates spread over silu's curved range, never zeros."""
    x = _randn(m, 2 * k + pad, dtype=torch.float32, seed=seed, scale=2.5)
    return x.to(dtype)[:, :2 * k]


def _check_silu_gemv(m, n, k, dtype, bias, seed, config=None, pad=0):
    gate_up = _gate_up(m, k, dtype, seed, pad)
    w = _randn(n, k, dtype=dtype, seed=seed + 1, scale=k ** -0.5)
    b = _randn(n, dtype=dtype, seed=seed + 2) if bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    res = linear_small_m(gate_up, w, b, out=out, config=config, silu_mul=True)
    assert res.data_ptr() == out.data_ptr() and torch.isfinite(out).all()
    # the unfused pair: the activation kernel rounds to the dtype, then the same GEMV config
    unfused = linear_small_m(silu_and_mul(gate_up), w, b, config=config)
    assert torch.equal(out, unfused), f"M={m} N={n} K={k} {dtype} {config}"
    ref = linear_silu_mul_ref(gate_up.float(), w.float(), None if b is None else b.float())
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < GEMV_TOL[dtype], f"rel err {err:.2e} M={m} N={n} K={k} {dtype} {config}"


# (N, K): K = 130 a tail of K (masked loads), with a bias; 256 an even K, rows of gate | up
# padded (not contiguous); N not a multiple of BLOCK_N
SILU_GEMV_SHAPES = [(29, 130), (48, 256)]


# every combination on CUDA; on the interpreter (~5 ms a program) every pair of values of two
# of config, rows, shape and dtype meets (dot paths in fp16 only there)
@pytest.mark.parametrize("cfg,m,shape,dtype", covering(
    GEMV_PATHS, [1, 2, 3, 8], SILU_GEMV_SHAPES, [torch.bfloat16, torch.float16],
    keep=lambda cfg, m, shape, dtype: dtype in _gemv_dtypes(cfg)), ids=str)
def test_silu_gemv_paths(cfg, m, shape, dtype):
    i = SILU_GEMV_SHAPES.index(shape)
    _check_silu_gemv(m, *shape, dtype, bias=i == 0, seed=11 * m + i, config=cfg, pad=5 * i)


@pytest.mark.parametrize("m,n,k", [(1, 40, 96), (2, 64, 176), (4, 33, 128), (5, 24, 48),
                                   (16, 20, 64)])
def test_silu_gemv_default_config(m, n, k):
    for dtype in _gemv_dtypes(select_config(m, n, k)):
        _check_silu_gemv(m, n, k, dtype, bias=m % 2 == 1, seed=m + n + k)


def test_silu_gemv_over_16_rows_and_empty():
    _check_silu_gemv(19, 24, 32, torch.float16, bias=True, seed=19, config=GEMV_PATHS[0])
    x = _gate_up(0, 32, torch.float16, 0)
    w = _randn(24, 32, dtype=torch.float16, seed=1)
    assert linear_small_m(x, w, silu_mul=True).shape == (0, 24)


def test_silu_gemv_bad_inputs():
    w = _randn(8, 16, dtype=torch.bfloat16, seed=0)
    with pytest.raises(ValueError):  # x must be gate | up: 2K columns
        linear_small_m(_randn(2, 16, dtype=torch.bfloat16, seed=1), w, silu_mul=True)
    with pytest.raises(ValueError):
        linear_small_m(_randn(2, 48, dtype=torch.bfloat16, seed=1), w, silu_mul=True)


def _linear(k, n, dtype, use_kernel, seed, bias=False):
    from servelm.layers.linear import Linear
    with torch.device(DEVICE):
        layer = Linear(k, n, bias, prefix="down_proj", use_kernel=use_kernel, parallel="row")
    layer.weight.data = _randn(n, k, dtype=dtype, seed=seed, scale=k ** -0.5)
    if bias:
        layer.bias.data = _randn(n, dtype=dtype, seed=seed + 1)
    return layer


@pytest.fixture
def gemv_on_this_device(monkeypatch):
    """The small-M GEMV for M <= 8 whatever the device and width (the real rule also wants CUDA
    and N >= 256): the seams then take the fused kernel on these small CPU or CUDA tensors."""
    from servelm.kernels import gemv
    monkeypatch.setattr(gemv, "use_small_m_kernel",
                        lambda m, n, k, dtype, device: 1 <= m <= 8 and dtype in gemv._DTYPES)


@pytest.mark.parametrize("m", [1, 3, 8, 12])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_silu_mul_seam(gemv_on_this_device, monkeypatch, m, bias):
    """Linear.forward_silu_mul == forward(silu_and_mul(gate_up)) bit for bit: fused up to
    SILU_MUL_MAX_M rows (M <= 8 when raised, as the kernel allows), the default (unfused)
    method above; the torch path equals the plain torch expression."""
    from servelm.quantization import unquantized
    monkeypatch.setattr(unquantized, "SILU_MUL_MAX_M", 8)  # the kernel's whole range
    from servelm.layers.activation import silu_and_mul as layer_silu
    from servelm.quantization.base import LinearMethod
    dtype = torch.float16  # M = 3, 8 take the dot path, which the interpreter runs in fp16 only
    down = _linear(96, 40, dtype, True, seed=m, bias=bias)
    gate_up = _gate_up(m, 96, dtype, seed=m + 50)
    fused = down.forward_silu_mul(gate_up)
    assert torch.equal(fused, down(layer_silu(gate_up, use_kernel=True)))
    ref = linear_silu_mul_ref(gate_up.float(), down.weight.float(),
                              None if down.bias is None else down.bias.float())
    assert ((fused.float() - ref).norm() / ref.norm()).item() < GEMV_TOL[dtype]
    # above M = 8 the method falls back to the default: the activation kernel, then apply
    calls, default = [], LinearMethod.apply_silu_mul
    monkeypatch.setattr(LinearMethod, "apply_silu_mul",
                        lambda *a, **kw: calls.append(1) or default(*a, **kw))
    down.forward_silu_mul(gate_up)
    assert bool(calls) == (m > 8)
    # the CPU engines' path: the C silu*mul pass for fp32 tensors (equal to rounding), and the
    # plain expression where the C ops do not apply
    from servelm.cpu import ops as cpu_ops
    plain = _linear(96, 40, torch.float32, False, seed=m, bias=bias)
    gu32 = gate_up.float()
    g, u = gu32.chunk(2, -1)
    expected = torch.nn.functional.linear(torch.nn.functional.silu(g) * u, plain.weight,
                                          plain.bias)
    torch.testing.assert_close(plain.forward_silu_mul(gu32), expected, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(cpu_ops, "takes_elementwise", lambda x: False)
    assert torch.equal(plain.forward_silu_mul(gu32), expected)


@cuda_only
@pytest.mark.parametrize("n,k", [(4096, 14336), (3584, 18944), (2048, 8192), (1000, 4000)])
def test_silu_gemv_model_shapes(n, k):
    for m in (1, 2, 3, 4, 8, 16):
        _check_silu_gemv(m, n, k, torch.bfloat16, bias=m == 3, seed=n + m)
    _check_silu_gemv(1, n, k, torch.float16, bias=False, seed=n)


@cuda_only
def test_silu_gemv_cuda_graph():
    n, k = 4096, 14336
    w = _randn(n, k, dtype=torch.bfloat16, seed=1, scale=k ** -0.5)
    for m in (1, 4):
        gate_up = _gate_up(m, k, torch.bfloat16, seed=m)
        out = torch.empty(m, n, dtype=torch.bfloat16, device=DEVICE)
        linear_small_m(gate_up, w, out=out, silu_mul=True)  # compile outside capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            linear_small_m(gate_up, w, out=out, silu_mul=True)
        for seed in (5, 6):
            gate_up.copy_(_gate_up(m, k, torch.bfloat16, seed=seed))
            out.fill_(float("nan"))
            g.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, linear_small_m(silu_and_mul(gate_up), w))


# ================================================================ rotary + KV write

def _cos_sin_cache(max_pos: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], -1).to(DEVICE)  # [max_pos, D]


def _rope_case(num_tokens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed,
               num_blocks=None, pad_every=4):
    """q, k, v as strided views of one fused qkv output; slots scattered over shuffled blocks,
    every pad_every-th token a padding slot (-1); caches random (never zeros)."""
    num_blocks = num_blocks or -(-num_tokens // block_size) + 3
    g = _gen(seed)
    qkv = _randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, seed=seed)
    q = qkv[:, :num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim].view(
        num_tokens, num_kv_heads, head_dim)
    v = qkv[:, (num_heads + num_kv_heads) * head_dim:].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    if pad_every:
        slots[::pad_every] = -1
    positions = torch.randint(0, 4096, (num_tokens,), generator=g)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = _randn(*shape, dtype=dtype, seed=seed + 1)
    v_cache = _randn(*shape, dtype=dtype, seed=seed + 2)
    return (qkv, q, k, v, positions.to(DEVICE), slots.to(DEVICE), k_cache, v_cache,
            _cos_sin_cache(4096, head_dim))


def _close(out, ref, dtype):
    tol = {torch.bfloat16: 1.6e-2 if EXACT_BF16 else 5e-2, torch.float16: 2e-3,
           torch.float32: 2e-5}[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


ROPE_SHAPES = [  # (tokens, q heads, kv heads, head dim): MHA, GQA 4 and 3, MQA, odd head dims
    (1, 4, 4, 64), (5, 8, 2, 128), (13, 6, 2, 96), (9, 6, 1, 32), (7, 3, 3, 80)]


@pytest.mark.parametrize("dtype,shape,block_size", covering(
    [torch.bfloat16, torch.float16, torch.float32], ROPE_SHAPES, [1, 16]), ids=str)
def test_rotary_write_kv(dtype, shape, block_size):
    t, h, kvh, d = shape
    seed = t * 100 + h * 10 + kvh + d + block_size
    qkv, q, k, v, pos, slots, kc, vc, cache = _rope_case(t, h, kvh, d, block_size, dtype, seed)
    # the unfused kernels on copies
    qkv_u, kc_u, vc_u = qkv.clone(), kc.clone(), vc.clone()
    qu = qkv_u[:, :h * d].view(t, h, d)
    ku = qkv_u[:, h * d:(h + kvh) * d].view(t, kvh, d)
    vu = qkv_u[:, (h + kvh) * d:].view(t, kvh, d)
    rotary_embedding(pos, qu, ku, cache)
    write_kv(ku, vu, kc_u, vc_u, slots)
    # the torch reference on copies
    qkv_r, kc_r, vc_r = qkv.clone(), kc.clone(), vc.clone()
    rotary_write_kv_ref(pos, qkv_r[:, :h * d].view(t, h, d),
                        qkv_r[:, h * d:(h + kvh) * d].view(t, kvh, d),
                        qkv_r[:, (h + kvh) * d:].view(t, kvh, d), cache, kc_r, vc_r, slots)
    rotary_write_kv(pos, q, k, v, cache, kc, vc, slots)
    # same bits as the unfused kernels: q, k rotated in place, v untouched, caches
    assert torch.equal(qkv, qkv_u) and torch.equal(kc, kc_u) and torch.equal(vc, vc_u)
    # the reference: the same roundings (HF's), equal up to the interpreter's bf16 truncation
    _close(qkv, qkv_r, dtype)
    _close(kc, kc_r, dtype)
    assert torch.equal(vc, vc_r)
    if dtype == torch.float16 or (dtype == torch.bfloat16 and EXACT_BF16):
        assert (qkv != qkv_r).float().mean() < 0.01 and (kc != kc_r).float().mean() < 0.01
    # padding tokens stored nothing: slots nobody wrote keep their old values
    written = torch.zeros(kc.shape[0] * kc.shape[1], dtype=torch.bool)
    written[slots[slots >= 0].cpu()] = True
    old_k = _randn(*kc.shape, dtype=dtype, seed=seed + 1).view(-1, kvh, d)
    assert torch.equal(kc.view(-1, kvh, d)[~written.to(DEVICE)], old_k[~written.to(DEVICE)])


def test_rotary_write_kv_contiguous_and_empty():
    """Contiguous q/k/v (Qwen3's q/k norm outputs), no padding, large block; and 0 tokens."""
    dtype, t, h, kvh, d, bs = torch.float16, 6, 4, 2, 64, 32
    qkv, q, k, v, pos, slots, kc, vc, cache = _rope_case(t, h, kvh, d, bs, dtype, 3, pad_every=0)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    q_r, k_r, v_r, kc_r, vc_r = q.clone(), k.clone(), v.clone(), kc.clone(), vc.clone()
    rotary_embedding(pos, q_r, k_r, cache)
    write_kv(k_r, v_r, kc_r, vc_r, slots)
    rotary_write_kv(pos, q, k, v, cache, kc, vc, slots)
    for a, b in ((q, q_r), (k, k_r), (v, v_r), (kc, kc_r), (vc, vc_r)):
        assert torch.equal(a, b)
    rotary_write_kv(pos[:0], q[:0], k[:0], v[:0], cache, kc, vc, slots[:0])
    assert torch.equal(kc, kc_r)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_rotate_and_write_kv_seam(dtype):
    """The Triton backend's fused rotate_and_write_kv equals the default (rotary layer, then
    write_kv) bit for bit, and the torch backend within rounding."""
    from servelm.layers.rotary import RotaryEmbedding
    t, h, kvh, d, bs = 7, 8, 2, 64, 16
    with torch.device(DEVICE):
        rope_k = RotaryEmbedding(d, 4096, 10000.0, {"rope_type": "default"}, use_kernel=True)
        rope_t = RotaryEmbedding(d, 4096, 10000.0, {"rope_type": "default"}, use_kernel=False)
    qkv, q, k, v, pos, slots, kc, vc, _ = _rope_case(t, h, kvh, d, bs, dtype, 9, pad_every=3)
    qkv_d, kc_d, vc_d = qkv.clone(), kc.clone(), vc.clone()
    qd, kd, vd = (qkv_d[:, :h * d].view(t, h, d), qkv_d[:, h * d:(h + kvh) * d].view(t, kvh, d),
                  qkv_d[:, (h + kvh) * d:].view(t, kvh, d))
    kc_t, vc_t = kc.clone(), vc.clone()
    backend = TritonAttentionBackend()
    qf, kf = backend.rotate_and_write_kv(rope_k, pos, q, k, v, kc, vc, slots)
    assert qf.data_ptr() == q.data_ptr() and kf.data_ptr() == k.data_ptr()  # in place
    qd, kd = super(TritonAttentionBackend, backend).rotate_and_write_kv(
        rope_k, pos, qd, kd, vd, kc_d, vc_d, slots)
    assert torch.equal(qf, qd) and torch.equal(kf, kd)
    assert torch.equal(kc, kc_d) and torch.equal(vc, vc_d)
    # the torch backend (reference rotary, index_copy_ of valid slots only)
    keep = slots >= 0
    qkv_t = _rope_case(t, h, kvh, d, bs, dtype, 9, pad_every=3)[0]
    qt, kt, vt = (qkv_t[:, :h * d].view(t, h, d), qkv_t[:, h * d:(h + kvh) * d].view(t, kvh, d),
                  qkv_t[:, (h + kvh) * d:].view(t, kvh, d))
    qt, kt = rope_t(pos, qt, kt)
    TorchReferenceBackend().write_kv(kt[keep], vt[keep], kc_t, vc_t, slots[keep])
    _close(qf, qt, dtype)
    _close(kf, kt, dtype)
    _close(kc, kc_t, dtype)
    assert torch.equal(vc, vc_t)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens", [1, 8, 256, 4099])
def test_rotary_write_kv_llama_shapes(dtype, num_tokens):
    t, h, kvh, d = num_tokens, 32, 8, 128
    qkv, q, k, v, pos, slots, kc, vc, cache = _rope_case(t, h, kvh, d, 16, dtype, t,
                                                         num_blocks=t // 16 + 40, pad_every=7)
    qkv_u, kc_u, vc_u = qkv.clone(), kc.clone(), vc.clone()
    rotary_embedding(pos, qkv_u[:, :h * d].view(t, h, d),
                     qkv_u[:, h * d:(h + kvh) * d].view(t, kvh, d), cache)
    write_kv(qkv_u[:, h * d:(h + kvh) * d].view(t, kvh, d),
             qkv_u[:, (h + kvh) * d:].view(t, kvh, d), kc_u, vc_u, slots)
    rotary_write_kv(pos, q, k, v, cache, kc, vc, slots)
    assert torch.equal(qkv, qkv_u) and torch.equal(kc, kc_u) and torch.equal(vc, vc_u)


@cuda_only
def test_rotary_write_kv_cuda_graph():
    t, h, kvh, d = 4, 32, 8, 128
    qkv, q, k, v, pos, slots, kc, vc, cache = _rope_case(t, h, kvh, d, 16, torch.bfloat16, 1)
    rotary_write_kv(pos, q, k, v, cache, kc, vc, slots)  # compile outside capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        rotary_write_kv(pos, q, k, v, cache, kc, vc, slots)
    for seed in (2, 3):
        new = _rope_case(t, h, kvh, d, 16, torch.bfloat16, seed)
        qkv.copy_(new[0])
        pos.copy_(new[4])
        slots.copy_(new[5])
        qkv_u, kc_u, vc_u = qkv.clone(), kc.clone(), vc.clone()
        rotary_embedding(pos, qkv_u[:, :h * d].view(t, h, d),
                         qkv_u[:, h * d:(h + kvh) * d].view(t, kvh, d), cache)
        write_kv(qkv_u[:, h * d:(h + kvh) * d].view(t, kvh, d),
                 qkv_u[:, (h + kvh) * d:].view(t, kvh, d), kc_u, vc_u, slots)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(qkv, qkv_u) and torch.equal(kc, kc_u) and torch.equal(vc, vc_u)


# ================================================================ a whole model, fused vs not

def _unfused(monkeypatch):
    """The kernel path with every fusion of this file turned off (the defaults of the seams)."""
    from servelm.attention.backend import AttentionBackend
    from servelm.quantization.base import LinearMethod
    from servelm.quantization.unquantized import UnquantizedLinearMethod
    monkeypatch.setattr(UnquantizedLinearMethod, "apply_silu_mul", LinearMethod.apply_silu_mul)
    monkeypatch.setattr(TritonAttentionBackend, "rotate_and_write_kv",
                        AttentionBackend.rotate_and_write_kv)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_llama_fused_equals_unfused(gemv_on_this_device, monkeypatch, arch):
    """A tiny Llama (Qwen3: q/k norms, contiguous q/k) on the kernel path: a prefill step and
    a decode step of 3 sequences give bit-identical hidden states and KV caches with and
    without the fused kernels."""
    import transformers as tf
    from servelm.attention.backend import AttentionMetadata
    from servelm.quantization import unquantized
    monkeypatch.setattr(unquantized, "SILU_MUL_MAX_M", 8)  # fused for the 3-row decode too
    from servelm.loader import initialize_dummy_weights
    from servelm.models.llama import LlamaForCausalLM
    dtype = torch.float16  # the interpreter's tl.dot is wrong in bf16
    cfg_cls = tf.LlamaConfig if arch == "llama" else tf.Qwen3Config
    cfg = cfg_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=300,
                  max_position_embeddings=256, rms_norm_eps=1e-5)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(DEVICE):
            model = LlamaForCausalLM(cfg, TritonAttentionBackend(), use_kernels=True)
    finally:
        torch.set_default_dtype(prev)
    for m in model.modules():
        if hasattr(m, "cos_sin_cache"):
            m.cos_sin_cache = m.cos_sin_cache.float()
    initialize_dummy_weights(model, seed=3)
    bs, lens = 4, [5, 9, 3]
    num_blocks = 16
    tables = torch.randperm(num_blocks, generator=_gen(0))[:12].view(3, 4).to(torch.int32)

    def slots_of(s, positions):
        return [int(tables[s, p // bs]) * bs + p % bs for p in positions]

    def meta(q_lens, seq_lens):
        starts = [seq - q for q, seq in zip(q_lens, seq_lens)]
        slots = sum((slots_of(s, range(st, seq)) for s, (st, seq)
                     in enumerate(zip(starts, seq_lens))), [])
        qsl = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=DEVICE), query_start_loc=qsl.to(DEVICE),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
            block_tables=tables.to(DEVICE), max_query_len=max(q_lens),
            max_seq_len=max(seq_lens), query_lens_cpu=tuple(q_lens), seq_lens_cpu=tuple(seq_lens))

    prefill = meta(lens, lens)
    decode = meta([1, 1, 1], [n + 1 for n in lens])
    ids = torch.randint(1, 300, (sum(lens),), generator=_gen(1)).to(DEVICE)
    pos = torch.cat([torch.arange(n) for n in lens]).to(DEVICE)
    dec_ids = torch.tensor([7, 8, 9], device=DEVICE)
    dec_pos = torch.tensor(lens, device=DEVICE)
    shape = (num_blocks, bs, 2, 16)

    def run():
        caches = [(_randn(*shape, dtype=dtype, seed=10 + i),
                   _randn(*shape, dtype=dtype, seed=20 + i)) for i in range(2)]
        with torch.inference_mode():
            h1 = model(ids, pos, caches, prefill)
            h2 = model(dec_ids, dec_pos, caches, decode)
        return h1, h2, caches

    # count the fused launches: each layer's down projection at decode, rotary everywhere
    from servelm.attention import triton_backend
    from servelm.kernels import gemv
    launches = {"silu_mul": 0, "rotary_kv": 0}

    def counting(fn, key, pred=lambda kw: True):
        def wrapper(*a, **kw):
            launches[key] += pred(kw)
            return fn(*a, **kw)
        return wrapper
    monkeypatch.setattr(gemv, "linear_small_m", counting(
        gemv.linear_small_m, "silu_mul", lambda kw: kw.get("silu_mul", False)))
    monkeypatch.setattr(triton_backend, "rotary_write_kv",
                        counting(triton_backend.rotary_write_kv, "rotary_kv"))
    fused = run()
    assert launches == {"silu_mul": 2, "rotary_kv": 4}
    with monkeypatch.context() as mp:
        _unfused(mp)
        unfused = run()
    assert torch.isfinite(fused[1]).all()
    assert torch.equal(fused[0], unfused[0]) and torch.equal(fused[1], unfused[1])
    for (kf, vf), (ku, vu) in zip(fused[2], unfused[2]):
        assert torch.equal(kf, ku) and torch.equal(vf, vu)
