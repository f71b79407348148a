"""The CPU fast path (servelm/cpu/): the C kernels of csrc/decode.c against plain references.

* Linear (``cpu.ops.NativeLinear``): dense fp32 / bf16 weights and GGUF Q4_0 / Q4_1 / Q8_0 blocks
  (made by the upstream ``gguf`` package's quantizer, dequantized by its numpy reference), merged
  layers of 2-3 parts (GGUF parts of different types side by side), many M / K / N, 1-3 threads,
  fp32 and bf16 activations, against ``x @ W^T`` in float64.
* Paged decode attention (``cpu.ops.paged_attention``): shuffled block tables, GQA, head sizes on
  and off the vector paths (16 / 8 lanes), fp32 / bf16 caches, contexts 1..300, against a float64 softmax over
  the gathered rows; every cache entry a sequence must not read holds NaN.
* C dequantization of the blocks (cpu/blocks.py, prompt-sized matmuls): gguf's values exactly.
* The whole decode step through the engine (``CpuDecodeStep``): its logits against the PyTorch
  forward on the same inputs at every decode step, and greedy tokens equal to the eager engine's
  (Llama, tied Llama, Llama 3 rope, Qwen2 qkv bias, Qwen3 q/k norms, norms and biases random;
  1 and 2 threads; batches above MAX_ROWS; a .gguf read as blocks; bf16 too).
* The narrower builds (AVX2 with FMA, and plain C) on the same kernel references.
* Fallback: no usable compiler -> ``native.load()`` is None, with a warning, and the PyTorch path.

Error bounds (u = 2^-24, the fp32 unit roundoff): a sum of n terms in fp32, in any order, is
within about n * u * sum|terms| of the exact sum; the terms a GEMV adds are the products
x_j * w_j (for Q4 the code's d * q * x and m * x, as ggml decodes the blocks). The bounds below
are that worst case with n = K + 64, not a fit to observed errors; a wrong index, nibble, scale
or offset is off by O(|y|), orders of magnitude above them."""
from __future__ import annotations

import logging
import os
import platform

import numpy as np
import pytest
import torch

from servelm.cpu import native

U32 = 2.0 ** -24  # fp32 unit roundoff
HALF_ULP_BF16 = 2.0 ** -8  # bf16 rounding of a result, relative to its magnitude (worst case)

LIB = native.load()
needs_lib = pytest.mark.skipif(LIB is None, reason="no C compiler: the CPU kernels are not built")


@pytest.fixture(autouse=True)
def _threads_restored():
    """Tests set PyTorch's thread count, and an engine built in this process sets it and the
    process's CPU affinity (cpu/threads.configure_engine): both put back after each test."""
    prev = torch.get_num_threads()
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    yield
    torch.set_num_threads(prev)
    if cpus is not None:
        os.sched_setaffinity(0, cpus)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- linear -------------------------------------------------------------------------------------
gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
F32, BF16 = "f32", "bf16"  # dense parts (a GGUF layer may mix them with blocks)
MS = (1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33)


def _gguf_part(n: int, k: int, qtype, g: torch.Generator):
    """Random normal rows quantized by gguf's reference quantizer -> (raw uint8 [n, row_bytes],
    dequantized float64 [n, k] by gguf's reference dequantizer, term magnitudes float64 [n, k]:
    |w| for Q8_0, |d| * q + |m| for Q4_0 (m = -8 d) / Q4_1 (w = d * q + m), the magnitudes of
    what a GEMV that decodes the blocks as ggml does must add)."""
    w = (torch.randn(n, k, generator=g) * 0.5).numpy()
    raw = gguf.quants.quantize(w, qtype)
    deq = gguf.quants.dequantize(raw, qtype).astype(np.float64)
    assert deq.shape == (n, k)
    if qtype == Q.Q8_0:
        mag = np.abs(deq)
    else:
        ts = 18 if qtype == Q.Q4_0 else 20
        blocks = raw.reshape(n, k // 32, ts)
        d = blocks[..., 0:2].copy().view(np.float16).astype(np.float64)  # [n, nb, 1]
        m = (blocks[..., 2:4].copy().view(np.float16).astype(np.float64) if qtype == Q.Q4_1
             else -8.0 * d)
        qs = blocks[..., ts - 16:]
        q = np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.float64)  # [n, nb, 32]
        mag = (np.abs(d) * q + np.abs(m)).reshape(n, k)
    return torch.from_numpy(np.ascontiguousarray(raw)), torch.from_numpy(deq), torch.from_numpy(mag)


def _build_layer(k: int, parts: list[tuple[object, int]], layer_dtype: torch.dtype, seed: int,
                 bias: bool = False):
    """A Linear of the given (kind, rows) parts, loaded and processed as the loader does ->
    (layer, W float64 [N, K] as the reference sees it, term magnitudes [N, K], bias or None).
    kind: F32 / BF16 (dense) or a ggml block type; any ggml type makes it a GGUF layer."""
    from servelm.layers.linear import Linear, process_weights_after_loading
    from servelm.quantization.config import QuantConfig
    from servelm.quantization.gguf import GGUFWeight

    g = _gen(seed)
    is_gguf = any(kind not in (F32, BF16) for kind, _ in parts)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(layer_dtype)
    try:
        layer = Linear(k, [n for _, n in parts], bias=bias, prefix="t",
                       quantization=QuantConfig("gguf") if is_gguf else None)
    finally:
        torch.set_default_dtype(prev)
    ws, mags = [], []
    for i, (kind, n) in enumerate(parts):
        if kind in (F32, BF16):
            w = torch.randn(n, k, generator=g).to(layer_dtype)  # dense parts are stored in it
            layer.load_weight("weight", w, i)
            ws.append(w.double())
            mags.append(w.double().abs())
        else:
            raw, deq, mag = _gguf_part(n, k, kind, g)
            layer.load_weight("weight", GGUFWeight(raw, int(kind), (n, k)), i)
            ws.append(deq)
            mags.append(mag)
    b = None
    if bias:
        b = torch.randn(layer.output_size_per_rank, generator=g).to(layer_dtype)
        lo = 0
        for i, (_, n) in enumerate(parts):  # one bias per part, as a checkpoint's q/k/v
            layer.load_weight("bias", b[lo:lo + n], i)
            lo += n
    process_weights_after_loading(layer)
    return layer, torch.cat(ws), torch.cat(mags), b


def _check_linear(nl, W: torch.Tensor, mag: torch.Tensor, k: int, seed: int,
                  threads=(1, 2, 3), ms=MS, extra=None):
    """nl(x) against x @ W^T in float64 for every M in ms, fp32 and bf16 x, on each thread
    count. extra(x, y): more checks per call."""
    g = _gen(seed)
    for m in ms:
        x32 = torch.randn(m, k, generator=g)
        for xdtype in (torch.float32, torch.bfloat16):
            x = x32.to(xdtype)
            xd = x.double()  # a bf16 x is taken as given (its values are exactly bf16)
            ref = xd @ W.T
            bound_terms = xd.abs() @ mag.T
            for t in threads:
                torch.set_num_threads(t)
                y = nl(x)
                assert y.shape == (m, W.shape[0]) and y.dtype == xdtype
                err = (y.double() - ref).abs()
                if xdtype == torch.float32:
                    # fp32 products and sums: the worst case of K + 64 roundings of the terms
                    tol = (k + 64) * U32 * bound_terms
                else:
                    # fp32 sums of exact (bf16 x bf16 or fp32) products, as the fp32 case, and
                    # 1e-4 of sum |x||w| for a bf16 product path's reordering; then the result
                    # rounded to bf16
                    tol = ((k + 64) * U32 * bound_terms + 1e-4 * (xd.abs() @ W.abs().T)
                           + HALF_ULP_BF16 * ref.abs())
                bad = err > tol
                if bad.any():
                    i, j = [int(v) for v in bad.nonzero()[0]]
                    pytest.fail(f"M={m} K={k} N={W.shape[0]} x {xdtype} threads={t}: "
                                f"{int(bad.sum())} of {bad.numel()} outputs off; e.g. y[{i},{j}]="
                                f"{float(y[i, j]):.7g} vs {float(ref[i, j]):.7g} (err "
                                f"{float(err[i, j]):.3g}, bound {float(tol[i, j]):.3g}); max "
                                f"err/bound {float((err / tol).max()):.3g}")
                if extra is not None:
                    extra(x, y)


# (weight kind, K, [rows per part]); dense K not a multiple of 32 as well
DENSE_CASES = [
    (F32, 40, [5]), (F32, 70, [33, 16]), (F32, 64, [1]), (F32, 576, [130]),
    (F32, 96, [16, 5, 33]), (F32, 3, [7]),
    (BF16, 40, [16]), (BF16, 70, [5, 33, 1]), (BF16, 64, [130]), (BF16, 576, [33, 16]),
    (BF16, 32, [1]),
]


@needs_lib
@pytest.mark.parametrize("kind,k,parts", DENSE_CASES,
                         ids=[f"{c[0]}-K{c[1]}-N{'+'.join(map(str, c[2]))}" for c in DENSE_CASES])
def test_native_linear_dense(kind, k, parts):
    from servelm.cpu.ops import NativeLinear, native_linear_for
    dtype = torch.float32 if kind == F32 else torch.bfloat16
    layer, W, mag, _ = _build_layer(k, [(kind, n) for n in parts], dtype, seed=k + sum(parts))
    assert type(layer.method).__name__ == "UnquantizedLinearMethod"
    nl = native_linear_for(layer)
    assert isinstance(nl, NativeLinear)
    _check_linear(nl, W, mag, k, seed=7 * k + len(parts))


GGUF_CASES = [
    ([Q.Q4_0], 32, [5]), ([Q.Q4_0], 96, [130]), ([Q.Q4_0], 576, [33]),
    ([Q.Q4_1], 32, [130]), ([Q.Q4_1], 64, [1]), ([Q.Q4_1], 576, [16]),
    ([Q.Q8_0], 64, [33]), ([Q.Q8_0], 96, [1]), ([Q.Q8_0], 576, [130]),
    # merged layers: parts of one type (one tensor) and of different types (one tensor each)
    ([Q.Q4_1, Q.Q4_1, Q.Q4_1], 64, [16, 5, 5]),
    ([Q.Q4_1, Q.Q8_0], 576, [33, 16]),
    ([Q.Q8_0, Q.Q4_0], 96, [5, 130]),
    ([Q.Q4_0, Q.Q4_1, Q.Q8_0], 64, [16, 1, 33]),
    ([Q.Q4_1, Q.Q8_0, Q.Q8_0], 32, [5, 16, 16]),  # Q4_K_M-like: v in another format
    # a dense part among blocks (a GGUF file's F32 tensor)
    ([Q.Q8_0, F32, Q.Q4_0], 64, [16, 5, 33]),
]


def _gguf_id(c):
    return f"{'+'.join(getattr(t, 'name', str(t)) for t in c[0])}-K{c[1]}-N{'+'.join(map(str, c[2]))}"


@needs_lib
@pytest.mark.parametrize("kinds,k,parts", GGUF_CASES, ids=[_gguf_id(c) for c in GGUF_CASES])
def test_native_linear_gguf(kinds, k, parts):
    from servelm.cpu.ops import NATIVE_MAX_M, NativeLinear
    layer, W, mag, _ = _build_layer(k, list(zip(kinds, parts)), torch.float32,
                                    seed=3 * k + sum(parts))
    nl = layer.method.native  # built by process_after_loading on the CPU with the lib present
    assert isinstance(nl, NativeLinear)
    assert max(MS) <= NATIVE_MAX_M

    def through_the_layer(x, y):  # the method's apply takes the C GEMV for these M
        if x.dtype == torch.float32:
            assert torch.equal(layer(x), y)

    _check_linear(nl, W, mag, k, seed=5 * k + len(parts), extra=through_the_layer)


@needs_lib
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda t: t.name)
def test_dequantize_blocks_is_ggml_exactly(qtype):
    """cpu/blocks.py: the blocks with their scales split out, dequantized by the C code (the
    prompt-sized matmuls' weights) = gguf's reference bit for bit in fp32, and that rounded
    once in bf16; on 1 and 2 threads."""
    from servelm.cpu.blocks import dequantize, split_blocks
    for n, k in ((1, 32), (70, 96), (33, 576)):
        raw, deq, _ = _gguf_part(n, k, qtype, _gen(n + k))
        blocks = split_blocks(raw, int(qtype))
        want = deq.float()
        for t in (1, 2):
            torch.set_num_threads(t)
            got = dequantize(blocks, torch.float32)
            assert got.dtype == torch.float32 and torch.equal(got, want), \
                f"{n}x{k}: {int((got != want).sum())} values differ, max {(got - want).abs().max()}"
            assert torch.equal(dequantize(blocks, torch.bfloat16), want.to(torch.bfloat16))


@needs_lib
@pytest.mark.parametrize("path", ["dequantize", "native"])
@pytest.mark.parametrize("layer_dtype", [torch.float32, torch.bfloat16])
def test_gguf_layer_prompt_sized_m(layer_dtype, path, monkeypatch):
    """Prompt-sized M: above native_max_m() rows (AVX-512, portable) a GGUF layer dequantizes
    its blocks (C) for one dense matmul; with AVX2 the C batched product takes every M. Both
    paths, forced, on any CPU: the same reference, mixed formats and a dense part, bias
    added."""
    from servelm.cpu import ops
    from servelm.cpu.ops import NATIVE_MAX_M
    monkeypatch.setattr(ops, "native_max_m",
                        (lambda: NATIVE_MAX_M) if path == "dequantize" else (lambda: 1 << 30))
    k, parts = 96, [(Q.Q4_0, 16), (Q.Q4_1, 5), (F32, 7), (Q.Q8_0, 33)]
    layer, W, mag, b = _build_layer(k, parts, layer_dtype, seed=13, bias=True)
    g = _gen(14)
    for m in (NATIVE_MAX_M + 1, 130):
        x = torch.randn(m, k, generator=g).to(layer_dtype)
        y = layer(x)
        assert y.shape == (m, W.shape[0]) and y.dtype == layer_dtype
        xd = x.double()
        ref = xd @ W.T + b.double()
        if layer_dtype == torch.float32:
            tol = (k + 64) * U32 * (xd.abs() @ mag.T + b.double().abs())
        else:  # bf16 weights (rounded once) and a bf16 matmul: 2^-8 of each term, then of y
            tol = (2 * HALF_ULP_BF16 * (xd.abs() @ W.abs().T + b.double().abs())
                   + HALF_ULP_BF16 * ref.abs())
        err = (y.double() - ref).abs()
        assert (err <= tol).all(), f"M={m}: max err/bound {float((err / tol).max()):.3g}"


@needs_lib
@pytest.mark.parametrize("layer_dtype", [torch.float32, torch.bfloat16])
def test_native_linear_gguf_layer_with_bias(layer_dtype):
    """A biased GGUF layer (a Qwen2 qkv projection): the method's apply is the C GEMV + bias,
    in the layer's dtype; the GEMV itself leaves the bias out."""
    from servelm.cpu.ops import NativeLinear
    from servelm.cpu.plan import projection
    k, parts = 64, [(Q.Q4_1, 16), (Q.Q8_0, 5), (Q.Q4_0, 5)]
    layer, W, mag, b = _build_layer(k, parts, layer_dtype, seed=11, bias=True)
    assert layer.method.native is not None
    # and the C code's own bias (the decode step's: each part's rows at its output offset)
    with_bias = NativeLinear(LIB, layer)
    with_bias.proj = projection(layer, with_bias.keep, with_bias=True)
    g = _gen(12)
    for m in (1, 3, 9):
        x = torch.randn(m, k, generator=g).to(layer_dtype)
        ref = x.double() @ W.T + b.double()
        terms = x.double().abs() @ mag.T + b.double().abs()
        tol = (k + 64) * U32 * terms + (1e-4 * (x.double().abs() @ W.abs().T)
                                        + 2 * HALF_ULP_BF16 * (ref.abs() + b.double().abs())
                                        if layer_dtype == torch.bfloat16 else 0)
        for t in (1, 2):
            torch.set_num_threads(t)
            for y in (layer(x), with_bias(x)):
                assert y.dtype == layer_dtype
                err = (y.double() - ref).abs()
                assert (err <= tol).all(), f"M={m}: max err/bound {float((err / tol).max()):.3g}"


@needs_lib
def test_native_linear_noncontiguous_input():
    """NativeLinear takes any x (a strided view is copied contiguous first)."""
    k = 96
    layer, W, mag, _ = _build_layer(k, [(Q.Q4_1, 33)], torch.float32, seed=21)
    xs = torch.randn(2 * k, 5, generator=_gen(22))
    x = xs.T[:, ::2]  # [5, 96], strided
    assert not x.is_contiguous()
    torch.set_num_threads(2)
    y = layer.method.native(x)
    ref = x.double() @ W.T
    assert ((y.double() - ref).abs() <= (k + 64) * U32 * (x.double().abs() @ mag.T)).all()


# ---- paged decode attention ---------------------------------------------------------------------
def _paged_case(lens, H, KVH, D, bsz, kv_dtype, seed, q_scale=1.0, spare_blocks=3):
    """Random caches with shuffled block tables. Every cache entry no sequence may read (the
    rest of a last block, unused blocks, which the tables' spare columns point at) is NaN."""
    g = _gen(seed)
    S = len(lens)
    need = [-(-L // bsz) for L in lens]
    nblocks = sum(need) + spare_blocks
    width = max(need) + 2
    perm = torch.randperm(nblocks, generator=g)
    kc = torch.full((nblocks, bsz, KVH, D), float("nan"))
    vc = torch.full((nblocks, bsz, KVH, D), float("nan"))
    bt = torch.empty(S, width, dtype=torch.int32)
    spare = perm[sum(need):]
    pos = 0
    for s, (L, n) in enumerate(zip(lens, need)):
        ids = perm[pos:pos + n]
        pos += n
        bt[s, :n] = ids.to(torch.int32)
        bt[s, n:] = spare[torch.randint(0, len(spare), (width - n,), generator=g)].to(torch.int32)
        for t in range(L):
            kc[ids[t // bsz], t % bsz] = torch.randn(KVH, D, generator=g)
            vc[ids[t // bsz], t % bsz] = torch.randn(KVH, D, generator=g)
    q = torch.randn(S, H, D, generator=g) * q_scale
    return q, kc.to(kv_dtype), vc.to(kv_dtype), bt, torch.tensor(lens, dtype=torch.int32)


def _attention_ref(q, kc, vc, bt, lens, scale):
    """float64 softmax attention over each sequence's own rows -> (out, bound): bound from the
    fp32 errors of the scores (D + 8 roundings of sum |q||k|, scaled), of the softmax (ctx + 16)
    and of the weighted sum of V, all relative to sum_t p_t |v_t|."""
    S, H, D = q.shape
    bsz, KVH = kc.shape[1], kc.shape[2]
    G = H // KVH
    out = torch.empty(S, H, D, dtype=torch.float64)
    bound = torch.empty(S, H, D, dtype=torch.float64)
    kflat, vflat = kc.double().reshape(-1, KVH, D), vc.double().reshape(-1, KVH, D)
    for s in range(S):
        L = int(lens[s])
        t = torch.arange(L)
        rows = bt[s, t // bsz].long() * bsz + t % bsz
        k, v = kflat[rows].transpose(0, 1), vflat[rows].transpose(0, 1)  # [KVH, L, D]
        qs = q[s].double().view(KVH, G, D)
        sc = torch.einsum("kgd,kld->kgl", qs, k) * scale
        p = sc.softmax(-1)
        out[s] = torch.einsum("kgl,kld->kgd", p, v).reshape(H, D)
        amax = (torch.einsum("kgd,kld->kgl", qs.abs(), k.abs()) * scale).amax(-1)  # [KVH, G]
        rel = (2 * (D + 8) * amax + 2 * L + 40) * U32  # [KVH, G]
        bound[s] = (rel[..., None] * torch.einsum("kgl,kld->kgd", p, v.abs())).reshape(H, D)
    return out, bound


ATTN_CASES = [  # (lens, H, KVH, D, block size, KV dtype, q scale)
    ([1, 5, 17, 300], 4, 4, 16, 4, torch.float32, 1.0),
    ([33, 1, 256, 130, 7], 6, 2, 64, 16, torch.bfloat16, 1.0),
    ([300, 16, 3], 8, 2, 80, 16, torch.float32, 1.0),
    ([64, 2, 250, 31, 100, 9], 12, 4, 80, 4, torch.bfloat16, 1.0),
    ([1, 2, 3, 4], 3, 1, 64, 4, torch.float32, 1.0),
    ([48, 15, 260], 4, 1, 40, 16, torch.float32, 1.0),  # D % 16 != 0: AVX2's 8 lanes, else C
    ([9, 40, 3], 4, 2, 36, 4, torch.bfloat16, 1.0),  # D % 8 != 0: the portable loop
    ([77, 290], 6, 2, 40, 4, torch.bfloat16, 1.0),
    ([120, 299, 5], 4, 2, 64, 16, torch.float32, 40.0),  # scores to +-150: exp needs the max out
    # the register-resident shapes (attend_fixed): G x head_dim 1/4 x 64, 1/2/4 x 128
    ([70, 3, 129], 4, 4, 64, 16, torch.bfloat16, 1.0),
    ([17, 200], 8, 2, 64, 4, torch.float32, 1.0),
    ([90, 1, 33], 2, 2, 128, 16, torch.bfloat16, 1.0),
    ([300, 64], 4, 2, 128, 4, torch.float32, 1.0),
    ([5, 150, 77, 2], 8, 2, 128, 16, torch.bfloat16, 3.0),
]


@needs_lib
@pytest.mark.parametrize("lens,H,KVH,D,bsz,kv_dtype,q_scale", ATTN_CASES,
                         ids=[f"S{len(c[0])}-H{c[1]}-KVH{c[2]}-D{c[3]}-bs{c[4]}-"
                              f"{str(c[5])[6:]}-q{c[6]:g}" for c in ATTN_CASES])
def test_paged_attention(lens, H, KVH, D, bsz, kv_dtype, q_scale):
    from servelm.cpu.ops import paged_attention
    q, kc, vc, bt, sl = _paged_case(lens, H, KVH, D, bsz, kv_dtype, seed=sum(lens) + D + H,
                                    q_scale=q_scale)
    scale = D ** -0.5
    ref, bound = _attention_ref(q, kc, vc, bt, sl, scale)
    for threads in (1, 2, 3):
        out = paged_attention(q, kc, vc, bt, sl, scale, threads)
        assert out.shape == (len(lens), H, D) and out.dtype == torch.float32
        assert torch.isfinite(out).all(), "read a cache entry past a sequence's context"
        err = (out.double() - ref).abs()
        bad = err > bound
        if bad.any():
            s, h, d = [int(v) for v in bad.nonzero()[0]]
            pytest.fail(f"threads={threads}: {int(bad.sum())} outputs off, e.g. seq {s} (ctx "
                        f"{lens[s]}) head {h}: {float(out[s, h, d]):.7g} vs "
                        f"{float(ref[s, h, d]):.7g}, err {float(err[s, h, d]):.3g} bound "
                        f"{float(bound[s, h, d]):.3g}")


@needs_lib
def test_paged_attention_matches_torch_ref():
    """The same numbers as the PyTorch backend's decode attention (attention/torch_ref.py)."""
    from servelm.attention.torch_ref import decode_attention_batched
    from servelm.cpu.ops import paged_attention
    lens = [40, 1, 130, 17]
    q, kc, vc, bt, sl = _paged_case(lens, 8, 2, 64, 16, torch.bfloat16, seed=5)
    kc, vc = torch.nan_to_num(kc), torch.nan_to_num(vc)  # the reference reads whole blocks
    ref = decode_attention_batched(q, kc, vc, bt, sl, max(lens), 0.125)
    out = paged_attention(q, kc, vc, bt, sl, 0.125, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ---- the whole decode step, through the engine --------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """arch -> a tiny random HF checkpoint (tests/conftest.py's configs) whose norm weights and
    biases are random too (HF initialises them to ones and zeros: a step that mixed up the
    attention / MLP / final / q / k norms or dropped a bias would match on those)."""
    import transformers as tf

    from tests.conftest import _make_config
    cache: dict = {}

    def get(arch: str) -> str:
        if arch not in cache:
            torch.manual_seed(1234)
            model = tf.AutoModelForCausalLM.from_config(_make_config(arch), dtype=torch.float32)
            g = _gen(99)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "norm" in name:
                        p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
                    elif name.endswith(".bias"):
                        p.copy_(0.3 * torch.randn(p.shape, generator=g))
            d = tmp_path_factory.mktemp(f"native-{arch}")
            model.save_pretrained(d)
            cache[arch] = (str(d), model.config)
        return cache[arch]
    return get


# lengths 5, 150 and 1 (contexts up to 174 after 24 tokens: 44 blocks of 4)
PROMPTS = [[5, 17, 2, 99, 31], [7] * 3 + [(11 * i) % 250 + 1 for i in range(147)], [200]]


def _llm(path: str, dtype: str, eager: bool, threads: int = 2, block_size: int = 4,
         kv_cache_dtype: str = "auto"):
    from servelm import LLM
    return LLM(path, dtype=dtype, device="cpu", skip_tokenizer_init=True, enforce_eager=eager,
               kv_cache_memory=1 << 24, block_size=block_size, seed=0, threads=threads,
               kv_cache_dtype=kv_cache_dtype)


def _generate(llm, n: int, logprobs=None):
    from servelm import SamplingParams
    sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=logprobs)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], outs


def _watch_decode_steps(llm):
    """Wraps the C step's run: before each, the PyTorch forward of the same decode batch (the
    eager path's _decode, writing the same KV slots, which the C step then rewrites); records
    (C logits, C argmax, PyTorch logits) per step."""
    from servelm.cpu.decode_step import CpuDecodeStep
    runner = llm.engine.core.executor.runner
    step = runner.graphs
    assert isinstance(step, CpuDecodeStep), type(step)
    seen = []
    c_run = step.run

    def run(input_ids, positions, meta):
        ref_logits, _ = runner._decode(input_ids, positions, meta)
        logits, greedy = c_run(input_ids, positions, meta)
        seen.append((logits.clone(), greedy.clone(), ref_logits.float().clone()))
        return logits, greedy

    step.run = run
    return seen


def _check_step_logits(seen, rtol: float, full_batch: int = 3):
    assert seen, "the C decode step never ran"
    assert full_batch in {lg.shape[0] for lg, _, _ in seen}, \
        f"no batch of {full_batch} sequences in the C step"
    for i, (logits, greedy, ref) in enumerate(seen):
        assert torch.isfinite(logits).all()
        assert torch.equal(greedy, logits.argmax(-1)), f"step {i}: argmax is not the logits'"
        scale = ref.abs().amax(-1, keepdim=True)
        err = ((logits - ref).abs() / scale).max().item()
        assert err <= rtol, f"decode step {i} (batch {logits.shape[0]}): logits off by {err:.3g} " \
                            f"of their range (allowed {rtol:g})"


@needs_lib
@pytest.mark.parametrize("arch,threads,block_size", [
    ("llama", 2, 4), ("llama-tied", 1, 16), ("llama3-rope", 2, 4), ("qwen2", 1, 16),
    ("qwen3", 2, 4)])
def test_decode_step_matches_eager_fp32(arch, threads, block_size, tiny_model):
    """fp32: greedy tokens of the C decode step == the eager (PyTorch) engine's, 3 prompts of
    different lengths x 24 tokens; and at every decode step its logits are the PyTorch
    forward's to fp32 rounding (2 layers: a few hundred roundings, 1e-4 of the logits' range)."""
    path, _ = tiny_model(arch)
    threads = min(threads, len(os.sched_getaffinity(0)))  # the engine takes no more than those
    eager = _llm(path, "float32", eager=True, threads=threads, block_size=block_size)
    assert eager.engine.core.executor.runner.graphs is None
    want, _ = _generate(eager, 24)
    del eager
    fast = _llm(path, "float32", eager=False, threads=threads, block_size=block_size)
    seen = _watch_decode_steps(fast)
    assert fast.engine.core.executor.runner.graphs.threads == threads
    got, _ = _generate(fast, 24)
    assert len(seen) >= 20
    _check_step_logits(seen, rtol=1e-4)
    assert got == want


@needs_lib
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_decode_step_bf16(arch, tiny_model):
    """bf16 (KV cache and weights bf16; the C step keeps fp32 activations, PyTorch rounds each
    op's output to bf16): the first tokens agree with the eager engine's, the logits with the
    bf16 PyTorch forward on the same inputs to bf16's resolution, and every id is a token."""
    path, config = tiny_model(arch)
    eager = _llm(path, "bfloat16", eager=True)
    want, _ = _generate(eager, 8)
    del eager
    fast = _llm(path, "bfloat16", eager=False)
    runner = fast.engine.core.executor.runner
    assert runner.kv_caches[0][0].dtype == torch.bfloat16
    seen = _watch_decode_steps(fast)
    got, _ = _generate(fast, 8)
    # the bf16 PyTorch forward rounds every op's output to bf16 (2^-8 relative, through the
    # residual stream of 2 layers and a bf16 head): measured 3% of the logits' range apart
    # from the C step here; a broken step is off by the whole range
    _check_step_logits(seen, rtol=0.1)
    vocab = config.vocab_size
    assert all(0 <= t < vocab for seq in got for t in seq)
    # the first token is the prefill's (PyTorch in both), the second the C step's first
    assert [s[:2] for s in got] == [s[:2] for s in want]


@needs_lib
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_decode_step_fp32_model_bf16_kv(arch, tiny_model):
    """kv_cache_dtype="bfloat16" under an fp32 model (half the KV bytes, as llama.cpp's f16
    cache): the caches are bf16, the C step and the eager engine read the same bf16 rows into
    fp32, so the logits agree to fp32 rounding and the greedy tokens are identical; and the
    tokens stay close to the fp32 cache's (bf16 rounds K and V only)."""
    path, _ = tiny_model(arch)
    eager = _llm(path, "float32", eager=True, kv_cache_dtype="bfloat16")
    assert eager.engine.core.executor.runner.kv_caches[0][0].dtype == torch.bfloat16
    want, _ = _generate(eager, 24)
    del eager
    fast = _llm(path, "float32", eager=False, kv_cache_dtype="bfloat16")
    runner = fast.engine.core.executor.runner
    assert runner.kv_caches[0][0].dtype == torch.bfloat16
    assert runner.kv_caches[0][1].dtype == torch.bfloat16
    seen = _watch_decode_steps(fast)
    got, _ = _generate(fast, 24)
    assert len(seen) >= 20
    # looser than the fp32 cache's 1e-4: the step's own K/V row is rounded to bf16 from each
    # path's fp32 values, which differ in their last bits (sums in other orders); a value on a
    # rounding boundary then differs by a bf16 ulp (2^-8 of it). Seen: 1.3e-4 on an AVX2 build
    _check_step_logits(seen, rtol=5e-4)
    assert got == want
    del fast
    full, _ = _generate(_llm(path, "float32", eager=False), 24)
    assert [s[:2] for s in got] == [s[:2] for s in full]


@needs_lib
def test_decode_step_batches_above_max_rows(tiny_model):
    """18 sequences finishing at different lengths: the C step takes every decode batch (up to
    MAX_ROWS), 18..9 sequences through its batched kernel (each weight row decoded once, then a
    tiled product) and fewer through its GEMV tiles, with the eager engine's tokens throughout."""
    from servelm import SamplingParams
    from servelm.cpu.decode_step import MAX_ROWS
    path, _ = tiny_model("llama")
    g = _gen(3)
    prompts = [torch.randint(1, 250, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 30, (18,), generator=g)]
    params = [SamplingParams(temperature=0, max_tokens=4 + 2 * i, ignore_eos=True)
              for i in range(18)]
    runs = []
    for eager in (True, False):
        llm = _llm(path, "float32", eager)
        seen = None if eager else _watch_decode_steps(llm)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        runs.append([list(o.outputs[0].token_ids) for o in outs])
    sizes = {lg.shape[0] for lg, _, _ in seen}
    assert 18 <= MAX_ROWS and max(sizes) == 18 and min(sizes) == 1 and {9, 8} <= sizes
    _check_step_logits(seen, rtol=1e-4, full_batch=18)
    assert runs[0] == runs[1]


def _write_gguf(path) -> None:
    """A tiny Llama .gguf in the formats the C step reads, a different one per part of the
    merged projections (q Q4_0 | k Q4_1 | v Q8_0, gate Q4_1 | up Q8_0), and a Q8_0 embedding
    that the tied head reads as blocks."""
    g = _gen(0)
    hidden, inter, layers, heads, kv_heads, vocab = 64, 128, 2, 4, 2, 256
    from tests.conftest import tiny_llama_gguf_writer
    w = tiny_llama_gguf_writer(path, "tiny-cpu-native", hidden, inter, layers, heads, kv_heads)

    def quant(name, n, k, qtype, std):
        data = (torch.randn(n, k, generator=g) * std).numpy()
        w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    quant("token_embd.weight", vocab, hidden, Q.Q8_0, 1.0)
    w.add_tensor("output_norm.weight", (1 + 0.1 * torch.randn(hidden, generator=g)).numpy())
    hd = hidden // heads
    shapes = {"attn_q": (hidden, hidden, Q.Q4_0), "attn_k": (kv_heads * hd, hidden, Q.Q4_1),
              "attn_v": (kv_heads * hd, hidden, Q.Q8_0), "attn_output": (hidden, hidden, Q.Q4_1),
              "ffn_gate": (inter, hidden, Q.Q4_1), "ffn_up": (inter, hidden, Q.Q8_0),
              "ffn_down": (hidden, inter, Q.Q4_0)}
    for i in range(layers):
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight",
                         (1 + 0.1 * torch.randn(hidden, generator=g)).numpy())
        for name, (n, k, qtype) in shapes.items():
            quant(f"blk.{i}.{name}.weight", n, k, qtype, 0.2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@needs_lib
def test_decode_step_reads_gguf_blocks(tmp_path):
    """A .gguf kept in its blocks (quantization='gguf'), fp32: the C step reading Q4_0 / Q4_1 /
    Q8_0 in place (mixed within merged layers, a tied Q8_0 head) generates the tokens of the
    eager engine running the same file dequantized at load (plain PyTorch matmuls)."""
    from servelm import LLM
    from servelm.cpu.native import SL_Q4_0, SL_Q4_1, SL_Q8_0
    path = tmp_path / "tiny-native.gguf"
    _write_gguf(path)
    kw = dict(dtype="float32", device="cpu", skip_tokenizer_init=True, kv_cache_memory=1 << 24,
              block_size=4, seed=0)
    deq = LLM(str(path), quantization="none", enforce_eager=True, **kw)
    want, _ = _generate(deq, 24)
    del deq
    kept = LLM(str(path), quantization="gguf", **kw)
    plan = kept.engine.core.executor.runner.graphs.plan
    L0 = plan.layers[0]
    assert [L0.qkv.part[i].type for i in range(L0.qkv.nparts)] == [SL_Q4_0, SL_Q4_1, SL_Q8_0]
    assert [L0.gate_up.part[i].type for i in range(L0.gate_up.nparts)] == [SL_Q4_1, SL_Q8_0]
    assert plan.model.head.part[0].type == SL_Q8_0
    seen = _watch_decode_steps(kept)
    got, _ = _generate(kept, 24)
    _check_step_logits(seen, rtol=1e-4)
    assert got == want


# ---- the narrower builds, where the CPU would take a wider path --------------------------------
_LEVELS = ("portable", "avx2", "avx512")
# flags that build decode.c at a level below the CPU's: AVX2 + FMA (8 lanes), or plain C
_NARROWER = {"avx2": ["-mno-avx512f"], "portable": ["-mno-avx512f", "-mno-avx2"]}


@needs_lib
@pytest.mark.parametrize("level", ["avx2", "portable"])
def test_narrower_build(monkeypatch, level):
    """The same kernels built for a CPU with less than this one: AVX2 with FMA (8-lane vectors,
    the path of CPUs without AVX-512) and plain C (auto-vectorised; neither): linear layers of
    every format, paged attention and the elementwise ops, against the same references."""
    if _LEVELS.index(native.simd_level()) <= _LEVELS.index(level):
        pytest.skip(f"this CPU's own build is {native.simd_level()}: the other tests cover it")
    from servelm.cpu.ops import NativeLinear, paged_attention
    flags = native._flags()
    monkeypatch.setattr(native, "_flags", lambda: [*flags, *_NARROWER[level]])
    native.load.cache_clear()
    try:
        lib = native.load()
        assert lib is not None and lib is not LIB
        for i, (kinds, k, parts) in enumerate([([Q.Q4_0, Q.Q4_1, Q.Q8_0], 96, [16, 5, 33]),
                                               ([Q.Q4_1], 576, [9]), ([F32], 70, [33]),
                                               ([BF16], 40, [16])]):
            dtype = torch.bfloat16 if kinds == [BF16] else torch.float32
            layer, W, mag, _ = _build_layer(k, list(zip(kinds, parts)), dtype, seed=40 + i)
            _check_linear(NativeLinear(lib, layer), W, mag, k, seed=50 + i, threads=(1, 2),
                          ms=(1, 3, 8, 17))
        for j, (lens, H, KVH, D, bsz, kv_dtype) in enumerate([
                ([1, 70, 300], 6, 2, 64, 16, torch.bfloat16),   # 3 heads a kv head, 64: fixed shape
                ([9, 140], 4, 1, 128, 16, torch.bfloat16),      # 4 x 128: fixed, sliced passes
                ([5, 33], 6, 1, 32, 8, torch.float32),          # 6 x 32: the general SIMD path
                ([5, 33], 4, 4, 40, 4, torch.float32)]):        # 40: scalar tails
            q, kc, vc, bt, sl = _paged_case(lens, H, KVH, D, bsz, kv_dtype, seed=60 + j)
            ref, bound = _attention_ref(q, kc, vc, bt, sl, D ** -0.5)
            out = paged_attention(q, kc, vc, bt, sl, D ** -0.5, 2)
            assert torch.isfinite(out).all()
            assert ((out.double() - ref).abs() <= bound).all(), \
                float(((out.double() - ref).abs() / bound).max())
        _check_elementwise()
    finally:
        monkeypatch.undo()
        native.load.cache_clear()


# ---- the prompt path's elementwise ops ------------------------------------------------------------
def _check_elementwise():
    """silu(gate) * up and RMSNorm (with and without the residual add) against PyTorch's
    arithmetic in float64, on random rows of widths with and without vector tails, 1 and 2
    threads."""
    import torch.nn.functional as F

    from servelm.cpu.ops import rms_norm, silu_mul
    g = _gen(71)
    for t in (1, 2):
        torch.set_num_threads(t)
        for T, I in ((1, 3), (7, 8), (5, 17), (64, 1536), (3, 40)):
            x = 4 * torch.randn(T, 2 * I, generator=g)
            got = silu_mul(x)
            gate, up = x.double().chunk(2, dim=-1)
            want = F.silu(gate) * up
            assert got.shape == (T, I) and got.dtype == torch.float32
            assert ((got.double() - want).abs() <= 4e-7 * (want.abs() + up.abs())).all(), \
                float((got.double() - want).abs().max())
        for T, n in ((1, 5), (9, 16), (4, 33), (130, 576), (2, 64)):
            x = torch.randn(T, n, generator=g) * 3
            res = torch.randn(T, n, generator=g)
            w = 1 + 0.3 * torch.randn(n, generator=g)
            for residual in (None, res):
                r = x.double() if residual is None else x.double() + residual.double()
                want = r / (r.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * w.double()
                out = rms_norm(x, w, 1e-6, residual)
                if residual is not None:
                    out, r_out = out
                    assert torch.equal(r_out, x + residual)  # the add, rounded once as PyTorch
                assert ((out.double() - want).abs() <= (n + 8) * 6e-8 * want.abs() + 1e-7).all(), \
                    float((out.double() - want).abs().max())


@needs_lib
def test_elementwise_ops():
    _check_elementwise()


@needs_lib
def test_rope_is_the_pytorch_expression_exactly():
    """The C rotary pass on q/k views of a qkv output (strided rows) = layers/rotary.py's
    PyTorch expression bit for bit, for head sizes 8 to 128 and positions across the cache."""
    from servelm.cpu.ops import rope
    from servelm.layers.rotary import RotaryEmbedding, _apply
    g = _gen(73)
    for T, H, KVH, D in ((1, 4, 2, 8), (7, 9, 3, 64), (33, 6, 1, 128), (5, 2, 2, 36)):
        rot = RotaryEmbedding(D, 4096, 10000.0, {})
        qkv = torch.randn(T, (H + 2 * KVH) * D, generator=g) * 2
        q = qkv[:, :H * D].view(T, H, D)
        k = qkv[:, H * D:(H + KVH) * D].view(T, KVH, D)
        pos = torch.randint(0, 4096, (T,), generator=g)
        cos, sin = rot.cos_sin_cache[pos].chunk(2, dim=-1)
        cos, sin = torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]
        qo, ko = rope(pos, q, k, rot.cos_sin_cache)
        assert torch.equal(qo, _apply(q, cos, sin)) and torch.equal(ko, _apply(k, cos, sin))
        got = rot(pos, q, k)  # the module takes the C pass for fp32 CPU tensors
        assert torch.equal(got[0], qo) and torch.equal(got[1], ko)


@needs_lib
def test_layers_take_the_c_elementwise_ops():
    """fp32 CPU tensors: RMSNorm (both forms) and silu_and_mul go through the C passes and give
    PyTorch's expression's results to rounding; bf16 keeps the PyTorch arithmetic exactly."""
    from servelm.layers.activation import silu_and_mul
    from servelm.layers.norm import RMSNorm
    g = _gen(72)
    norm = RMSNorm(48, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(48, generator=g))
    x, res = torch.randn(6, 48, generator=g), torch.randn(6, 48, generator=g)
    h = x + res
    want = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5))
    out, r = norm(x, res)
    assert torch.equal(r, h)
    torch.testing.assert_close(out, want, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(norm(x), norm.weight * (x * torch.rsqrt(
        x.pow(2).mean(-1, keepdim=True) + 1e-5)), rtol=2e-6, atol=1e-6)
    gu = torch.randn(5, 20, generator=g)
    torch.testing.assert_close(silu_and_mul(gu), torch.nn.functional.silu(gu[:, :10]) * gu[:, 10:],
                               rtol=2e-6, atol=1e-7)
    xb = gu.to(torch.bfloat16)
    assert torch.equal(silu_and_mul(xb), torch.nn.functional.silu(xb[:, :10]) * xb[:, 10:])


# ---- fallback: no compiler ----------------------------------------------------------------------
def test_no_compiler_falls_back(monkeypatch, tmp_path, caplog):
    """CC naming no compiler: load() is None with a warning; GGUF layers and the engine's
    decode step take the PyTorch path; afterwards the real library loads again."""
    from servelm.cpu.decode_step import build_decode_step
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("SERVELM_CACHE_DIR", str(tmp_path / "cache"))
    native.load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="servelm.cpu.native"):
            assert native.load() is None
        assert any(r.levelno == logging.WARNING and "CPU fast path off" in r.getMessage()
                   for r in caplog.records), caplog.text
        assert build_decode_step(None, [], 64, 1) is None
        # a GGUF layer without the lib: no C GEMV, the PyTorch formats path, same numbers
        k = 64
        layer, W, mag, _ = _build_layer(k, [(Q.Q4_1, 16), (Q.Q8_0, 5)], torch.float32, seed=31)
        assert layer.method.native is None
        x = torch.randn(3, k, generator=_gen(32))
        y = layer(x)
        ref = x.double() @ W.T
        assert ((y.double() - ref).abs() <= (k + 64) * U32 * (x.double().abs() @ mag.T)).all()
        assert not list((tmp_path / "cache").rglob("*.so"))
        # and no compiler on the PATH at all
        monkeypatch.delenv("CC")
        monkeypatch.setattr(native.shutil, "which", lambda name: None)
        native.load.cache_clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="servelm.cpu.native"):
            assert native.load() is None
        assert "no C compiler" in caplog.text
    finally:
        monkeypatch.undo()
        native.load.cache_clear()
    if LIB is not None:
        assert native.load() is not None


# ---- int8 / int4 weight-only layers (HF checkpoints quantized at load) -------------------------
@needs_lib
@pytest.mark.parametrize("method,group,m", [("int8", 32, 1), ("int8", 64, 5), ("int8", 128, 17),
                                            ("int4", 32, 1), ("int4", 64, 3), ("int4", 128, 9),
                                            ("int4", 256, 33)])
def test_native_linear_int_methods(method, group, m):
    """The C GEMV over the int8 codes + group scales, and over the int4 layout repacked at load
    (cpu/blocks.int4_blocks), equals the method's own PyTorch reference (which dequantizes)."""
    from servelm.layers.linear import Linear
    from servelm.quantization.config import QuantConfig
    from servelm.quantization.ref import int4_linear_ref, int8_linear_ref
    g = _gen(7 + group + m)
    k, parts = 256, [48, 80]
    torch.set_default_dtype(torch.float32)
    lin = Linear(k, parts, quantization=QuantConfig(method, group_size=group), prefix="t")
    for i, n in enumerate(parts):
        lin.load_weight("weight", torch.randn(n, k, generator=g) * 0.05, i)
    lin.method.process_after_loading(lin)
    assert lin.method.native is not None
    x = torch.randn(m, k, generator=g)
    got = lin.method.apply(lin, x)
    if method == "int8":
        want = int8_linear_ref(x.double(), lin.qweight, lin.scales.double(), group, None)
    else:
        want = int4_linear_ref(x.double(), lin.qweight, lin.scales.double(), lin.zeros.double(),
                               group, None)
    scale = (x.abs().double() @ torch.ones(k, sum(parts), dtype=torch.float64)).max()
    assert (got.double() - want).abs().max() <= 1e-5 * float(scale)


@needs_lib
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_decode_step_int_methods_match_eager(method, tiny_model):
    """int8 / int4 (group 32) HF checkpoints run the C step, token-identical to the eager
    engine in fp32."""
    from servelm import LLM
    path, _ = tiny_model("llama")
    kw = dict(dtype="float32", device="cpu", skip_tokenizer_init=True, kv_cache_memory=1 << 24,
              block_size=4, seed=0, threads=2, quantization=method, quantization_group_size=32)
    eager = LLM(path, enforce_eager=True, **kw)
    want, _ = _generate(eager, 16)
    del eager
    fast = LLM(path, **kw)
    from servelm.cpu.decode_step import CpuDecodeStep
    assert isinstance(fast.engine.core.executor.runner.graphs, CpuDecodeStep)
    got, _ = _generate(fast, 16)
    assert got == want
