"""Triton kernels vs their torch references on fresh random inputs.

Runs on CUDA; on a CPU-only machine with triton installed, the small shapes run under the
interpreter when the environment has TRITON_INTERPRET=1 (set before the kernels are defined, since
triton reads it then: tests/conftest.py sets it when there is no CUDA device). Otherwise every
test here is skipped.
"""
from __future__ import annotations

import random

import pytest
import torch

triton = pytest.importorskip("triton")

from servelm.attention.backend import AttentionMetadata  # noqa: E402
from servelm.attention.torch_ref import (  # noqa: E402
    TorchReferenceBackend, paged_attention_ref, write_kv_ref)
from servelm.kernels.activation import silu_and_mul, silu_and_mul_ref  # noqa: E402
from servelm.kernels.decode_attention import decode_attention  # noqa: E402
from servelm.kernels.kv_write import write_kv  # noqa: E402
from servelm.kernels.prefill_attention import prefill_attention  # noqa: E402
from servelm.kernels.rmsnorm import (  # noqa: E402
    fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref)
from servelm.kernels.rotary import rotary_embedding, rotary_embedding_ref  # noqa: E402

from tests.unit.kernel_env import DEVICE, INTERPRET, ON_CUDA, covering  # noqa: E402
pytestmark = pytest.mark.skipif(not (ON_CUDA or INTERPRET),
                                reason="needs CUDA, or TRITON_INTERPRET=1 for the CPU interpreter")
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="large shapes: CUDA only")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# The interpreter casts fp32 -> bf16 by truncation, not round-to-nearest: exact-rounding checks
# hold on CUDA only, and bf16 tolerances widen by a few ulps on CPU.
EXACT_BF16 = ON_CUDA
# ... and its tl.dot on bf16 operands returns garbage: attention runs bf16 on CUDA only.
ATTN_DTYPES = DTYPES if ON_CUDA else [torch.float16, torch.float32]
ATTN_BF16 = torch.bfloat16 if ON_CUDA else torch.float16
# |out - ref| allowed for attention outputs of magnitude ~1 (inputs randn)
ATTN_TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 2e-4}
GARBAGE_BLOCK = 1 << 28  # unused block-table entries: an unmasked read of one would fault


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _randn(*shape, dtype, seed, scale=1.0):
    return (torch.randn(*shape, generator=_gen(seed)) * scale).to(dtype).to(DEVICE)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def make_batch(ctx_q: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int,
               block_size: int, dtype: torch.dtype, seed: int):
    """ctx_q: per sequence (cached tokens, query tokens). Blocks are shuffled; unused table entries
    hold garbage. Returns q, k_cache, v_cache, meta."""
    rng = random.Random(seed)
    seq_lens = [c + n for c, n in ctx_q]
    q_lens = [n for _, n in ctx_q]
    need = [_cdiv(s, block_size) for s in seq_lens]
    num_blocks = sum(need) + 3
    perm = list(range(num_blocks))
    rng.shuffle(perm)
    max_blocks = max(need + [1]) + 2
    table = torch.full((len(ctx_q), max_blocks), GARBAGE_BLOCK, dtype=torch.int32)
    slots = []
    i = 0
    for s, n in enumerate(need):
        table[s, :n] = torch.tensor(perm[i:i + n], dtype=torch.int32)
        i += n
        for pos in range(seq_lens[s] - q_lens[s], seq_lens[s]):
            slots.append(int(table[s, pos // block_size]) * block_size + pos % block_size)
    k_cache = _randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, seed=seed + 1)
    v_cache = _randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, seed=seed + 2)
    q = _randn(sum(q_lens), num_heads, head_dim, dtype=dtype, seed=seed + 3)
    qsl = torch.zeros(len(ctx_q) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(q_lens, dtype=torch.int32), 0)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        query_start_loc=qsl.to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=table.to(DEVICE),
        max_query_len=max(q_lens + [0]), max_seq_len=max(seq_lens + [0]),
        query_lens_cpu=tuple(q_lens), seq_lens_cpu=tuple(seq_lens))
    return q, k_cache, v_cache, meta


def assert_attn_close(out, ref, dtype):
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite output"
    tol = ATTN_TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    rel = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-6)).item()
    assert rel < tol / 2, rel


def _poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


# ---------------------------------------------------------------- write_kv

@pytest.mark.parametrize("dtype,num_kv_heads,head_dim,block_size", [
    (dt, *heads, bs) for dt, heads, bs in covering(
        DTYPES, [(1, 64), (2, 128), (8, 128), (3, 96)], [16, 32])], ids=str)
def test_write_kv(dtype, num_kv_heads, head_dim, block_size):
    num_tokens, num_blocks = 37, 9
    seed = num_kv_heads * 1000 + head_dim + block_size
    # k, v as strided views into one fused qkv output: [T, (H + 2 KVH) * D]
    qkv = _randn(num_tokens, (4 + 2 * num_kv_heads) * head_dim, dtype=dtype, seed=seed)
    k = qkv[:, 4 * head_dim:(4 + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, (4 + num_kv_heads) * head_dim:].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=_gen(seed))[:num_tokens]
    slots[::5] = -1  # padding tokens: skipped
    k_cache = _randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, seed=seed + 1)
    v_cache = _randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, seed=seed + 2)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    write_kv_ref(k[keep.to(DEVICE)], v[keep.to(DEVICE)], k_ref, v_ref, slots[keep].to(DEVICE))
    write_kv(k, v, k_cache, v_cache, slots.to(DEVICE))
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


# ---------------------------------------------------------------- decode attention

HEAD_CONFIGS = [(4, 4), (8, 2), (8, 1), (6, 2)]  # GQA ratios 1, 4, 8, 3


# (dtype, block_size): every dtype at block 16, larger blocks in bf16 (fp16 on the interpreter)
DTYPE_BLOCKS = [(dt, 16) for dt in ATTN_DTYPES] + [(ATTN_BF16, 32), (ATTN_BF16, 64)]


# (num_splits, min_partition, max_seq_len): one partition; 3 splits of >= 64 tokens (1 to 3
# used); the heuristic's, sized for a long max_seq_len as in a CUDA graph (many programs find
# no work); the heuristic's with max_seq_len under the real lengths (partitions stretch, still
# exact)
DECODE_SPLITS = [(1, None, 257), (3, 64, 257), (None, None, 16384 if ON_CUDA else 400),
                 (None, None, 64)]


# (dtype, block) x heads x head_dim (x splits): every combination on CUDA; on the interpreter
# (~2 s a case) every pair of values of two of them meets
@pytest.mark.parametrize("dtype,block_size,num_heads,num_kv_heads,head_dim,splits,min_part,"
                         "max_len", [(*db, *heads, d, *sp) for db, heads, d, sp in covering(
                             DTYPE_BLOCKS, HEAD_CONFIGS, [64, 128], DECODE_SPLITS)], ids=str)
def test_decode_attention(dtype, block_size, num_heads, num_kv_heads, head_dim, splits,
                          min_part, max_len):
    bs = block_size
    # the interpreter pays ~5 ms a program: block edges, several blocks and one context past
    # 128 tokens (three 64-token partitions) there; longer ones on CUDA
    lens = ([1, bs - 1, bs, bs + 1, 3 * bs - 1, 3 * bs + 1, 200, 257] if ON_CUDA
            else [1, bs - 1, bs + 1, 3 * bs + 1, 130])
    seed = num_heads * 7 + num_kv_heads * 131 + head_dim + bs
    q, kc, vc, meta = make_batch([(n - 1, 1) for n in lens], num_heads, num_kv_heads, head_dim,
                                 bs, dtype, seed)
    out = _poisoned(q.shape, dtype)
    decode_attention(q, kc, vc, meta.block_tables, meta.seq_lens, 0.125, max_seq_len=max_len,
                     num_splits=splits, min_partition=min_part, out=out)
    assert_attn_close(out, paged_attention_ref(q, kc, vc, meta, 0.125), dtype)


def test_pick_splits():
    from servelm.kernels.decode_attention import pick_splits
    for b in (1, 3, 64, 256, 512):
        for kvh in (1, 8, 32):
            for max_len in (1, 100, 2048, 32768, 131072):
                splits, min_part = pick_splits(b, kvh, max_len)
                assert 1 <= splits <= max(1, -(-max_len // min_part)) and min_part % 64 == 0
    assert pick_splits(1, 8, 32768) == (64, 128)  # small batch: split for parallelism
    assert pick_splits(64, 8, 2048) == (1, 128)  # enough sequences: one pass, no merge


@pytest.mark.parametrize("head_dim", [96, 256])
def test_decode_attention_odd_head_dims(head_dim):
    dtype = ATTN_BF16
    q, kc, vc, meta = make_batch([(n - 1, 1) for n in (5, 17, 40)], 4, 2, head_dim, 16, dtype,
                                 head_dim)
    out = _poisoned(q.shape, dtype)
    decode_attention(q, kc, vc, meta.block_tables, meta.seq_lens, head_dim ** -0.5,
                     max_seq_len=64, num_splits=None if head_dim == 96 else 2, min_partition=32,
                     block_n=32, out=out)
    assert_attn_close(out, paged_attention_ref(q, kc, vc, meta, head_dim ** -0.5), dtype)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_attention_empty_sequences(num_splits):
    """seq_len 0 (CUDA-graph padding rows): zeros, no fault, other rows unaffected."""
    dtype = torch.float16
    q, kc, vc, meta = make_batch([(20, 1), (0, 1), (40, 1)], 8, 2, 64, 16, dtype, 5)
    ref = paged_attention_ref(q, kc, vc, meta, 0.1)
    seq_lens = meta.seq_lens.clone()
    seq_lens[1] = 0
    table = meta.block_tables.clone()
    table[1] = GARBAGE_BLOCK
    out = _poisoned(q.shape, dtype)
    decode_attention(q, kc, vc, table, seq_lens, 0.1, max_seq_len=256, num_splits=num_splits,
                     min_partition=64, out=out)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    assert_attn_close(out[[0, 2]], ref[[0, 2]], dtype)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(32, 8, 128), (32, 32, 128),
                                                              (16, 2, 64), (28, 4, 128)])
def test_decode_attention_long(dtype, num_heads, num_kv_heads, head_dim):
    rng = random.Random(num_heads + head_dim)
    lens = [32768, 32767, 16385, 8191, 4096, 1, 2049] + [rng.randint(1, 20000) for _ in range(25)]
    q, kc, vc, meta = make_batch([(n - 1, 1) for n in lens], num_heads, num_kv_heads, head_dim,
                                 16, dtype, num_heads * num_kv_heads)
    ref = paged_attention_ref(q, kc, vc, meta, head_dim ** -0.5)
    for max_len in (32768, 131072):
        out = _poisoned(q.shape, dtype)
        decode_attention(q, kc, vc, meta.block_tables, meta.seq_lens, head_dim ** -0.5,
                         max_seq_len=max_len, out=out)
        assert_attn_close(out, ref, dtype)


@cuda_only
def test_decode_attention_cuda_graph():
    """Capture once with a fixed max_seq_len; replay with other lengths and block tables."""
    dtype, nh, nkv, d, bs = torch.bfloat16, 32, 8, 128, 16
    batch, max_len = 8, 4096
    q, kc, vc, meta = make_batch([(rng_len - 1, 1) for rng_len in [100] * batch], nh, nkv, d, bs,
                                 dtype, 11)
    kc = torch.randn(batch * max_len // bs + 8, bs, nkv, d, dtype=dtype, device=DEVICE)
    vc = torch.randn_like(kc)
    tables = torch.randperm(kc.shape[0], device=DEVICE)[:batch * max_len // bs].view(batch, -1)
    tables = tables.to(torch.int32).contiguous()
    seq_lens = torch.full((batch,), 100, dtype=torch.int32, device=DEVICE)
    out = torch.empty_like(q)

    def step():
        decode_attention(q, kc, vc, tables, seq_lens, 0.088, max_seq_len=max_len, out=out)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # compile outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for trial in range(3):
        lens = torch.randint(0, max_len + 1, (batch,), generator=_gen(trial))
        lens[0] = max_len
        seq_lens.copy_(lens.to(torch.int32))
        q.copy_(torch.randn(q.shape, generator=_gen(trial + 9)).to(dtype))
        tables.copy_(tables[torch.randperm(batch, device=DEVICE)])
        graph.replay()
        torch.cuda.synchronize()
        m = AttentionMetadata(slot_mapping=meta.slot_mapping,
                              query_start_loc=torch.arange(batch + 1, dtype=torch.int32,
                                                           device=DEVICE),
                              seq_lens=seq_lens, block_tables=tables, max_query_len=1,
                              max_seq_len=max_len)
        live = lens > 0
        ref = paged_attention_ref(q[live.to(DEVICE)], kc, vc, AttentionMetadata(
            slot_mapping=m.slot_mapping, query_start_loc=torch.arange(
                int(live.sum()) + 1, dtype=torch.int32, device=DEVICE),
            seq_lens=seq_lens[live.to(DEVICE)], block_tables=tables[live.to(DEVICE)],
            max_query_len=1, max_seq_len=max_len), 0.088)
        assert torch.isfinite(out).all()
        assert_attn_close(out[live.to(DEVICE)], ref, dtype)


# ---------------------------------------------------------------- prefill / mixed attention

def _mixed_batch(bs: int) -> list[tuple[int, int]]:
    """(cached, new) pairs: fresh prompts, chunks after cached prefixes at and off block
    boundaries, decode rows, a zero-length query."""
    pairs = [(0, 37), (2 * bs - 1, 1), (bs, bs), (5, 64), (100, 3), (0, 1), (bs + 1, 2 * bs - 1),
             (3 * bs, 0), (0, 2 * bs + 1), (60, 1), (7, 130)]
    # the interpreter pays per program: the same kinds of rows, shorter (CUDA: all of them)
    return pairs if ON_CUDA else pairs[:8] + [(60, 1), (7, 70)]


@pytest.mark.parametrize("dtype,block_size,num_heads,num_kv_heads,head_dim", [
    (*db, *heads, d) for db, heads, d in covering(DTYPE_BLOCKS, HEAD_CONFIGS, [64, 128])],
    ids=str)
def test_prefill_attention_mixed(dtype, block_size, num_heads, num_kv_heads, head_dim):
    seed = num_heads * 3 + num_kv_heads * 17 + head_dim * 5 + block_size
    q, kc, vc, meta = make_batch(_mixed_batch(block_size), num_heads, num_kv_heads, head_dim,
                                 block_size, dtype, seed)
    ref = paged_attention_ref(q, kc, vc, meta, head_dim ** -0.5)
    out = _poisoned(q.shape, dtype)
    prefill_attention(q, kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                      head_dim ** -0.5, out=out)
    assert_attn_close(out, ref, dtype)


@pytest.mark.parametrize("head_dim", [96, 256])
def test_prefill_attention_odd_head_dims(head_dim):
    dtype = ATTN_BF16
    q, kc, vc, meta = make_batch([(0, 20), (9, 7), (30, 1)], 4, 2, head_dim, 16, dtype, head_dim)
    out = _poisoned(q.shape, dtype)
    prefill_attention(q, kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                      0.1, out=out)
    assert_attn_close(out, paged_attention_ref(q, kc, vc, meta, 0.1), dtype)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(32, 8, 128), (16, 16, 64),
                                                              (28, 4, 128)])
def test_prefill_attention_long(dtype, num_heads, num_kv_heads, head_dim):
    pairs = [(0, 2048), (0, 4097), (8192, 512), (16383, 1000), (30000, 1), (5, 1), (1023, 2049),
             (0, 1), (31000, 1768)]
    q, kc, vc, meta = make_batch(pairs, num_heads, num_kv_heads, head_dim, 16, dtype, 3)
    ref = paged_attention_ref(q, kc, vc, meta, head_dim ** -0.5)
    out = _poisoned(q.shape, dtype)
    prefill_attention(q, kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                      head_dim ** -0.5, out=out)
    assert_attn_close(out, ref, dtype)


# ---------------------------------------------------------------- backend round trip

@pytest.mark.parametrize("pairs", [[(0, 9), (17, 1), (32, 16)], [(15, 1), (16, 1), (0, 1)]])
def test_triton_backend_matches_reference(pairs):
    from servelm.attention.triton_backend import TritonAttentionBackend
    dtype, nh, nkv, d, bs = ATTN_BF16, 8, 2, 64, 16
    q, kc, vc, meta = make_batch(pairs, nh, nkv, d, bs, dtype, len(pairs) + pairs[0][1])
    k = _randn(q.shape[0], nkv, d, dtype=dtype, seed=77)
    v = _randn(q.shape[0], nkv, d, dtype=dtype, seed=78)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    ref_backend, backend = TorchReferenceBackend(), TritonAttentionBackend()
    ref_backend.write_kv(k, v, kc_ref, vc_ref, meta.slot_mapping)
    backend.write_kv(k, v, kc, vc, meta.slot_mapping)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    out = backend.forward(q, k, v, kc, vc, meta, d ** -0.5)
    assert_attn_close(out, paged_attention_ref(q, kc_ref, vc_ref, meta, d ** -0.5), dtype)


@pytest.mark.parametrize("q_lens", [(512, 700), (600,), (512, 512, 512)])
def test_triton_backend_fresh_prefill_sdpa_path(q_lens, monkeypatch):
    """Steps of only long fresh prompts take SDPA over the step's k, v: same numbers."""
    from servelm.attention import triton_backend
    from servelm.attention.triton_backend import TritonAttentionBackend
    dtype, nh, nkv, d, bs = ATTN_BF16, 8, 2, 64, 16
    backend = TritonAttentionBackend()
    if not ON_CUDA:  # the interpreter writes KV at ~5 ms a token: the same path, 8x shorter
        backend.sdpa_min_len //= 8
        q_lens = tuple(n // 8 for n in q_lens)
    q, kc, vc, meta = make_batch([(0, n) for n in q_lens], nh, nkv, d, bs, dtype, 5)
    k = _randn(q.shape[0], nkv, d, dtype=dtype, seed=15)
    v = _randn(q.shape[0], nkv, d, dtype=dtype, seed=16)
    taken = []
    sdpa = triton_backend._fresh_prefill_sdpa
    monkeypatch.setattr(triton_backend, "_fresh_prefill_sdpa",
                        lambda *a: taken.append(1) or sdpa(*a))
    backend.write_kv(k, v, kc, vc, meta.slot_mapping)
    out = backend.forward(q, k, v, kc, vc, meta, d ** -0.5)
    assert taken, "the step did not take the SDPA path"
    assert_attn_close(out, paged_attention_ref(q, kc, vc, meta, d ** -0.5), dtype)


# ---------------------------------------------------------------- rmsnorm, rotary, silu

ROW_SHAPES = [(1, 64), (7, 1000), (33, 4096)] + ([(4096, 4096), (5, 8192)] if ON_CUDA else [])


def _close(out, ref, dtype):
    """Same formula, different reduction order: within a couple of ulps of the dtype."""
    assert torch.isfinite(out).all()
    tol = {torch.bfloat16: 1.6e-2 if EXACT_BF16 else 5e-2, torch.float16: 2e-3,
           torch.float32: 2e-5}[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_rms_norm(dtype, shape):
    x = _randn(*shape, dtype=dtype, seed=shape[0], scale=3.0)
    w = (1 + _randn(shape[1], dtype=torch.float32, seed=1, scale=0.1)).to(dtype)
    _close(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_fused_add_rms_norm(dtype, shape):
    x = _randn(*shape, dtype=dtype, seed=shape[1], scale=2.0)
    res = _randn(*shape, dtype=dtype, seed=shape[1] + 1, scale=5.0)
    w = (1 + _randn(shape[1], dtype=torch.float32, seed=2, scale=0.1)).to(dtype)
    x_copy, res_copy = x.clone(), res.clone()
    normed, new_res = fused_add_rms_norm(x, res, w, 1e-5)
    normed_ref, res_ref = fused_add_rms_norm_ref(x, res, w, 1e-5)
    if EXACT_BF16 or dtype != torch.bfloat16:
        assert torch.equal(new_res, res_ref)  # one rounding of the same fp32 sum
    _close(new_res, res_ref, dtype)
    _close(normed, normed_ref, dtype)
    assert torch.equal(x, x_copy) and torch.equal(res, res_copy)


def _cos_sin_cache(max_pos: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], -1).to(DEVICE)  # [max_pos, D]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,num_heads,num_kv_heads,head_dim",
                         [(1, 4, 4, 64), (13, 8, 2, 128), (40, 6, 1, 96), (64, 32, 8, 128)])
def test_rotary_embedding(dtype, num_tokens, num_heads, num_kv_heads, head_dim):
    cache = _cos_sin_cache(4096, head_dim)
    positions = torch.randint(0, 4096, (num_tokens,), generator=_gen(num_tokens)).to(DEVICE)
    # q, k: strided views into a fused qkv tensor, as the model produces them
    qkv = _randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, seed=3)
    q = qkv[:, :num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim].view(
        num_tokens, num_kv_heads, head_dim)
    q_ref, k_ref = q.clone(), k.clone()
    v_before = qkv[:, (num_heads + num_kv_heads) * head_dim:].clone()
    rotary_embedding_ref(positions, q_ref, k_ref, cache)
    rotary_embedding(positions, q, k, cache)
    # the same roundings as the reference (HF's): equal up to fp32 contraction in fp32 runs
    _close(q, q_ref, dtype)
    _close(k, k_ref, dtype)
    if dtype == torch.float16 or (dtype == torch.bfloat16 and EXACT_BF16):
        assert (q != q_ref).float().mean() < 0.01 and (k != k_ref).float().mean() < 0.01
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim:], v_before)


def test_rotary_matches_fp32_math():
    """bf16 result stays within bf16 rounding of the exact fp32 rotation."""
    dtype, t, h, d = torch.bfloat16, 50, 8, 128
    cache = _cos_sin_cache(8192, d)
    positions = torch.randint(0, 8192, (t,), generator=_gen(0)).to(DEVICE)
    q = _randn(t, h, d, dtype=dtype, seed=4)
    k = _randn(t, 2, d, dtype=dtype, seed=5)
    q32, k32 = q.float(), k.float()
    rotary_embedding_ref(positions, q32, k32, cache)
    rotary_embedding(positions, q, k, cache)
    torch.testing.assert_close(q.float(), q32, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(k.float(), k32, atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (9, 1000), (17, 2 * 1536)]
                         + ([(2048, 2 * 14336)] if ON_CUDA else []))
def test_silu_and_mul(dtype, shape):
    x = _randn(*shape, dtype=dtype, seed=shape[0], scale=3.0)
    _close(silu_and_mul(x), silu_and_mul_ref(x), dtype)
