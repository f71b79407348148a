"""fp8 (e4m3 + inline fp32 scale) KV cache: the PyTorch reference (attention/kv_quant.py), the
Triton write kernels (plain and fused with rotary) byte for byte against it, and every attention
path (Triton decode / prefill / tree kernels, the Triton and torch backends) on fp8 caches:
tightly against the torch reference on the same fp8 caches, loosely against attention on the
unquantized values.

Runs on CUDA; on a CPU-only machine under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 there), small shapes only. The interpreter's tl.dot on bf16 operands is
wrong (tests/unit/test_kernels.py); the fixture below corrects it for this module, so bf16 runs
here too.
"""
from __future__ import annotations

import random

import pytest
import torch

from servelm.attention.backend import AttentionMetadata
from servelm.attention.kv_quant import (
    FP8_KV_EXTRA, FP8_KV_TINY, dequantize_kv_rows, kv_cache_shape, kv_cache_torch_dtype,
    kv_head_dim, quantize_kv_rows)
from servelm.attention.torch_ref import TorchReferenceBackend, paged_attention_ref, write_kv_ref
from tests.unit.kernel_env import DEVICE, INTERPRET, ON_CUDA, covering, skip_half_on_interpreter

try:
    import triton
    import triton.language as tl

    from servelm.kernels.kv_write import fp8_decode

    @triton.jit
    def _decode_kernel(x_ptr, o16_ptr, obf_ptr, o32_ptr, CVT: tl.constexpr):
        # 256 e4m3 bytes -> their values in fp16, bf16, fp32
        i = tl.arange(0, 256)
        x = tl.load(x_ptr + i)
        tl.store(o16_ptr + i, fp8_decode(x, tl.float16, CVT))
        tl.store(obf_ptr + i, fp8_decode(x, tl.bfloat16, CVT))
        tl.store(o32_ptr + i, fp8_decode(x, tl.float32, CVT))
except ImportError:  # no triton: the kernel tests skip, the reference's run
    triton = None

kernels = pytest.mark.skipif(triton is None or not (ON_CUDA or INTERPRET),
                             reason="needs triton, and CUDA or TRITON_INTERPRET=1 (the CPU "
                                    "interpreter)")
ATTN_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# |out - ref| on the same fp8 caches, outputs of magnitude ~1 (as test_kernels.py's ATTN_TOL)
TIGHT = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 2e-4}
LOOSE = 5e-2  # relative (Frobenius) error against attention on the unquantized values
GARBAGE_BLOCK = 1 << 28  # unused block-table entries: an unmasked read of one would fault


@pytest.fixture(autouse=True)
def _bf16_dot_in_interpreter(monkeypatch):
    """Triton 3.6's interpreter multiplies bf16 tl.dot operands as their uint16 storage (hence
    no bf16 attention on the CPU in test_kernels.py). fp8 attention's p @ v dot is bf16: for
    this module's tests the interpreter widens bf16 operands to fp32 first. CUDA: no change."""
    if not INTERPRET:
        return
    import numpy as np
    from triton.runtime import interpreter as interp
    create_dot = interp.InterpreterBuilder.create_dot

    def widen(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        f32 = interp._convert_float(x.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interp.TensorHandle(f32, tl.float32)

    monkeypatch.setattr(interp.InterpreterBuilder, "create_dot",
                        lambda self, a, b, *rest: create_dot(self, widen(a), widen(b), *rest))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _rows(*shape, seed: int, dtype=torch.float32, spread: float = 1.0) -> torch.Tensor:
    """Random head rows [..., D] whose magnitudes vary by ~e^(+-2 spread) from row to row (a
    per-row scale matters), never zero."""
    g = _gen(seed)
    x = torch.randn(*shape, generator=g) * torch.exp(
        spread * torch.randn(*shape[:-1], 1, generator=g))
    return x.to(dtype).to(DEVICE)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------- the torch reference

def test_layout_helpers():
    assert FP8_KV_EXTRA == 4
    assert kv_cache_shape(10, 16, 8, 128, fp8=True) == (10, 16, 8, 132)
    assert kv_cache_shape(10, 16, 8, 128, fp8=False) == (10, 16, 8, 128)
    assert kv_cache_torch_dtype(torch.bfloat16, "auto") == torch.bfloat16
    assert kv_cache_torch_dtype(torch.bfloat16, "fp8") == torch.uint8
    assert kv_cache_torch_dtype(torch.float16, "fp8_e4m3") == torch.uint8
    assert kv_cache_torch_dtype(torch.float32, "bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        kv_cache_torch_dtype(torch.bfloat16, "fp8_e5m2")
    with pytest.raises(ValueError, match="head_dim"):
        kv_cache_shape(10, 16, 8, 66, fp8=True)
    assert kv_head_dim(torch.empty(2, 4, 3, 68, dtype=torch.uint8)) == 64
    assert kv_head_dim(torch.empty(2, 4, 3, 68, dtype=torch.bfloat16)) == 68


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(7, 3, 64), (33, 1, 128), (5, 8, 32), (2, 2, 4)], ids=str)
def test_quantize_round_trip(dtype, shape):
    x = _rows(*shape, seed=sum(shape), dtype=dtype).cpu()
    c = quantize_kv_rows(x)
    assert c.dtype == torch.uint8 and c.shape == (*shape[:-1], shape[-1] + 4) and c.is_contiguous()
    # the layout: D e4m3 bytes, then the fp32 scale amax / 448 (bit-exact), little-endian
    amax = x.float().abs().amax(-1)
    scale = c[..., -4:].contiguous().view(torch.float32)[..., 0]
    assert torch.equal(scale, amax / 448)
    le = c[..., -4:].long() << torch.tensor([0, 8, 16, 24])
    assert torch.equal(le.sum(-1).to(torch.int32), scale.view(torch.int32))
    e4m3 = c[..., :-4].view(torch.float8_e4m3fn).float()
    assert torch.equal(e4m3.abs().amax(-1), torch.full_like(amax, 448.0))  # the row's max: 448
    # round trip: e4m3 keeps 3 mantissa bits (relative error <= 2^-4), subnormals below 2^-6
    # of the scale's unit (absolute error <= 2^-10 of it)
    y = dequantize_kv_rows(c, torch.float32)
    assert y.shape == x.shape
    err = (y - x.float()).abs()
    bound = torch.maximum(x.float().abs() * 2 ** -4, scale[..., None] * 2 ** -10)
    assert (err <= bound * (1 + 1e-6)).all()
    assert dequantize_kv_rows(c, dtype).dtype == dtype


def test_quantize_edge_rows():
    """An all-zero row gets the floor scale (no division by zero) and decodes to zeros; -0.0
    keeps its sign byte; a row's amax comes back exactly when its scale is a power of two."""
    x = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [-0.0, 1.0, -2.0, 3e4], [1e-3, -1e-3, 5.0, 7.0]]])
    c = quantize_kv_rows(x)
    scale = c[..., -4:].contiguous().view(torch.float32)[..., 0]
    assert scale[0, 0] == torch.tensor(FP8_KV_TINY, dtype=torch.float32) / 448
    assert (c[0, 0, :4] == 0).all() and c[0, 1, 0] == 0x80
    y = dequantize_kv_rows(c, torch.float32)
    assert torch.equal(y[0, 0], x[0, 0]) and y[0, 2, 3] == 7.0  # scale 7 / 448 = 2^-6: exact
    torch.testing.assert_close(y[0, 1, 3], x[0, 1, 3], rtol=1e-6, atol=0)


# ---------------------------------------------------------------- the write kernels

@kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 64), (3, 80), (2, 128), (4, 32)])
@pytest.mark.parametrize("block_size", [1, 16])
def test_write_kv_fp8_bytes(dtype, num_kv_heads, head_dim, block_size):
    """The Triton write produces quantize_kv_rows' bytes exactly (the scale a correctly rounded
    division, the e4m3 rounding to nearest even by bit arithmetic), skipping slots < 0."""
    skip_half_on_interpreter([torch.bfloat16, torch.float16, torch.float32].index(dtype),
                             [1, 3, 2, 4].index(num_kv_heads), block_size == 16)
    from servelm.kernels.kv_write import write_kv
    t, num_blocks = 19, _cdiv(40, block_size) + 1
    seed = num_kv_heads * 1000 + head_dim + block_size
    # k, v as strided views of one fused qkv output: [T, (2 + 2 KVH) * D]
    qkv = _rows(t, (2 + 2 * num_kv_heads) * head_dim, seed=seed, dtype=dtype)
    k = qkv[:, 2 * head_dim:(2 + num_kv_heads) * head_dim].view(t, num_kv_heads, head_dim)
    v = qkv[:, (2 + num_kv_heads) * head_dim:].view(t, num_kv_heads, head_dim)
    # magnitudes varying per head row
    k.mul_(_rows(t, num_kv_heads, 1, seed=seed + 5).abs().to(dtype))  # in place: still views
    # a row of scale 1 with e4m3 ties: 1.0625 between 1 and 1.125 rounds to even (1)
    k[3, 0] = torch.tensor([448.0, 1.0625, 0.5, -3.5] * (head_dim // 4), dtype=dtype)
    slots = torch.randperm(num_blocks * block_size, generator=_gen(seed))[:t]
    slots[::4] = -1  # padding tokens: skipped
    slots = slots.to(DEVICE)
    shape = kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim, fp8=True)
    kc = torch.randint(0, 256, shape, generator=_gen(seed + 1), dtype=torch.uint8).to(DEVICE)
    vc = torch.randint(0, 256, shape, generator=_gen(seed + 2), dtype=torch.uint8).to(DEVICE)
    kc_r, vc_r = kc.clone(), vc.clone()
    keep = slots >= 0
    write_kv_ref(k[keep], v[keep], kc_r, vc_r, slots[keep])
    write_kv(k, v, kc, vc, slots)
    assert torch.equal(kc, kc_r) and torch.equal(vc, vc_r)


@kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(5, 8, 2, 128), (7, 3, 3, 80), (4, 4, 1, 32)], ids=str)
def test_rotary_write_kv_fp8(dtype, shape):
    """The fused rotary + KV write stores the bytes of quantize_kv_rows(rotated k) and of v, with
    the same rotation (q and k bits) as on a bf16 cache; the torch reference of the fused op
    writes the same bytes from its own rotation."""
    from servelm.kernels.rotary_kv import rotary_write_kv, rotary_write_kv_ref
    t, h, kvh, d = shape
    bs, num_blocks = 16, 3
    seed = t * 100 + h * 10 + kvh + d
    qkv = _rows(t, (h + 2 * kvh) * d, seed=seed, dtype=dtype)
    positions = torch.randint(0, 1000, (t,), generator=_gen(seed)).to(DEVICE)
    slots = torch.randperm(num_blocks * bs, generator=_gen(seed + 1))[:t]
    slots[1::3] = -1
    slots = slots.to(DEVICE)
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.arange(1024).float()[:, None] * inv[None, :]
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1).to(DEVICE)

    def split(x):
        return (x[:, :h * d].view(t, h, d), x[:, h * d:(h + kvh) * d].view(t, kvh, d),
                x[:, (h + kvh) * d:].view(t, kvh, d))

    shape8 = kv_cache_shape(num_blocks, bs, kvh, d, fp8=True)
    kc = torch.zeros(shape8, dtype=torch.uint8, device=DEVICE)
    vc = torch.zeros_like(kc)
    qkv_f = qkv.clone()
    q, k, v = split(qkv_f)
    rotary_write_kv(positions, q, k, v, cos_sin, kc, vc, slots)
    keep = slots >= 0
    kc_r, vc_r = torch.zeros_like(kc), torch.zeros_like(vc)
    write_kv_ref(k[keep], v[keep], kc_r, vc_r, slots[keep])  # k: as the kernel rotated it
    assert torch.equal(kc, kc_r) and torch.equal(vc, vc_r)
    # the rotation is the bf16-cache kernel's, bit for bit
    qkv_b = qkv.clone()
    qb, kb, vb = split(qkv_b)
    kcb = torch.zeros(num_blocks, bs, kvh, d, dtype=dtype, device=DEVICE)
    rotary_write_kv(positions, qb, kb, vb, cos_sin, kcb, kcb.clone(), slots)
    assert torch.equal(qkv_f, qkv_b)
    # the fused op's torch reference: same bytes wherever its rotation has the same bits
    qkv_r = qkv.clone()
    kc_rr, vc_rr = torch.zeros_like(kc), torch.zeros_like(vc)
    rotary_write_kv_ref(positions, *split(qkv_r), cos_sin, kc_rr, vc_rr, slots)
    assert torch.equal(vc_rr, vc)
    if torch.equal(qkv_r, qkv_f):  # the interpreter truncates bf16 casts: rotations may differ
        assert torch.equal(kc_rr, kc)


@kernels
@pytest.mark.parametrize("cvt", [True, False])
def test_fp8_decode_all_bytes(cvt):
    """fp8_decode of every e4m3 byte (subnormals, +-0, +-448) into fp16, bf16 and fp32 equals
    torch's float8_e4m3fn values, by tl.float8e4nv (sm_89+) and from the bits (sm_80); the NaN
    bytes 0x7f / 0xff, which writes never produce, are skipped."""
    x = torch.arange(256, dtype=torch.uint8, device=DEVICE)
    outs = [torch.empty(256, dtype=dt, device=DEVICE)
            for dt in (torch.float16, torch.bfloat16, torch.float32)]
    _decode_kernel[(1,)](x, *outs, CVT=cvt)
    ref = x.view(torch.float8_e4m3fn).float()
    keep = ~ref.isnan()
    for out in outs:
        assert torch.equal(out.float()[keep], ref[keep])
        assert torch.equal(out.float().signbit()[keep], ref.signbit()[keep])  # -0.0 stays


# ---------------------------------------------------------------- attention on fp8 caches

def _tree_bits(n: int, rng: random.Random) -> list[int]:
    """Ancestor bitmasks (self included) of a random tree of n nodes, parents before children
    (parent -1: the root, the newest context token before the tree)."""
    bits: list[int] = []
    for j in range(n):
        p = rng.randrange(-1, j)
        bits.append((bits[p] if p >= 0 else 0) | (1 << j))
    return bits


def make_fp8_batch(seqs, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                   dtype: torch.dtype, seed: int, q_mag: float = 1.0, v_mag: float = 1.0,
                   v_spread: float = 0.5):
    """seqs: per sequence (context tokens before the queries, query tokens, tree nodes or 0).
    A tree sequence's queries are its newest context token (the root, before the tree) and its
    tree nodes. Blocks are shuffled; unused table entries hold garbage. Returns q and the query
    tokens' k, v [T, KVH, D] in dtype, fp8 caches holding the earlier tokens (the query
    tokens' rows garbage, for each test to write), fp32 caches of the unquantized values of
    every token, and meta. q_mag, v_mag multiply q and v; v_spread sets v's row spread."""
    rng = random.Random(seed)
    q_lens, seq_lens, starts, bits = [], [], [], []
    for ctx, ql, tree in seqs:
        if tree:
            q_lens.append(1 + tree)
            seq_lens.append(ctx + tree)
            starts.append(ctx)
            bits += [0] + _tree_bits(tree, rng)
        else:
            q_lens.append(ql)
            seq_lens.append(ctx + ql)
            starts.append(1 << 30)
            bits += [0] * ql
    need = [_cdiv(s, block_size) for s in seq_lens]
    num_blocks = sum(need) + 2
    perm = list(range(num_blocks))
    rng.shuffle(perm)
    table = torch.full((len(seqs), max(need) + 2), GARBAGE_BLOCK, dtype=torch.int32)
    slots, i = [], 0
    for s, n in enumerate(need):
        table[s, :n] = torch.tensor(perm[i:i + n], dtype=torch.int32)
        i += n
        for pos in range(seq_lens[s] - q_lens[s], seq_lens[s]):
            slots.append(int(table[s, pos // block_size]) * block_size + pos % block_size)
    slot_mapping = torch.tensor(slots, dtype=torch.int64)
    # unquantized values of every slot; the fp8 caches hold the quantized prefix, the new
    # tokens' rows (written by each test) start as garbage bytes
    # rows of magnitudes within ~e^+-1: scores of a few units, as in a model (wider spreads
    # make the softmax an argmax, where a 2^-4 key error legitimately moves the output)
    k32 = _rows(num_blocks, block_size, num_kv_heads, head_dim, seed=seed + 1, spread=0.5).cpu()
    v32 = _rows(num_blocks, block_size, num_kv_heads, head_dim, seed=seed + 2,
                spread=v_spread).cpu()
    # values share a mean direction per kv head, as a model's do: without it, outputs over long
    # random contexts cancel to a few % of |v|, and any score error looks large relative to them
    v32 = (v32 + torch.randn(num_kv_heads, head_dim, generator=_gen(seed + 5))) * v_mag
    k8, v8 = quantize_kv_rows(k32.flatten(0, 1)), quantize_kv_rows(v32.flatten(0, 1))
    g = _gen(seed + 3)
    k8[slot_mapping] = torch.randint(0, 256, k8[slot_mapping].shape, generator=g, dtype=torch.uint8)
    v8[slot_mapping] = torch.randint(0, 256, v8[slot_mapping].shape, generator=g, dtype=torch.uint8)
    shape8 = kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim, fp8=True)
    k_new = k32.flatten(0, 1)[slot_mapping].to(dtype).to(DEVICE)
    v_new = v32.flatten(0, 1)[slot_mapping].to(dtype).to(DEVICE)
    # the fp32 caches hold exactly what the model stores: new tokens rounded to dtype
    k32.view(-1, num_kv_heads, head_dim)[slot_mapping] = k_new.float().cpu()
    v32.view(-1, num_kv_heads, head_dim)[slot_mapping] = v_new.float().cpu()
    q = (_rows(sum(q_lens), num_heads, head_dim, seed=seed + 4, spread=0.5) * q_mag).to(dtype)
    qsl = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(q_lens, dtype=torch.int32), 0)
    tree = any(t for _, _, t in seqs)
    dev = dict(device=DEVICE)
    meta = AttentionMetadata(
        slot_mapping=slot_mapping.to(DEVICE), query_start_loc=qsl.to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, **dev), block_tables=table.to(DEVICE),
        max_query_len=max(q_lens), max_seq_len=max(seq_lens), query_lens_cpu=tuple(q_lens),
        seq_lens_cpu=tuple(seq_lens),
        tree_mask=torch.tensor(bits, dtype=torch.int64, **dev) if tree else None,
        tree_start=torch.tensor(starts, dtype=torch.int32, **dev) if tree else None)
    return (q, k_new, v_new, k8.view(shape8).to(DEVICE), v8.view(shape8).to(DEVICE),
            k32.to(DEVICE), v32.to(DEVICE), meta)


def _close(out, ref, tol):
    assert torch.isfinite(out).all(), "unwritten or non-finite output"
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def _rel(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _written(kc8, vc8, k, v, meta):
    """fp8 caches with this step's k, v stored by the reference write."""
    kc8, vc8 = kc8.clone(), vc8.clone()
    write_kv_ref(k, v, kc8, vc8, meta.slot_mapping)
    return kc8, vc8


# (cached, query, tree nodes) per sequence, GQA (heads, kv heads), head dim, block size
DECODE_CASES = [
    ([(0, 1, 0), (15, 1, 0), (16, 1, 0), (47, 1, 0), (100, 1, 0)], 8, 2, 64, 16),
    ([(0, 1, 0), (4, 1, 0), (40, 1, 0), (100, 1, 0)], 6, 3, 32, 1),
    ([(30, 1, 0), (65, 1, 0)], 4, 1, 128, 16),
]


@kernels
@pytest.mark.parametrize("dtype,case,splits,min_part", [
    (dt, case, *sp) for dt, case, sp in covering(ATTN_DTYPES, range(len(DECODE_CASES)),
                                                 [(1, None), (3, 64)])], ids=str)
def test_decode_attention_fp8(dtype, case, splits, min_part):
    """Paged flash-decoding on fp8 caches (one and several partitions) vs the torch reference on
    the same caches (tight) and vs attention on the unquantized values (loose)."""
    from servelm.kernels.decode_attention import decode_attention
    from servelm.kernels.kv_write import write_kv
    seqs, h, kvh, d, bs = DECODE_CASES[case]
    q, k, v, kc8, vc8, kc32, vc32, meta = make_fp8_batch(seqs, h, kvh, d, bs, dtype, 10 + case)
    write_kv(k, v, kc8, vc8, meta.slot_mapping)  # the kernel writes this step's tokens
    scale = d ** -0.5
    out = torch.full_like(q, float("nan"))
    decode_attention(q, kc8, vc8, meta.block_tables, meta.seq_lens, scale,
                     max_seq_len=meta.max_seq_len, num_splits=splits, min_partition=min_part,
                     out=out)
    _close(out, paged_attention_ref(q, kc8, vc8, meta, scale), TIGHT[dtype])
    assert _rel(out, paged_attention_ref(q.float(), kc32, vc32, meta, scale)) < LOOSE


# (cached, query, tree nodes): chunks after a cached prefix, whole prompts, decode rows mixed in
PREFILL_CASES = [
    ([(0, 21, 0), (37, 9, 0), (5, 1, 0), (16, 16, 0)], 8, 2, 64, 16),
    ([(0, 7, 0), (11, 3, 0), (2, 1, 0)], 6, 3, 32, 1),
    ([(40, 20, 0), (3, 5, 0)], 4, 1, 128, 16),
]
TREE_CASES = [  # token trees after a cached context, beside a plain chunk
    ([(20, 0, 6), (9, 4, 0), (33, 0, 11)], 8, 2, 64, 16),
    ([(5, 0, 4), (1, 2, 0)], 4, 4, 32, 1),
]


@kernels
@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("case", [("prefill", i) for i in range(len(PREFILL_CASES))]
                         + [("tree", i) for i in range(len(TREE_CASES))], ids=str)
def test_prefill_attention_fp8(dtype, case):
    """Paged causal (and tree-masked) flash attention on fp8 caches: chunked prefill with a
    cached prefix, GQA, block sizes 1 and 16."""
    from servelm.kernels.prefill_attention import prefill_attention
    kind, i = case
    seqs, h, kvh, d, bs = (PREFILL_CASES if kind == "prefill" else TREE_CASES)[i]
    q, k, v, kc8, vc8, kc32, vc32, meta = make_fp8_batch(seqs, h, kvh, d, bs, dtype, 20 + i)
    kc8, vc8 = _written(kc8, vc8, k, v, meta)
    scale = d ** -0.5
    ref = paged_attention_ref(q, kc8, vc8, meta, scale)
    exact = paged_attention_ref(q.float(), kc32, vc32, meta, scale)
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, kc8, vc8, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale,
                      out=out, tree_mask=meta.tree_mask, tree_start=meta.tree_start)
    _close(out, ref, TIGHT[dtype])
    assert _rel(out, exact) < LOOSE


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["decode", "decode_grouped", "prefill", "tree"])
def test_torch_backend_fp8(dtype, kind):
    """The torch backend's fast paths (batched / grouped decode, per-sequence SDPA) write and
    read fp8 caches as the reference does."""
    if kind == "decode":
        seqs, h, kvh, d, bs = DECODE_CASES[0]
    elif kind == "decode_grouped":  # more than 16 sequences: sorted groups
        seqs, h, kvh, d, bs = [(n * 7 % 45, 1, 0) for n in range(19)], 4, 2, 32, 16
    elif kind == "prefill":
        seqs, h, kvh, d, bs = PREFILL_CASES[0]
    else:
        seqs, h, kvh, d, bs = TREE_CASES[0]
    q, k, v, kc8, vc8, kc32, vc32, meta = make_fp8_batch(seqs, h, kvh, d, bs, dtype, 30)
    backend = TorchReferenceBackend()
    kc_r, vc_r = _written(kc8, vc8, k, v, meta)
    backend.write_kv(k, v, kc8, vc8, meta.slot_mapping)
    assert torch.equal(kc8, kc_r) and torch.equal(vc8, vc_r)
    scale = d ** -0.5
    out = backend.forward(q, k, v, kc8, vc8, meta, scale)
    ref = paged_attention_ref(q, kc8, vc8, meta, scale)
    _close(out, ref, {torch.bfloat16: 2e-2, torch.float32: 1e-5}[dtype])
    assert _rel(out, paged_attention_ref(q.float(), kc32, vc32, meta, scale)) < LOOSE


@kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["decode", "prefill", "tree", "sdpa", "rotary"])
def test_triton_backend_fp8(dtype, kind, monkeypatch):
    """The Triton backend end to end on fp8 caches (write or rotate-and-write, then forward,
    each dispatch path) against the torch backend on its own fp8 caches."""
    import servelm.attention.triton_backend as tb
    from servelm.layers.rotary import RotaryEmbedding
    sdpa_calls = []
    sdpa = tb._fresh_prefill_sdpa
    monkeypatch.setattr(tb, "_fresh_prefill_sdpa", lambda *a: sdpa_calls.append(1) or sdpa(*a))
    cases = {"decode": DECODE_CASES[0], "prefill": PREFILL_CASES[1], "tree": TREE_CASES[1],
             "sdpa": ([(0, 17, 0), (0, 17, 0)], 4, 2, 32, 16),
             "rotary": ([(9, 4, 0), (0, 6, 0)], 4, 2, 32, 16)}
    seqs, h, kvh, d, bs = cases[kind]
    q, k, v, kc8, vc8, _, _, meta = make_fp8_batch(seqs, h, kvh, d, bs, dtype, 40)
    backend, ref_backend = tb.TritonAttentionBackend(), TorchReferenceBackend()
    backend.sdpa_min_len = 16  # "sdpa": two fresh 17-token prompts take the SDPA path
    kc_r, vc_r = kc8.clone(), vc8.clone()
    if kind == "rotary":
        with torch.device(DEVICE):
            rope = RotaryEmbedding(d, 256, 10000.0, {"rope_type": "default"}, use_kernel=True)
        pos = torch.cat([torch.arange(s - n, s) for n, s in zip(meta.query_lens_cpu,
                                                                  meta.seq_lens_cpu)]).to(DEVICE)
        q_r, k_r = q.clone(), k.clone()
        q, k = backend.rotate_and_write_kv(rope, pos, q, k, v, kc8, vc8, meta.slot_mapping)
        # the reference: the same (kernel) rotation, then the torch write
        q_r, k_r = rope(pos, q_r, k_r)
        ref_backend.write_kv(k_r, v, kc_r, vc_r, meta.slot_mapping)
        assert torch.equal(q, q_r) and torch.equal(k, k_r)
    else:
        backend.write_kv(k, v, kc8, vc8, meta.slot_mapping)
        ref_backend.write_kv(k, v, kc_r, vc_r, meta.slot_mapping)
    assert torch.equal(kc8, kc_r) and torch.equal(vc8, vc_r)
    scale = d ** -0.5
    out = backend.forward(q, k, v, kc8, vc8, meta, scale)
    assert len(sdpa_calls) == (kind == "sdpa")
    ref = ref_backend.forward(q, k, v, kc_r, vc_r, meta, scale)
    _close(out, ref, TIGHT[dtype])


@kernels
@pytest.mark.parametrize("head_dim", [96, 256])
def test_fp8_attention_head_dims(head_dim):
    """Head dims off the power-of-two tiles (96: the scale bytes sit inside the padded tile,
    masked) and Gemma's 256 (decode on 8 warps), decode and chunked prefill."""
    from servelm.kernels.decode_attention import decode_attention
    from servelm.kernels.prefill_attention import prefill_attention
    dtype = torch.bfloat16
    for seqs in ([(5, 1, 0), (40, 1, 0)], [(0, 9, 0), (20, 6, 0)]):
        q, k, v, kc8, vc8, kc32, vc32, meta = make_fp8_batch(seqs, 4, 2, head_dim, 16, dtype, 70)
        kc8, vc8 = _written(kc8, vc8, k, v, meta)
        scale = head_dim ** -0.5
        ref = paged_attention_ref(q, kc8, vc8, meta, scale)
        if meta.max_query_len == 1:
            out = decode_attention(q, kc8, vc8, meta.block_tables, meta.seq_lens, scale,
                                   max_seq_len=meta.max_seq_len, num_splits=2, min_partition=64)
        else:
            out = prefill_attention(q, kc8, vc8, meta.block_tables, meta.seq_lens,
                                    meta.query_start_loc, scale)
        _close(out, ref, TIGHT[dtype])
        assert _rel(out, paged_attention_ref(q.float(), kc32, vc32, meta, scale)) < LOOSE


@kernels
@pytest.mark.parametrize("dtype,q_mag,v_mag,v_spread", [
    (torch.bfloat16, 2.0 ** 40, 2.0 ** 60, 7.0),  # q and v far beyond fp16's range
    (torch.bfloat16, 2.0 ** -40, 2.0 ** -60, 7.0),  # far below it
    (torch.float16, 2.0 ** 8, 2.0 ** -8, 2.0),  # within fp16's range (values of an fp16 model)
    (torch.float32, 2.0 ** 40, 2.0 ** -60, 7.0)])
def test_fp8_attention_magnitudes(dtype, q_mag, v_mag, v_spread):
    """q and values of extreme magnitudes (the softmax scale compensating q's), value rows
    spread over up to 2^+-20 (v_spread 7): the fp16 q @ k^T dot must not overflow or flush
    (q's power-of-two scaling), nor p @ v (bf16, or fp16 on dequantized values)."""
    from servelm.kernels.decode_attention import decode_attention
    from servelm.kernels.prefill_attention import prefill_attention
    for seqs, h, kvh, d, bs in (DECODE_CASES[2], PREFILL_CASES[0]):
        q, k, v, kc8, vc8, _, _, meta = make_fp8_batch(seqs, h, kvh, d, bs, dtype, 50,
                                                       q_mag=q_mag, v_mag=v_mag,
                                                       v_spread=v_spread)
        kc8, vc8 = _written(kc8, vc8, k, v, meta)
        scale = d ** -0.5 / q_mag
        ref = paged_attention_ref(q, kc8, vc8, meta, scale)
        if meta.max_query_len == 1:
            out = decode_attention(q, kc8, vc8, meta.block_tables, meta.seq_lens, scale,
                                   max_seq_len=meta.max_seq_len)
        else:
            out = prefill_attention(q, kc8, vc8, meta.block_tables, meta.seq_lens,
                                    meta.query_start_loc, scale)
        assert torch.isfinite(out).all() and torch.isfinite(ref).all()
        # errors relative to each output row's largest entry (rows mix value rows of very
        # different magnitudes, so single entries may cancel to far below it)
        err = (out.float() - ref.float()).abs() / ref.float().abs().amax(-1, keepdim=True)
        assert err.max() < TIGHT[dtype], err.max()


@kernels
@pytest.mark.parametrize("variant,dtype,kernel", covering(
    ["int64_offsets", "bit_decode"], [torch.bfloat16, torch.float16, torch.float32],
    ["decode", "prefill"]), ids=str)
def test_fp8_attention_variants(monkeypatch, variant, dtype, kernel):
    """The kernels' other fp8 variants on a small cache, same outputs: int64 row offsets
    (OFF64, caches of 2^31 bytes or more) and e4m3 decoded from its bits (FP8_CVT off: sm_80,
    which has no tl.float8e4nv). Every combination on CUDA; on the interpreter every pair of
    values of two of variant, dtype and kernel meets."""
    import servelm.kernels.decode_attention as da
    import servelm.kernels.prefill_attention as pa
    for mod in (da, pa):
        if variant == "int64_offsets":
            monkeypatch.setattr(mod, "fp8_offsets_int64", lambda cache: True)
        else:
            monkeypatch.setattr(mod, "fp8_native_cvt", lambda device: False)
    seqs, h, kvh, d, bs = DECODE_CASES[1]
    q, k, v, kc8, vc8, _, _, meta = make_fp8_batch(seqs, h, kvh, d, bs, dtype, 60)
    kc8, vc8 = _written(kc8, vc8, k, v, meta)
    if kernel == "decode":
        out = da.decode_attention(q, kc8, vc8, meta.block_tables, meta.seq_lens, 0.2,
                                  max_seq_len=meta.max_seq_len)
    else:
        out = pa.prefill_attention(q, kc8, vc8, meta.block_tables, meta.seq_lens,
                                   meta.query_start_loc, 0.2)
    _close(out, paged_attention_ref(q, kc8, vc8, meta, 0.2), TIGHT[dtype])
