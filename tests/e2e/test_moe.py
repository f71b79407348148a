"""Mixture-of-experts models (Mixtral, Qwen2-MoE with its shared expert and a dense layer,
Qwen3-MoE sparse every other layer with renormalised top-k): greedy output token-identical to
transformers in fp32 with logprobs close, under chunked prefill, prefix hits and preemption,
and under tensor parallelism (experts' intermediate slices on two ranks); configs that cannot
route are refused."""
from __future__ import annotations

import json

import pytest

from servelm import SamplingParams
from tests.conftest import assert_all_blocks_free, make_engine, random_prompts, run_to_completion
from tests.e2e.test_engine_vs_hf import GREEDY, LENGTHS, check, check_engine, hf_refs

MOE = ["mixtral", "qwen2-moe", "qwen3-moe"]



@pytest.mark.parametrize("arch", MOE)
def test_moe_greedy_matches_hf(tiny_model_factory, arch):
    d, model = tiny_model_factory(arch)
    prompts = random_prompts(6, LENGTHS, seed=5)
    eng = make_engine(d, max_num_batched_tokens=40)  # long prompts in chunks
    outs = run_to_completion(eng, prompts, GREEDY)
    check(outs, hf_refs(model, prompts))
    assert_all_blocks_free(eng)


def test_moe_prefix_hits_and_preemption(tiny_model_factory):
    """Shared prompt prefixes hit the cache, and a cache too small for every request preempts
    (recomputes) some; output stays HF's."""
    d, model = tiny_model_factory("qwen2-moe")
    base = random_prompts(1, [40], seed=9)[0]
    prompts = [base + p for p in random_prompts(5, [3, 9, 17, 24, 30], seed=10)]
    eng = make_engine(d, num_gpu_blocks_override=48, kv_cache_memory=None, max_num_seqs=5)
    outs = run_to_completion(eng, prompts, GREEDY)
    check(outs, hf_refs(model, prompts))
    stats = eng.core.scheduler.stats()
    assert stats.prefix_cache_hits > 0 and stats.num_preemptions > 0
    assert_all_blocks_free(eng)


@pytest.mark.parametrize("arch", ["qwen2-moe", "mixtral"])
def test_moe_tensor_parallel_matches_hf(tiny_model_factory, arch):
    d, model = tiny_model_factory(arch)
    prompts = random_prompts(4, LENGTHS, seed=12)
    eng = make_engine(d, tensor_parallel_size=2, max_num_batched_tokens=40)
    try:
        experts = eng.core.executor.runner.model.layers[0].mlp.experts
        assert experts.w13_weight.shape[1] == 2 * (experts.i_hi - experts.i_lo)
        outs = run_to_completion(eng, prompts, GREEDY)
        check(outs, hf_refs(model, prompts))
    finally:
        eng.core.shutdown()


def test_moe_refusals(tiny_model_factory, tmp_path):
    d, _ = tiny_model_factory("mixtral")
    cfg = json.load(open(f"{d}/config.json"))
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("model.safetensors",):
        (bad / f).symlink_to(f"{d}/{f}")
    json.dump({**cfg, "num_experts_per_tok": 9}, open(bad / "config.json", "w"))
    with pytest.raises(ValueError, match="num_experts_per_tok must be in"):
        make_engine(str(bad))
    with pytest.raises(ValueError, match="mixture-of-experts"):
        make_engine(d, quantization="int4", quantization_group_size=32)
    with pytest.raises(ValueError, match="tensor_parallel_size=3"):
        make_engine(d, tensor_parallel_size=3)


def test_moe_sampling_runs(tiny_model_factory):
    """Seeded sampling through the experts: same seed, same tokens."""
    d, _ = tiny_model_factory("qwen3-moe")
    eng = make_engine(d)
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_tokens=12, ignore_eos=True)
    prompts = random_prompts(2, [5, 11], seed=2)
    a = run_to_completion(eng, prompts, p)
    b = run_to_completion(eng, prompts, p, ids=["x0", "x1"])
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]


@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_quantized_experts_match_their_dequantized_reference(method):
    """Experts converted at load (one scale per output row; a down row's scale over the full
    row, so a tensor-parallel shard is the one-rank weights' slice): the layer's output equals
    the reference over the dequantized weights, and the weights shrink."""
    import torch

    from servelm.distributed import ParallelGroup
    from servelm.layers.fused_moe import FusedMoE, dequantize_rows, fused_experts_ref
    torch.manual_seed(0)
    E, H, I, T, k = 6, 32, 48, 9, 2
    dense = FusedMoE(E, H, I)
    q = FusedMoE(E, H, I, quant=method)
    full = {(e, p): torch.randn(I if p != "down" else H, H if p != "down" else I) * 0.2
            for e in range(E) for p in ("gate", "up", "down")}
    for (e, p), w in full.items():
        dense.load_expert(e, p, w)
        q.load_expert(e, p, w)
    assert q.w13_weight.element_size() == 1 and q.w13_scale.shape == (E, 2 * I)
    x = torch.randn(T, H)
    weights = torch.rand(T, k)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    deq13 = torch.stack([dequantize_rows(q.w13_weight[e], q.w13_scale[e], x.dtype)
                         for e in range(E)])
    deq2 = torch.stack([dequantize_rows(q.w2_weight[e], q.w2_scale[e], x.dtype)
                        for e in range(E)])
    got = q(x, weights, ids)
    torch.testing.assert_close(got, fused_experts_ref(x, deq13, deq2, weights, ids),
                               rtol=0, atol=0)
    want = dense(x, weights, ids)  # and close to the unquantized experts
    err = ((got - want).norm() / want.norm()).item()
    assert err < (0.02 if method == "int8" else 0.08), err
    # a tensor-parallel rank's shard (rank 1 of 2) is the one-rank weights' slice
    half = FusedMoE(E, H, I, tp=ParallelGroup(1, 2), quant=method)
    for (e, p), w in full.items():
        half.load_expert(e, p, w)
    torch.testing.assert_close(half.w2_weight.float(), q.w2_weight[:, :, I // 2:].float())
    torch.testing.assert_close(half.w2_scale, q.w2_scale)
    torch.testing.assert_close(half.w13_weight[:, :I // 2].float(),
                               q.w13_weight[:, I // 2:I].float())


@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_quantized_moe_model_generates(tiny_model_factory, method):
    """A whole Qwen2-MoE with quantization=int8/fp8 (experts and the other linears) runs; with
    int8 its greedy tokens mostly agree with fp32's on this tiny random model (fp8's W8A8
    linears drift within a few tokens here, a dense Llama's alike: the layer test above pins
    the experts' exactness)."""
    d, model = tiny_model_factory("qwen2-moe")
    prompts = random_prompts(3, [9, 20, 33], seed=44)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    eng = make_engine(d, quantization=method,
                      quantization_group_size=None if method == "fp8" else 32)
    experts = eng.core.executor.runner.model.layers[0].mlp.experts
    assert experts.quant == method and experts.w13_weight.element_size() == 1
    outs = run_to_completion(eng, prompts, params)
    ref = hf_refs(model, prompts, 8)
    assert all(len(o.outputs[0].token_ids) == 8 for o in outs)
    agree = sum(a == b for o, (ids, _) in zip(outs, ref)
                for a, b in zip(o.outputs[0].token_ids, ids))
    assert method == "fp8" or agree >= 12, agree  # of 24


def test_moe_pipeline_stages_match_hf(tiny_model_factory):
    """Two pipeline stages, a layer of experts each."""
    d, model = tiny_model_factory("mixtral")
    check_engine(d, model, random_prompts(4, LENGTHS, seed=7), pipeline_parallel_size=2,
                 max_num_batched_tokens=40)


def _write_moe_gguf(path, model_dir: str, cfg, arch: str) -> None:
    """A GGUF of the saved checkpoint written as llama.cpp's converter lays it out: names from
    the gguf package's own tensor map, each layer's experts stacked into one 3-D tensor, the
    q/k rows of the "llama" architecture (Mixtral) permuted, the expert metadata keys."""
    import gguf
    import numpy as np
    from safetensors import safe_open
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    w.add_expert_count(experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if arch != "llama":
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if getattr(cfg, "shared_expert_intermediate_size", 0):
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, cfg.num_hidden_layers)
    stacks: dict = {}
    with safe_open(f"{model_dir}/model.safetensors", "pt") as f:
        for hf in f.keys():
            t = f.get_tensor(hf).float().numpy()
            module, suffix = hf.rsplit(".", 1)
            parts = module.split(".")
            if "experts" in parts:  # ...experts.{e}.{w1|gate_proj|...}: stacked per layer
                i = parts.index("experts")
                stacks.setdefault(".".join(parts[:i + 1] + parts[i + 2:]), {})[int(parts[i + 1])] = t
                continue
            if arch == "llama" and module.endswith(("q_proj", "k_proj")):
                n = heads if module.endswith("q_proj") else kv
                t = t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
            if module.endswith("shared_expert_gate"):
                t = t.reshape(-1)
            w.add_tensor(f"{names.get_name(module)}.{suffix}", np.ascontiguousarray(t))
    for module, per in stacks.items():
        w.add_tensor(f"{names.get_name(module)}.weight",
                     np.stack([per[e] for e in range(experts)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch,gguf_arch", [("mixtral", "llama"), ("qwen2-moe", "qwen2moe"),
                                            ("qwen3-moe", "qwen3moe")])
def test_moe_gguf_matches_hf(tiny_model_factory, tmp_path, arch, gguf_arch):
    """llama.cpp's MoE files (Mixtral as a "llama" with experts, qwen2moe with its shared
    expert, qwen3moe): the config from the metadata, the stacked experts split, greedy output
    transformers'."""
    pytest.importorskip("gguf")
    d, model = tiny_model_factory(arch)
    path = tmp_path / f"{arch}.gguf"
    if arch != "mixtral":  # GGUF has no mlp_only_layers / sparse step: all sparse, as released
        import torch
        import transformers as tf

        from tests.conftest import _make_config
        torch.manual_seed(99)
        cfg = _make_config(arch)
        cfg.mlp_only_layers, cfg.decoder_sparse_step = [], 1
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        d = str(tmp_path / "dense-free")
        model.save_pretrained(d)
    _write_moe_gguf(path, d, model.config, gguf_arch)
    prompts = random_prompts(4, LENGTHS, seed=15)
    eng = make_engine(str(path), max_num_batched_tokens=40)
    assert type(eng.core.executor.runner.model.layers[1].mlp).__name__ == "SparseMoeBlock"
    check(run_to_completion(eng, prompts, GREEDY), hf_refs(model, prompts))
