"""Quantized linear methods on the CPU reference path: each method's layer against its
dequantized reference on random shapes; GPTQ (v1/v2, act-order) and AWQ checkpoints packed here
from the formats' published layouts, and fp8 (compressed-tensors) checkpoints, load and generate
exactly as the engine running the dequantized weights; bytes shrink; bad combinations are
ValueErrors that say what would work."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from servelm import SamplingParams
from servelm.layers.linear import Linear, process_weights_after_loading
from servelm.quantization import QuantConfig
from servelm.quantization.gptq import AWQ_ORDER
from servelm.quantization.ref import (dequantize_int4, dequantize_int8, fp8_linear_ref,
                                      pack_int4, quantize_fp8_per_channel, quantize_int4,
                                      unpack_int4)
from tests.conftest import make_engine, random_prompts, run_to_completion

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _layer(method, k, parts, dtype=torch.float32, **qc):
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return Linear(k, parts, quantization=QuantConfig(method, **qc), prefix="t")
    finally:
        torch.set_default_dtype(prev)


# ---- layer level -----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["int4", "int8", "fp8"])
@pytest.mark.parametrize("k,parts,group", [(64, [48], 32), (576, [40, 24, 24], 128),
                                           (256, [72, 72], -1), (96, [16], 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_matches_its_dequantized_reference(method, k, parts, group, dtype):
    lin = _layer(method, k, parts, dtype, group_size=group)
    ws = [_rand(n, k, seed=i + 1) * 0.1 for i, n in enumerate(parts)]
    for i, w in enumerate(ws):
        lin.load_weight("weight", w, i)
    stored = {n: p.detach().clone() for n, p in lin.named_parameters()}
    process_weights_after_loading(lin)
    x = _rand(5, k, seed=99, dtype=dtype)
    y = lin(x)
    assert y.shape == (5, sum(parts)) and y.dtype == dtype
    g = k if group == -1 else group
    if method == "int4":
        wq = dequantize_int4(stored["qweight"], stored["scales"], stored["zeros"], g)
        ref = F.linear(x, wq.to(dtype))
        if getattr(lin, "cpu_packed", None) is not None:
            # bf16 on the CPU: PyTorch's packed int4 kernel (quantization/cpu_int4.py), the
            # zero term rounded to bf16 and fp32 sums in another order: close, not bit-equal
            assert dtype == torch.bfloat16 and g in (32, 64, 128, 256)
            ref32 = F.linear(x.float(), wq.float())
            assert ((y.float() - ref32).norm() / ref32.norm()).item() < 1e-2
            ref = y
    elif method == "int8":
        wq = dequantize_int8(lin.qweight, lin.scales, g)
        ref = F.linear(x, wq.to(dtype))
    else:
        wq = lin.weight.float() * lin.weight_scale[:, None]
        ref = fp8_linear_ref(x, lin.weight, lin.weight_scale)
    if getattr(lin.method, "native", None) is not None:
        # the CPU's C GEMV (servelm/cpu/): fp32 products and sums in its own order, rounded
        # once to the activation dtype; within fp32 rounding of the exact result (a bf16 output
        # within half a bf16 step of it, plus that)
        # (its weights are the exact fp32 products code x scale, not rounded to bf16)
        w32 = (dequantize_int4(stored["qweight"], stored["scales"].float(),
                               stored["zeros"].float(), g) if method == "int4"
               else dequantize_int8(lin.qweight, lin.scales.float(), g))
        exact = x.double() @ w32.double().t()
        bound = (x.double().abs() @ w32.double().abs().t()) * k * 2.0 ** -24
        if dtype == torch.bfloat16:
            bound = bound + exact.abs() * 2.0 ** -8
        assert ((y.double() - exact).abs() <= bound + 1e-30).all()
        ref = y
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    # and the quantization error is that of the format
    dense = torch.cat(ws).to(dtype).float()
    rel = ((wq.float() - dense).norm() / dense.norm()).item()
    assert rel < {"int4": 0.12, "int8": 0.01, "fp8": 0.04}[method], rel
    assert not torch.equal(wq.float(), dense)


def test_int4_pack_roundtrip_and_ragged_last_group():
    q = torch.randint(0, 16, (576, 24), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    w = _rand(24, 576, seed=3)
    qw, s, z = quantize_int4(w, 128, hqq_iters=0)  # round to nearest
    assert s.shape == (5, 24)  # 576 = 4 * 128 + 64: a last group of 64
    err = (dequantize_int4(qw, s, z, 128) - w).abs()
    assert (err <= s.repeat_interleave(128, 0)[:576].t() * 0.5 + 1e-6).all()
    # HQQ's refined zeros: fractional, and a smaller mean error than rounding's
    qh, sh, zh = quantize_int4(w, 128)
    err_h = (dequantize_int4(qh, sh, zh, 128) - w).abs()
    assert torch.equal(sh, s) and not torch.equal(zh, zh.round())
    assert err_h.mean() < err.mean()


def test_group_size_errors():
    with pytest.raises(ValueError, match="not a multiple of 8"):
        _layer("int4", 64, [16], group_size=12)
    cfg = QuantConfig("int8", group_size=128)
    with pytest.raises(ValueError, match="does not divide the tensor-parallel shard"):
        cfg.group_for(288, "layers.0.mlp.down_proj", shard_start=288)


# ---- checkpoints packed here ---------------------------------------------------------------
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _save(dirname, config: dict, tensors: dict) -> str:
    from safetensors.torch import save_file
    os.makedirs(dirname, exist_ok=True)
    with open(os.path.join(dirname, "config.json"), "w") as f:
        json.dump(config, f)
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(dirname, "model.safetensors"))
    return str(dirname)


def _pack_cols(q: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """q [R, C] in 0..15 -> int32 [R, C // 8]; nibble i of value c holds column c * 8 + order[i]
    (GPTQ's qzeros: order 0..7; AWQ: 0, 2, 4, 6, 1, 3, 5, 7)."""
    R, C = q.shape
    q = q.to(torch.int64).reshape(R, C // 8, 8)[:, :, list(order)]
    packed = sum(q[:, :, i] << (4 * i) for i in range(8))
    return (packed - (packed >= 2**31).to(torch.int64) * 2**32).to(torch.int32)


def _quantized_checkpoints(tmp_path, model, fmt: str, group: int = 32, act_order=False):
    """(quantized checkpoint dir, dense checkpoint dir of its dequantized weights)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    qstate, dense = {}, {}
    # act-order permutes a layer's input columns by its inputs' statistics: projections that
    # read the same input (q/k/v, gate/up) share one permutation
    shared_input = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 2,
                    "up_proj": 2, "down_proj": 3}
    for name, w in state.items():
        mod = name.rsplit(".", 2)
        if len(mod) < 3 or mod[-2] not in LINEARS or mod[-1] != "weight":
            qstate[name] = dense[name] = w
            continue
        base = name.removesuffix(".weight")
        N, K = w.shape
        layer_no = int(name.split(".")[2])
        g = torch.Generator().manual_seed(10 * layer_no + shared_input[mod[-2]])
        perm = torch.randperm(K, generator=g) if act_order else torch.arange(K)
        q_sorted, s, z = quantize_int4(w[:, perm], group)  # groups over the permuted columns
        q = torch.empty_like(unpack_int4(q_sorted))
        q[perm] = unpack_int4(q_sorted)  # [K, N]: row perm[j] holds sorted row j
        g_idx = torch.empty(K, dtype=torch.int32)
        g_idx[perm] = torch.arange(K, dtype=torch.int32) // group
        deq = ((q.float() - z.float()[g_idx.long()]) * s.float()[g_idx.long()]).t()
        dense[name] = deq.contiguous()
        zq = z.round().to(torch.int32)
        s16 = s.half()
        if fmt == "awq":
            qstate[f"{base}.qweight"] = _pack_cols(q, AWQ_ORDER)
            qstate[f"{base}.qzeros"] = _pack_cols(zq, AWQ_ORDER)
        else:
            qstate[f"{base}.qweight"] = pack_int4(q)
            qstate[f"{base}.qzeros"] = _pack_cols(zq - (1 if fmt == "gptq" else 0))
            qstate[f"{base}.g_idx"] = g_idx
        qstate[f"{base}.scales"] = s16
        dense[name] = ((q.float() - zq.float()[g_idx.long()]) * s16.float()[g_idx.long()]).t().contiguous()
    cfg = model.config.to_dict()
    if fmt == "awq":
        qc = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
              "version": "gemm"}
    else:
        qc = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": act_order,
              "sym": False, "checkpoint_format": "gptq" if fmt == "gptq" else "gptq_v2"}
    qdir = _save(tmp_path / f"q-{fmt}", {**cfg, "quantization_config": qc}, qstate)
    ddir = _save(tmp_path / f"d-{fmt}", cfg, dense)
    return qdir, ddir


def _greedy(path, **kw):
    eng = make_engine(path, **kw)
    outs = run_to_completion(eng, random_prompts(3, [5, 17, 9], seed=4), GREEDY)
    return [o.outputs[0].token_ids for o in outs], eng


@pytest.mark.parametrize("fmt,act_order", [("gptq", False), ("gptq", True), ("gptq_v2", False),
                                           ("awq", False)])
def test_gptq_awq_checkpoints_generate_as_their_dequantized_weights(tmp_path, tiny_model_factory,
                                                                    fmt, act_order):
    _, model = tiny_model_factory("llama")
    qdir, ddir = _quantized_checkpoints(tmp_path, model, fmt, act_order=act_order)
    got, eng = _greedy(qdir)
    want, dense_eng = _greedy(ddir)
    assert got == want
    m = eng.core.executor.runner.model
    assert type(m.layers[0].mlp.down_proj.method).__name__ == ("AWQLinearMethod" if fmt == "awq"
                                                                else "GPTQLinearMethod")
    assert (getattr(m.layers[0].self_attn.qkv_proj, "input_perm", None) is not None) == act_order
    # the linear layers' bytes: int4 + group scales/zeros, against fp32
    def linear_bytes(model):
        return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                   if "proj" in n)
    assert linear_bytes(m) < linear_bytes(dense_eng.core.executor.runner.model) / 4


def test_fp8_checkpoint_loads_as_stored(tmp_path, tiny_model_factory):
    path, model = tiny_model_factory("llama")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    qstate = {}
    for name, w in state.items():
        parts = name.rsplit(".", 2)
        if len(parts) == 3 and parts[-2] in LINEARS and parts[-1] == "weight":
            q, s = quantize_fp8_per_channel(w)
            qstate[name] = q
            qstate[name.replace(".weight", ".weight_scale")] = s[:, None]  # [N, 1] as stored
            qstate[name.replace(".weight", ".input_scale")] = torch.ones(1)
        else:
            qstate[name] = w
    qc = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {
        "group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float",
                                                       "strategy": "channel"},
                    "input_activations": {"num_bits": 8, "type": "float", "dynamic": True,
                                          "strategy": "token"}}}, "ignore": ["lm_head"]}
    qdir = _save(tmp_path / "fp8", {**model.config.to_dict(), "quantization_config": qc}, qstate)
    got, eng = _greedy(qdir)
    want, _ = _greedy(path, quantization="fp8")  # the same weights, quantized at load
    assert got == want
    assert eng.core.executor.runner.model.layers[0].mlp.down_proj.weight.dtype == torch.float8_e4m3fn


def test_converted_methods_generate_and_shrink(tiny_model_factory):
    path, _ = tiny_model_factory("llama")
    dense, eng = _greedy(path)
    nbytes = {}
    for method in ("int8", "int4", "fp8"):
        got, e = _greedy(path, quantization=method,
                         quantization_group_size=None if method == "fp8" else 32)
        assert len(got) == 3 and all(len(t) == 12 for t in got)
        nbytes[method] = sum(p.numel() * p.element_size()
                             for n, p in e.core.executor.runner.model.named_parameters()
                             if "proj" in n)
    dense_bytes = sum(p.numel() * p.element_size()
                      for n, p in eng.core.executor.runner.model.named_parameters() if "proj" in n)
    assert nbytes["int4"] < nbytes["int8"] < dense_bytes / 3 and nbytes["fp8"] < dense_bytes / 3


def test_quantized_lm_head(tiny_model_factory):
    for arch in ("llama", "llama-tied"):
        path, _ = tiny_model_factory(arch)
        got, e = _greedy(path, quantization="int8", quantize_lm_head=True)
        head = e.core.executor.runner.model.lm_head
        assert head is not None and head.qweight.dtype == torch.int8
        assert all(len(t) == 12 for t in got)


@pytest.mark.parametrize("kw,match", [
    (dict(quantization="gptq"), "no quantization_config"),
    (dict(quantization="gguf"), "keeps a .gguf file's blocks"),
    (dict(quantization="fp8", quantization_group_size=64), "applies to int4/int8"),
    (dict(quantization_group_size=64), "need a quantization method"),
    (dict(quantization="none", quantize_lm_head=True), "need a quantization method"),
    (dict(quantization="int4", quantization_group_size=0), "must be -1"),
    (dict(kv_cache_dtype="fp8_e5m2"), "use 'fp8'"),
    (dict(kv_cache_dtype="int8"), "kv_cache_dtype must be one of"),
])
def test_bad_combinations_are_value_errors(tiny_model_factory, kw, match):
    path, _ = tiny_model_factory("llama")
    with pytest.raises(ValueError, match=match):
        make_engine(path, **kw)


def test_checkpoint_contradiction(tmp_path, tiny_model_factory):
    _, model = tiny_model_factory("llama")
    qdir, _ = _quantized_checkpoints(tmp_path, model, "awq")
    with pytest.raises(ValueError, match="contradicts the checkpoint's quantization_config"):
        make_engine(qdir, quantization="gptq")
    with pytest.raises(ValueError, match="contradicts the checkpoint's group size"):
        make_engine(qdir, quantization_group_size=64)
    with pytest.raises(ValueError, match="decides its head: drop quantize_lm_head"):
        make_engine(qdir, quantize_lm_head=True)


def test_fp8_checkpoint_per_tensor_scales(tmp_path, tiny_model_factory):
    """``quant_method: fp8`` with one scale per tensor (each part of q|k|v, gate|up its own):
    loads as stored and computes with exactly those weights."""
    _, model = tiny_model_factory("llama")
    qstate, dense = {}, {}
    for name, w in model.state_dict().items():
        parts = name.rsplit(".", 2)
        if len(parts) == 3 and parts[-2] in LINEARS and parts[-1] == "weight":
            scale = w.abs().max() / 448.0
            q = (w / scale).to(torch.float8_e4m3fn)
            qstate[name] = q
            qstate[name.replace(".weight", ".weight_scale")] = scale.reshape(())
            dense[name] = q.float() * scale
        else:
            qstate[name] = dense[name] = w.detach().clone()
    qc = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    qdir = _save(tmp_path / "fp8t", {**model.config.to_dict(), "quantization_config": qc}, qstate)
    eng = make_engine(qdir)
    layer = eng.core.executor.runner.model.layers[1].self_attn.qkv_proj
    q_rows = layer.output_sizes[0]
    want = dense["model.layers.1.self_attn.q_proj.weight"]
    got = (layer.weight.float() * layer.weight_scale[:, None])[:q_rows]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    k_scale = qstate["model.layers.1.self_attn.k_proj.weight_scale"]
    assert torch.equal(layer.weight_scale[q_rows], k_scale.float())
    out, _ = _greedy(qdir)
    assert all(len(t) == 12 for t in out)
    with pytest.raises(ValueError, match="block-wise fp8"):
        _save(tmp_path / "fp8b", {**model.config.to_dict(), "quantization_config": {
            "quant_method": "fp8", "weight_block_size": [128, 128]}}, qstate)
        make_engine(str(tmp_path / "fp8b"))


@pytest.mark.parametrize("spec", [{"method": "layer_skip", "draft_layers": 1,
                                   "num_speculative_tokens": 3, "adaptive": False},
                                  {"method": "ngram", "num_speculative_tokens": 3,
                                   "adaptive": False}])
def test_quantized_target_with_speculation_is_exact(tiny_model_factory, spec):
    """Speculative decoding over quantized weights keeps greedy output identical."""
    path, _ = tiny_model_factory("llama")
    plain, _ = _greedy(path, quantization="int4", quantization_group_size=32)
    spec_out, _ = _greedy(path, quantization="int4", quantization_group_size=32,
                          speculative_config=spec)
    assert spec_out == plain
