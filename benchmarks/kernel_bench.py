"""Times servelm's Triton kernels against torch alternatives on one GPU, Llama-3-8B shapes
(32 q heads / 8 kv heads, head dim 128, hidden 4096, intermediate 14336, KV block 16, bf16).

    PYTHONPATH=. python benchmarks/kernel_bench.py [--sweep] [--sweep-decode] [--no-compile]
                                                   [--quick] [--fused-only]

Medians of ``triton.testing.do_bench``; decode attention and the row kernels are timed as CUDA
graph replays (``do_bench_cudagraph``), as they run in the engine, so launch overhead does not
hide the kernel. Prints a table last; writes JSON to $OUT/kernel_bench.json when OUT is set.

``--fused-only`` runs just the fused-vs-unfused decode comparison (group "fused"): SiLU-and-mul +
down projection vs the GEMV with the activation in its prologue, rotary + KV write vs the fused
kernel, and one whole Llama-3-8B decoder layer (the model's own modules) with and without both
fusions, each as graph replays at batch 1 and 8.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from servelm.attention.backend import AttentionMetadata  # noqa: E402
from servelm.attention.torch_ref import write_kv_ref  # noqa: E402
from servelm.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from servelm.kernels.activation import silu_and_mul, silu_and_mul_ref  # noqa: E402
from servelm.kernels.decode_attention import decode_attention  # noqa: E402
from servelm.kernels.gemv import linear_small_m  # noqa: E402
from servelm.kernels.kv_write import write_kv  # noqa: E402
from servelm.kernels.prefill_attention import prefill_attention  # noqa: E402
from servelm.kernels.rmsnorm import (  # noqa: E402
    fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref)
from servelm.kernels.rotary import rotary_embedding, rotary_embedding_ref  # noqa: E402
from servelm.kernels.rotary_kv import rotary_write_kv  # noqa: E402

DEV = "cuda"
DT = torch.bfloat16
H, KVH, D, BS, HIDDEN, INTER = 32, 8, 128, 16, 4096, 14336
HBM_TBS = 3.0  # measured device-to-device copy bandwidth (bytes read + written), TB/s
ROWS: list[dict] = []


def record(group, shape, impl, ms, metric=None, value=None, note=""):
    row = dict(group=group, shape=shape, impl=impl, ms=ms, metric=metric, value=value, note=note)
    ROWS.append(row)
    val = "" if value is None else f"{value:8.1f} {metric}"
    print(f"  {group:10s} {shape:34s} {impl:26s} {ms * 1e3:10.1f} us {val} {note}", flush=True)


def timed(fn, graph=False):
    """Median ms (CUDA-graph replay when graph=True, falling back to plain launches if capture
    fails); None when the implementation fails here (printed)."""
    try:
        fn()
        torch.cuda.synchronize()
    except Exception as e:  # an alternative missing or failing on this torch
        print(f"    ! {type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}",
              flush=True)
        torch.cuda.synchronize()
        return None
    if graph:
        try:
            return do_bench_cudagraph(fn, rep=50, return_mode="median")
        except Exception as e:
            print(f"    ! graph capture failed ({type(e).__name__}); timing eager", flush=True)
            torch.cuda.synchronize()
    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def _varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
        return varlen_attn, set(inspect.signature(varlen_attn).parameters)
    except Exception:
        return None, set()


def make_paged(seq_lens, pool_tokens_cap=1 << 20, seed=0):
    """Random caches and block tables; the physical pool is capped (tables then repeat blocks,
    still ~never in L2 at 50 MB): reads are counted from the logical lengths."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    need = [math.ceil(n / BS) for n in seq_lens]
    num_blocks = min(sum(need), pool_tokens_cap // BS) + 1
    kc = torch.randn(num_blocks, BS, KVH, D, device=DEV, dtype=DT, generator=g)
    vc = torch.randn(num_blocks, BS, KVH, D, device=DEV, dtype=DT, generator=g)
    max_blocks = max(need)
    if sum(need) < num_blocks:
        perm = torch.randperm(num_blocks, device=DEV, generator=g)
        tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32, device=DEV)
        i = 0
        for s, n in enumerate(need):
            tables[s, :n] = perm[i:i + n].to(torch.int32)
            i += n
    else:
        tables = torch.randint(0, num_blocks, (len(seq_lens), max_blocks), device=DEV,
                               dtype=torch.int32, generator=g)
    return kc, vc, tables


# ------------------------------------------------------------------ decode

def _rotating(make_set, set_bytes, min_bytes=256 << 20, max_sets=64):
    """Input sets whose total exceeds L2 (50 MB) many times over, and a counter to cycle them:
    a graph captured over several calls then reads cold KV, as decode does."""
    sets = [make_set(i) for i in range(min(max_sets, max(1, math.ceil(min_bytes / set_bytes))))]
    state = [0]

    def next_set():
        state[0] += 1
        return sets[state[0] % len(sets)]
    return next_set


def bench_decode(batches, ctxs, max_model_len=32768):
    varlen_attn, vparams = _varlen()
    for b in batches:
        for ctx in ctxs:
            shape = f"B={b} ctx={ctx}"
            seq_lens = torch.full((b,), ctx, dtype=torch.int32, device=DEV)
            gb = b * ctx * KVH * D * 2 * 2 / 1e9  # K and V bytes read
            nxt = _rotating(lambda i: (*make_paged([ctx] * b, seed=i),
                                       torch.randn(b, H, D, device=DEV, dtype=DT)), gb * 1e9)

            def bw(ms):
                return None if ms is None else gb / (ms * 1e-3) / 1e3  # TB/s

            def tri(max_len):
                kc, vc, tables, q = nxt()
                return decode_attention(q, kc, vc, tables, seq_lens, D ** -0.5, max_len)
            ms = timed(lambda: tri(ctx), graph=True)
            record("decode", shape, "triton (eager sizing)", ms, "TB/s", bw(ms),
                   f"{100 * bw(ms) / HBM_TBS:.0f}% of {HBM_TBS} TB/s" if ms else "")
            ms = timed(lambda: tri(max_model_len), graph=True)
            record("decode", shape, f"triton (graph, max {max_model_len // 1024}k)", ms, "TB/s",
                   bw(ms))
            if varlen_attn is not None and "block_table" in vparams:
                cu_q = torch.arange(b + 1, dtype=torch.int32, device=DEV)
                kw = dict(seqused_k=seq_lens, scale=D ** -0.5, window_size=(-1, 0))
                if "enable_gqa" in vparams:
                    kw["enable_gqa"] = True

                def paged_varlen():
                    kc, vc, tables, q = nxt()
                    return varlen_attn(q, kc, vc, cu_q, None, 1, ctx, block_table=tables, **kw)
                ms = timed(paged_varlen, graph=True)
                record("decode", shape, "torch varlen_attn paged", ms, "TB/s", bw(ms))
            if b * ctx <= (1 << 19):
                nb = math.ceil(ctx / BS)

                def gather_sdpa():
                    kc, vc, tables, q = nxt()
                    k = kc[tables[:, :nb]].view(b, nb * BS, KVH, D)[:, :ctx].transpose(1, 2)
                    v = vc[tables[:, :nb]].view(b, nb * BS, KVH, D)[:, :ctx].transpose(1, 2)
                    return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)
                ms = timed(gather_sdpa, graph=True)
                record("decode", shape, "torch gather+SDPA", ms, "TB/s", bw(ms))
            del nxt
            torch.cuda.empty_cache()


def sweep_decode():
    print("decode sweep (block_n, num_warps, num_stages, num_splits, min_partition)")
    for b, ctx in ((1, 8192), (1, 32768), (64, 2048), (64, 8192), (256, 2048)):
        seq_lens = torch.full((b,), ctx, dtype=torch.int32, device=DEV)
        gb = b * ctx * KVH * D * 4 / 1e9
        nxt = _rotating(lambda i: (*make_paged([ctx] * b, seed=i),
                                   torch.randn(b, H, D, device=DEV, dtype=DT)), gb * 1e9)
        for bn, w, st, splits, min_part in (
                (64, 4, 2, None, None), (32, 4, 2, None, None), (64, 4, 3, None, None),
                (128, 4, 2, None, None), (64, 4, 2, None, 256), (64, 4, 2, 1, None),
                (64, 4, 2, 4, None), (64, 4, 2, 16, None), (64, 4, 2, 64, None)):
            def run():
                kc, vc, tables, q = nxt()
                return decode_attention(q, kc, vc, tables, seq_lens, D ** -0.5, ctx,
                                        num_splits=splits, min_partition=min_part, block_n=bn,
                                        num_warps=w, num_stages=st)
            ms = timed(run, graph=True)
            if ms:
                record("dec-sweep", f"B={b} ctx={ctx}",
                       f"bn{bn} w{w} s{st} sp{splits} mp{min_part}", ms, "TB/s",
                       gb / (ms * 1e-3) / 1e3)
        del nxt
        torch.cuda.empty_cache()


# ------------------------------------------------------------------ prefill

def _prefill_case(pairs, seed=1):
    """pairs: (cached, new) per sequence. Returns q, k/v of the new tokens, paged caches..."""
    seq_lens = [c + n for c, n in pairs]
    kc, vc, tables = make_paged(seq_lens, pool_tokens_cap=1 << 30, seed=seed)
    q_lens = [n for _, n in pairs]
    qsl = torch.tensor([0] + q_lens, device=DEV).cumsum(0).to(torch.int32)
    q = torch.randn(sum(q_lens), H, D, device=DEV, dtype=DT)
    flops = 4 * D * H * sum(sum(range(c + 1, c + n + 1)) for c, n in pairs)
    return q, kc, vc, tables, torch.tensor(seq_lens, dtype=torch.int32, device=DEV), qsl, flops


def bench_prefill(configs=None):
    varlen_attn, vparams = _varlen()
    cases = {
        "16x2048 fresh": [(0, 2048)] * 16,
        "1x8192 fresh": [(0, 8192)],
        "4x512 chunk@4k + 64 dec@2k": [(4096, 512)] * 4 + [(2047, 1)] * 64,
        "2048 chunk@30k": [(30720, 2048)],
        "256 dec@2k (mixed path)": [(2047, 1)] * 256,
    }
    for name, pairs in cases.items():
        q, kc, vc, tables, seq_lens, qsl, flops = _prefill_case(pairs)

        def tf(ms):
            return None if ms is None else flops / (ms * 1e-3) / 1e12
        for cfg in (configs or [None]):
            ms = timed(lambda: prefill_attention(q, kc, vc, tables, seq_lens, qsl, D ** -0.5,
                                                 config=cfg))
            record("prefill", name, "triton paged" + (f" {cfg}" if cfg else ""), ms, "TFLOP/s",
                   tf(ms))
        fresh = all(c == 0 for c, _ in pairs)
        n_q = max(n for _, n in pairs)
        meta = AttentionMetadata(
            slot_mapping=torch.zeros(q.shape[0], dtype=torch.int64, device=DEV),
            query_start_loc=qsl, seq_lens=seq_lens, block_tables=tables, max_query_len=n_q,
            max_seq_len=max(c + n for c, n in pairs), query_lens_cpu=tuple(n for _, n in pairs),
            seq_lens_cpu=tuple(c + n for c, n in pairs))
        k_new = torch.randn(q.shape[0], KVH, D, device=DEV, dtype=DT)
        v_new = torch.randn_like(k_new)
        backend = TritonAttentionBackend()
        ms = timed(lambda: backend.forward(q, k_new, v_new, kc, vc, meta, D ** -0.5))
        record("prefill", name, "backend dispatch", ms, "TFLOP/s", tf(ms),
               "SDPA per seq" if fresh and n_q >= backend.sdpa_min_len
               and len(pairs) <= backend.sdpa_max_seqs else "triton paged")
        max_k = max(c + n for c, n in pairs)
        if varlen_attn is not None:
            gqa = {"enable_gqa": True} if "enable_gqa" in vparams else {}
            if fresh:
                k = torch.randn(q.shape[0], KVH, D, device=DEV, dtype=DT)
                v = torch.randn_like(k)
                ms = timed(lambda: varlen_attn(q, k, v, qsl, qsl, n_q, n_q, scale=D ** -0.5,
                                               window_size=(-1, 0), **gqa))
                record("prefill", name, "torch varlen_attn dense", ms, "TFLOP/s", tf(ms))
            if "block_table" in vparams:
                ms = timed(lambda: varlen_attn(q, kc, vc, qsl, None, n_q, max_k,
                                               seqused_k=seq_lens, block_table=tables,
                                               scale=D ** -0.5, window_size=(-1, 0), **gqa))
                record("prefill", name, "torch varlen_attn paged", ms, "TFLOP/s", tf(ms))
        if fresh and len(set(pairs)) == 1:
            b, n = len(pairs), pairs[0][1]
            qd = torch.randn(b, H, n, D, device=DEV, dtype=DT)
            kd = torch.randn(b, KVH, n, D, device=DEV, dtype=DT)
            vd = torch.randn_like(kd)
            ms = timed(lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True,
                                                              enable_gqa=True))
            record("prefill", name, "torch SDPA dense", ms, "TFLOP/s", tf(ms))
        del kc, vc


# ------------------------------------------------------------------ write_kv and row kernels

def bench_write_kv():
    for t in (256, 4096):
        kc = torch.randn(8192, BS, KVH, D, device=DEV, dtype=DT)
        vc = torch.randn_like(kc)
        qkv = torch.randn(t, (H + 2 * KVH) * D, device=DEV, dtype=DT)
        k = qkv[:, H * D:(H + KVH) * D].view(t, KVH, D)
        v = qkv[:, (H + KVH) * D:].view(t, KVH, D)
        slots = torch.randperm(8192 * BS, device=DEV)[:t]
        gb = 2 * 2 * t * KVH * D * 2 / 1e9
        for impl, fn in (("triton", lambda: write_kv(k, v, kc, vc, slots)),
                         ("torch index_copy_", lambda: write_kv_ref(k, v, kc, vc, slots))):
            ms = timed(fn, graph=True)
            record("write_kv", f"T={t}", impl, ms, "GB/s", ms and gb / (ms * 1e-3))


def bench_rows(compile_too=True):
    """Each kernel vs its torch reference, eager and torch.compile'd (dynamic shapes: one
    compile per kernel, shared by T=256 and T=4096; T=1 runs eager only)."""
    refs = dict(rms=rms_norm_ref, addrms=fused_add_rms_norm_ref, rope=rotary_embedding_ref,
                silu=silu_and_mul_ref)
    compiled = {k: torch.compile(f, dynamic=True) for k, f in refs.items()} if compile_too else {}

    def run(group, shape, key, args, triton_fn, gb):
        impls = [("triton", lambda: triton_fn(*args)), ("torch eager", lambda: refs[key](*args))]
        if key in compiled and shape.split()[0] != "T=1":
            impls.append(("torch.compile", lambda: compiled[key](*args)))
        for impl, fn in impls:
            ms = timed(fn, graph=True)
            record(group, shape, impl, ms, "GB/s", ms and gb / (ms * 1e-3))

    for t in (1, 256, 4096):
        x = torch.randn(t, HIDDEN, device=DEV, dtype=DT)
        res = torch.randn_like(x)
        w = torch.randn(HIDDEN, device=DEV, dtype=DT)
        gb = 2 * t * HIDDEN * 2 / 1e9
        run("rms_norm", f"T={t} H={HIDDEN}", "rms", (x, w, 1e-5), rms_norm, gb)
        run("add+rms", f"T={t} H={HIDDEN}", "addrms", (x, res, w, 1e-5), fused_add_rms_norm,
            2 * gb)
        qkv = torch.randn(t, (H + 2 * KVH) * D, device=DEV, dtype=DT)
        q = qkv[:, :H * D].view(t, H, D)
        k = qkv[:, H * D:(H + KVH) * D].view(t, KVH, D)
        pos = torch.randint(0, 8192, (t,), device=DEV)
        inv = 1.0 / 500000.0 ** (torch.arange(0, D, 2, device=DEV, dtype=torch.float32) / D)
        fr = torch.arange(8192, device=DEV, dtype=torch.float32)[:, None] * inv[None]
        cache = torch.cat([fr.cos(), fr.sin()], -1)
        run("rotary", f"T={t} {H}/{KVH}x{D}", "rope", (pos, q, k, cache), rotary_embedding,
            2 * t * (H + KVH) * D * 2 / 1e9)
        xs = torch.randn(t, 2 * INTER, device=DEV, dtype=DT)
        run("silu_mul", f"T={t} I={INTER}", "silu", (xs,), silu_and_mul, 3 * t * INTER * 2 / 1e9)


# ------------------------------------------------------------------ fused decode kernels

@contextlib.contextmanager
def _unfused_seams():
    """The model's seams without the decode fusions (their ABC defaults), for the duration."""
    from servelm.attention.backend import AttentionBackend
    from servelm.quantization.base import LinearMethod
    from servelm.quantization.unquantized import UnquantizedLinearMethod
    lin, att = UnquantizedLinearMethod, TritonAttentionBackend
    saved = (lin.apply_silu_mul, att.rotate_and_write_kv)
    lin.apply_silu_mul = LinearMethod.apply_silu_mul
    att.rotate_and_write_kv = AttentionBackend.rotate_and_write_kv
    try:
        yield
    finally:
        lin.apply_silu_mul, att.rotate_and_write_kv = saved


def _decoder_layer(ctx: int, batch: int, num_blocks: int):
    """One Llama-3-8B decoder layer on the kernel path (random weights), its KV cache and a
    decode step's inputs: batch sequences of ctx tokens each, blocks scattered."""
    from servelm.layers.rotary import RotaryEmbedding
    from servelm.loader import initialize_dummy_weights
    from servelm.models.llama import LayerOptions, LlamaArgs, LlamaDecoderLayer
    a = LlamaArgs(hidden_size=HIDDEN, intermediate_size=INTER, num_layers=1, num_heads=H,
                  num_kv_heads=KVH, head_dim=D, vocab_size=128256, rms_norm_eps=1e-5,
                  max_position=8192, rope_theta=500000.0, rope_scaling={"rope_type": "default"},
                  qkv_bias=False, qk_norm=False, tie_word_embeddings=False)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(DT)
    try:
        with torch.device(DEV):
            layer = LlamaDecoderLayer(a, LayerOptions(TritonAttentionBackend(), True), "layers.0")
    finally:
        torch.set_default_dtype(prev)
    for m in layer.modules():
        if isinstance(m, RotaryEmbedding):
            m.cos_sin_cache = m.cos_sin_cache.float()  # as the runner keeps it
    initialize_dummy_weights(layer, seed=0)
    layer.eval()
    kc = torch.randn(num_blocks, BS, KVH, D, device=DEV, dtype=DT)
    vc = torch.randn_like(kc)
    nb = math.ceil(ctx / BS)
    tables = torch.randperm(num_blocks, device=DEV)[:batch * nb].view(batch, nb).to(torch.int32)
    pos = torch.full((batch,), ctx - 1, dtype=torch.int64, device=DEV)
    slots = (tables[:, -1].long() * BS + (ctx - 1) % BS)
    meta = AttentionMetadata(
        slot_mapping=slots, query_start_loc=torch.arange(batch + 1, dtype=torch.int32,
                                                         device=DEV),
        seq_lens=torch.full((batch,), ctx, dtype=torch.int32, device=DEV), block_tables=tables,
        max_query_len=1, max_seq_len=ctx)
    x = torch.randn(batch, HIDDEN, device=DEV, dtype=DT)
    res = torch.randn_like(x)
    return layer, (kc, vc), (pos, x, res, meta)


def bench_fused(batches=(1, 8), ctx=1024, num_layers=32):
    """Fused vs unfused decode kernels, CUDA-graph replays (the decode step is one graph).
    Weights stream from HBM (one layer's 436 MB >> 50 MB of L2), as in a decode step."""
    wd = torch.randn(HIDDEN, INTER, device=DEV, dtype=DT) * INTER ** -0.5
    down_gb = HIDDEN * INTER * 2 / 1e9
    num_blocks = 8192
    for m in batches:
        gu = torch.randn(m, 2 * INTER, device=DEV, dtype=DT)

        def tbs(ms):
            return ms and down_gb / (ms * 1e-3) / 1e3
        ms_u = timed(lambda: linear_small_m(silu_and_mul(gu), wd), graph=True)
        record("fused", f"silu+down M={m} {HIDDEN}x{INTER}", "unfused (2 launches)", ms_u,
               "TB/s", tbs(ms_u))
        ms_f = timed(lambda: linear_small_m(gu, wd, silu_mul=True), graph=True)
        record("fused", f"silu+down M={m} {HIDDEN}x{INTER}", "fused (GEMV prologue)", ms_f,
               "TB/s", tbs(ms_f), _saving(ms_u, ms_f))
        # rotary + KV write: q, k, v views of one qkv output, slots in scattered blocks
        qkv = torch.randn(m, (H + 2 * KVH) * D, device=DEV, dtype=DT)
        q = qkv[:, :H * D].view(m, H, D)
        k = qkv[:, H * D:(H + KVH) * D].view(m, KVH, D)
        v = qkv[:, (H + KVH) * D:].view(m, KVH, D)
        kc = torch.randn(num_blocks, BS, KVH, D, device=DEV, dtype=DT)
        vc = torch.randn_like(kc)
        slots = torch.randperm(num_blocks * BS, device=DEV)[:m]
        pos = torch.randint(0, 8192, (m,), device=DEV)
        inv = 1.0 / 500000.0 ** (torch.arange(0, D, 2, device=DEV, dtype=torch.float32) / D)
        fr = torch.arange(8192, device=DEV, dtype=torch.float32)[:, None] * inv[None]
        cache = torch.cat([fr.cos(), fr.sin()], -1)

        def unfused_rope():
            rotary_embedding(pos, q, k, cache)
            write_kv(k, v, kc, vc, slots)
        ms_u = timed(unfused_rope, graph=True)
        record("fused", f"rope+kv T={m} {H}/{KVH}x{D}", "unfused (2 launches)", ms_u)
        ms_f = timed(lambda: rotary_write_kv(pos, q, k, v, cache, kc, vc, slots), graph=True)
        record("fused", f"rope+kv T={m} {H}/{KVH}x{D}", "fused (1 launch)", ms_f, note=_saving(
            ms_u, ms_f))
        del kc, vc
        # one whole decoder layer, the model's modules: x num_layers ~ a decode step's layers
        layer, kv, (lpos, x, res, meta) = _decoder_layer(ctx, m, num_blocks)

        def step():
            return layer(lpos, x, res, kv, meta)
        with torch.inference_mode():
            with _unfused_seams():
                ms_u = timed(step, graph=True)
            ms_f = timed(step, graph=True)
        shape = f"layer B={m} ctx={ctx}"
        record("fused", shape, "unfused", ms_u, f"ms x{num_layers}",
               ms_u and ms_u * num_layers)
        record("fused", shape, "fused", ms_f, f"ms x{num_layers}", ms_f and ms_f * num_layers,
               _saving(ms_u, ms_f, num_layers))
        del layer, kv
        torch.cuda.empty_cache()


def _saving(ms_before, ms_after, times=1):
    if not ms_before or not ms_after:
        return ""
    note = f"saves {(ms_before - ms_after) * 1e3:.1f} us ({100 * (1 - ms_after / ms_before):.1f}%)"
    return note + (f", {(ms_before - ms_after) * times * 1e3:.0f} us per {times} layers"
                   if times > 1 else "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="also sweep prefill kernel configs")
    ap.add_argument("--sweep-decode", action="store_true", help="also sweep decode configs")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile baselines")
    ap.add_argument("--quick", action="store_true", help="fewer decode shapes")
    ap.add_argument("--fused-only", action="store_true",
                    help="only the fused vs unfused decode kernels (SiLU+down, rotary+KV, layer)")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}",
          flush=True)
    t0 = time.time()
    bench_fused()
    if not args.fused_only:
        run_all(args)
    print(f"\n(total {time.time() - t0:.0f} s)\n")
    print(f"{'group':10s} {'shape':34s} {'impl':26s} {'median us':>10s}  throughput")
    for r in ROWS:
        ms = "failed" if r["ms"] is None else f"{r['ms'] * 1e3:10.1f}"
        val = "" if r["value"] is None else f"{r['value']:8.1f} {r['metric']}"
        print(f"{r['group']:10s} {r['shape']:34s} {r['impl']:26s} {ms:>10s}  {val} {r['note']}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "kernel_bench.json"), "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           triton=triton.__version__, rows=ROWS), f, indent=1)


def run_all(args):
    bench_write_kv()
    if args.quick:
        bench_decode((1, 64), (2048, 32768))
    else:
        bench_decode((1, 64, 256), (512, 2048, 8192, 32768))
    prefill_cfgs = None
    if args.sweep_decode:
        sweep_decode()
    if args.sweep:
        prefill_cfgs = [None, (128, 32, 4, 3), (64, 32, 4, 3), (64, 64, 4, 4), (64, 64, 8, 3),
                        (128, 64, 8, 3)]
    bench_prefill(prefill_cfgs)
    bench_rows(compile_too=not args.no_compile)


if __name__ == "__main__":
    main()
