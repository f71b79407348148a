"""Every LinearMethod under tensor parallelism, ranks simulated in one process (a ParallelGroup
with no process group; row-parallel partial outputs summed by hand instead of the all-reduce).

Each rank's layer loads the same full random checkpoint tensors (dense, GPTQ/AWQ packed here,
GGUF blocks) and must hold exactly its slice of the world-size-1 layer's dequantized weights
(read back through ``apply`` on an identity matrix, bit for bit); column-parallel outputs
concatenated per part, and row-parallel partial outputs summed (+ the bias once), equal the
world-size-1 output within fp32 rounding. Splits a layout cannot make are ValueErrors naming
the layer and the tensor_parallel_size that would fit."""
from __future__ import annotations

import pytest
import torch

from servelm.distributed import ParallelGroup
from servelm.layers.linear import Linear, process_weights_after_loading
from servelm.quantization import QuantConfig
from servelm.quantization.gguf import GGUFWeight
from servelm.quantization.gguf_formats import random_gguf_blocks
from servelm.quantization.gptq import AWQ_ORDER
from servelm.quantization.ref import pack_int4

Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K = 2, 3, 8, 12, 13, 14
QKV = [48, 24, 24]  # q | k | v: at 4 ranks q splits into 12 rows, not whole int32 words of 8
COLUMN_K, ROW_K, ROW_N = 256, 1024, 48
PREFIX = "layers.0.attn.proj"

# name -> (QuantConfig or None, checkpoint kind, ggml types per part (gguf), layer dtype)
METHODS = {
    "none-fp32": (None, "dense", None, torch.float32),
    "none-bf16": (None, "dense", None, torch.bfloat16),
    "fp8": (QuantConfig("fp8"), "dense", None, torch.float32),
    "int8": (QuantConfig("int8", group_size=64), "dense", None, torch.float32),
    "int8-row": (QuantConfig("int8", group_size=-1), "dense", None, torch.float32),
    "int4": (QuantConfig("int4", group_size=64), "dense", None, torch.float32),
    "int4-row": (QuantConfig("int4", group_size=-1), "dense", None, torch.float32),
    "gptq": (QuantConfig("gptq", 64, prequantized=True, zero_offset=1), "gptq", None,
             torch.float32),
    "gptq-row": (QuantConfig("gptq", -1, prequantized=True), "gptq", None, torch.float32),
    # act-order whose groups stay inside each quarter of the input (so inside every rank's
    # slice at 2 and 4 ranks): row-parallel loads it; a permutation over all columns is refused
    "gptq-act-order": (QuantConfig("gptq", 64, prequantized=True, desc_act=True), "gptq-act",
                       None, torch.float32),
    "awq": (QuantConfig("awq", 64, prequantized=True), "awq", None, torch.float32),
    "gguf-q4_0": (QuantConfig("gguf"), "gguf", (Q4_0,), torch.float32),
    "gguf-q4_1": (QuantConfig("gguf"), "gguf", (Q4_1,), torch.float32),
    "gguf-q8_0": (QuantConfig("gguf"), "gguf", (Q8_0,), torch.float32),
    "gguf-q4_k": (QuantConfig("gguf"), "gguf", (Q4_K,), torch.float32),
    "gguf-q5_k": (QuantConfig("gguf"), "gguf", (Q5_K,), torch.float32),
    "gguf-q6_k": (QuantConfig("gguf"), "gguf", (Q6_K,), torch.float32),
    # Q4_K_M keeps v in Q6_K; a part the file stores as F32 arrives dense (None)
    "gguf-mixed": (QuantConfig("gguf"), "gguf", (Q4_K, Q4_K, Q6_K), torch.float32),
    "gguf-dense-part": (QuantConfig("gguf"), "gguf", (Q8_0, Q8_0, None), torch.float32),
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pack_cols(q: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """q [R, C] in 0..15 -> int32 [R, C // 8]; nibble i of value c holds column c * 8 + order[i]
    (GPTQ's qzeros: order 0..7; AWQ's qweight and qzeros: 0, 2, 4, 6, 1, 3, 5, 7)."""
    R, C = q.shape
    q = q.to(torch.int64).reshape(R, C // 8, 8)[:, :, list(order)]
    packed = sum(q[:, :, i] << (4 * i) for i in range(8))
    return (packed - (packed >= 2**31).to(torch.int64) * 2**32).to(torch.int32)


def _act_order_perm(k: int, chunks: int, g: torch.Generator) -> torch.Tensor:
    """A permutation of k input columns that keeps each of ``chunks`` equal slices in place."""
    c = k // chunks
    return torch.cat([torch.randperm(c, generator=g) + i * c for i in range(chunks)])


def _checkpoint(name: str, k: int, parts: list[int], bias: bool, seed: int,
                act_order_chunks: int = 4) -> list[dict]:
    """Per part, the full checkpoint tensors of method ``name`` (random, never zeros)."""
    qc, kind, types, _ = METHODS[name]
    g = _gen(seed)
    group = k if qc is None or qc.group_size == -1 else qc.group_size
    perm = _act_order_perm(k, act_order_chunks, g) if kind == "gptq-act" else None
    out = []
    for i, n in enumerate(parts):
        if kind == "dense":
            t = {"weight": torch.randn(n, k, generator=g) * 0.1}
        elif kind == "gguf":
            ggml = types[i % len(types)]
            t = {"weight": torch.randn(n, k, generator=g) * 0.1 if ggml is None else
                 GGUFWeight(random_gguf_blocks(n, k, ggml, g), ggml, (n, k))}
        else:
            groups = -(-k // group)
            q = torch.randint(0, 16, (k, n), generator=g, dtype=torch.int32)
            z = torch.randint(1, 16, (groups, n), generator=g, dtype=torch.int32)
            s = (torch.rand(groups, n, generator=g) * 0.02 + 0.005).half()
            if kind == "awq":
                t = {"qweight": _pack_cols(q, AWQ_ORDER), "qzeros": _pack_cols(z, AWQ_ORDER)}
            else:
                g_idx = torch.arange(k, dtype=torch.int32) // group
                if perm is not None:
                    g_idx[perm] = g_idx.clone()  # column perm[j] is in group j // G
                t = {"qweight": pack_int4(q), "qzeros": _pack_cols(z - qc.zero_offset),
                     "g_idx": g_idx}
            t["scales"] = s
        if bias:
            t["bias"] = torch.randn(n, generator=g)
        out.append(t)
    return out


def _layer(name: str, k: int, parts: list[int], bias: bool, ckpt: list[dict], ws: int = 1,
           rank: int = 0, parallel: str = "replicated", part_shards=None) -> Linear:
    qc, _, _, dtype = METHODS[name]
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        lin = Linear(k, parts, bias, quantization=qc, prefix=PREFIX,
                     tp=ParallelGroup(rank, ws), parallel=parallel, part_shards=part_shards)
    finally:
        torch.set_default_dtype(prev)
    for i, tensors in enumerate(ckpt):
        for tname, t in tensors.items():
            lin.load_weight(tname, t, i)
    process_weights_after_loading(lin)
    return lin


def _weights(lin: Linear, dtype: torch.dtype) -> torch.Tensor:
    """The layer's dequantized weights as its matmul sees them, [N_rank, K_rank] fp32:
    apply() on identity rows (each output one weight times 1, exact), padded past the CPU's
    small-M GEMV so every layer takes the same dequantize-then-matmul path (the C kernels'
    64-row limit held, as on AVX-512: with AVX2 they take every M, decoding each weight as
    d * q + m in one rounding rather than the reference's (q - z) * s)."""
    from unittest import mock

    from servelm.cpu import ops
    k = lin.input_size_per_rank
    x = torch.cat([torch.eye(k), torch.zeros(max(0, 65 - k), k)]).to(dtype)
    with mock.patch.object(ops, "native_max_m", lambda: ops.NATIVE_MAX_M):
        return lin.method.apply(lin, x)[:k].t().float()


def _close(y: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
           loose: float = 0.0) -> None:
    """y within rounding of ref: fp32 sums of K terms (K * 2^-24 of the terms' magnitude),
    bf16 outputs (partials and sum rounded: 2^-6), and ``loose`` (fp8: activations quantized
    per rank's slice)."""
    mag = x.float().abs() @ w.abs().t()
    rel = x.shape[1] * 2.0 ** -24 + (2.0 ** -6 if y.dtype == torch.bfloat16 else 0.0) + loose
    err = (y.float() - ref.float()).abs()
    assert (err <= mag * rel + 1e-6).all(), err.max()


def _storages(ckpt: list[dict]) -> set[int]:
    return {(t.raw if isinstance(t, GGUFWeight) else t).untyped_storage().data_ptr()
            for part in ckpt for t in part.values()}


def _run(name: str, ws: int, parallel: str, part_shards=None) -> None:
    dtype = METHODS[name][3]
    column = parallel == "column"
    k, parts = (COLUMN_K, QKV) if column else (ROW_K, [ROW_N])
    # act-order: a permutation over every column (column-parallel keeps them all), or within
    # each quarter (whole groups on each rank of a row-parallel layer)
    ckpt = _checkpoint(name, k, parts, bias=True, seed=ws + 7 * len(name),
                       act_order_chunks=1 if column else 4)
    ref = _layer(name, k, parts, True, ckpt)
    w_ref = _weights(ref, dtype)
    x = torch.randn(5, k, generator=_gen(99)).to(dtype)
    y_ref = ref(x)
    full_offsets = [sum(parts[:i]) for i in range(len(parts) + 1)]
    total, bias = torch.zeros(5, ROW_N), None
    for rank in range(ws):
        lin = _layer(name, k, parts, True, ckpt, ws, rank, parallel, part_shards)
        w = _weights(lin, dtype)
        if column:
            y = lin(x)  # column-parallel: no communication, the output stays split
            for i in range(len(parts)):
                lo, hi = lin.part_range(i)
                r0, r1 = lin.row_shard(i)
                rows = slice(full_offsets[i] + r0, full_offsets[i] + r1)
                assert torch.equal(w[lo:hi], w_ref[rows]), (rank, i)
                _close(y[:, lo:hi], y_ref[:, rows], x, w_ref[rows])
        else:
            c0, c1 = lin.input_start, lin.input_start + lin.input_size_per_rank
            assert torch.equal(w, w_ref[:, c0:c1]), rank
            total += lin.method.apply(lin, x[:, c0:c1]).float()  # the all-reduce, by hand
            bias = lin.bias.float()
        if METHODS[name][1] == "gguf":  # a shard is a copy: the file's tensors can be freed
            held = {t.untyped_storage().data_ptr() for t in [*lin.parameters(), *lin.buffers()]}
            assert not held & _storages(ckpt)
    if not column:
        y = (total + bias).to(dtype)  # the bias once, after the sum
        _close(y, y_ref, x, w_ref, loose=2.0 ** -3 if name == "fp8" else 0.0)


@pytest.mark.parametrize("ws", [2, 4])
@pytest.mark.parametrize("name", list(METHODS))
def test_column_parallel(name, ws):
    _run(name, ws, "column")


@pytest.mark.parametrize("name", list(METHODS))
def test_column_parallel_shared_kv_shards(name):
    """4 ranks, k and v split in 2: ranks 0-1 and 2-3 hold the same k and v rows."""
    _run(name, 4, "column", part_shards=[4, 2, 2])


@pytest.mark.parametrize("ws", [2, 4])
@pytest.mark.parametrize("name", list(METHODS))
def test_row_parallel(name, ws):
    if len(METHODS[name][2] or ()) > 1:
        pytest.skip("mixed part types are a merged (column-parallel) layer's")
    _run(name, ws, "row")


# ---- splits a layout cannot make -------------------------------------------------------------
@pytest.mark.parametrize("name,ggml,k,ws,match", [
    ("gguf-q4_k", Q4_K, 512, 4, r"Q4_K blocks \(256 input values each\).*512 / 4 ranks = 128 "
                                r"columns per rank, not a multiple of 256\. Use "
                                r"tensor_parallel_size 1 or 2 "),
    ("gguf-q6_k", Q6_K, 768, 2, r"tensor_parallel_size 1 or 3 "),
    ("gguf-q4_0", Q4_0, 96, 2, r"Q4_0 blocks \(32 input values each\).*Use "
                               r"tensor_parallel_size 1 or 3 "),
])
def test_gguf_row_split_inside_a_block_is_refused(name, ggml, k, ws, match):
    w = GGUFWeight(random_gguf_blocks(16, k, ggml, _gen(1)), ggml, (16, k))
    for rank in range(ws):  # every rank refuses, not only those whose slice starts mid-block
        lin = Linear(k, 16, quantization=QuantConfig("gguf"), prefix=PREFIX,
                     tp=ParallelGroup(rank, ws), parallel="row")
        with pytest.raises(ValueError, match=PREFIX + ".*" + match):
            lin.load_weight("weight", w)


@pytest.mark.parametrize("method,group,k,ws,match", [
    ("int4", 128, 384, 2, r"int4 with groups of 128 input columns.*384 / 2 ranks = 192 .*"
                          r"tensor_parallel_size 1 or 3 "),
    ("int8", 64, 320, 4, r"int8 with groups of 64 .*tensor_parallel_size 1 or 5 "),
    ("gptq", 64, 192, 2, r"gptq with groups of 64 .*tensor_parallel_size 1 or 3 "),
    ("awq", -1, 136, 2, r"awq \(8 input columns packed per int32\).*68 columns per rank.*"
                        r"tensor_parallel_size 1 "),
])
def test_row_split_inside_a_group_or_word_is_refused(method, group, k, ws, match):
    qc = QuantConfig(method, group, prequantized=method in ("gptq", "awq"))
    for rank in range(ws):
        with pytest.raises(ValueError, match=PREFIX + ".*" + match):
            Linear(k, 16, quantization=qc, prefix=PREFIX, tp=ParallelGroup(rank, ws),
                   parallel="row")


def test_act_order_across_ranks_is_refused_under_row_parallel():
    """g_idx scattering groups over the whole input: no rank holds whole groups (the same
    checkpoint loads column-parallel: test_column_parallel's act-order case)."""
    ckpt = _checkpoint("gptq-act-order", ROW_K, [ROW_N], bias=False, seed=3, act_order_chunks=1)
    qc = METHODS["gptq-act-order"][0]
    for rank in range(2):
        lin = Linear(ROW_K, ROW_N, quantization=qc, prefix=PREFIX, tp=ParallelGroup(rank, 2),
                     parallel="row")
        with pytest.raises(ValueError, match=PREFIX + ".*act-order.*tensor_parallel_size 1"):
            lin.load_weight("g_idx", ckpt[0]["g_idx"])
