"""Streams checkpoint tensors one at a time under Hugging Face parameter names.

Names are those of transformers' `*ForCausalLM.state_dict()`: `model.embed_tokens.weight`,
`model.layers.{i}.self_attn.{q,k,v,o}_proj.{weight,bias}`, `model.layers.{i}.self_attn.{q,k}_norm.weight`,
`model.layers.{i}.mlp.{gate,up,down}_proj.weight`, `model.layers.{i}.{input,post_attention}_layernorm.weight`,
`model.norm.weight`, and `lm_head.weight` only when the checkpoint has one (absent => tied to the
embedding). Tensors are on the CPU; the caller casts and moves them into its parameters.
"""
from __future__ import annotations

import json
import os
import re
from types import MappingProxyType
from typing import Any, Iterator

import numpy as np
import torch
from servelm.loader.config import gguf_config_from_reader, resolve_load_format
from servelm.loader.default_model import require_module, resolve_model
from servelm.loader.gguf_file import GGUFFile, GGUFTensorInfo

_GGUF_GLOBAL_NAMES = MappingProxyType({
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
})
_GGUF_LAYER_NAMES = MappingProxyType({
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    # mixtures of experts: the router, every expert's matrices stacked ([E, I, H] gate and
    # up, [E, H, I] down), a Qwen2-MoE shared expert and its gate
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
})
# Tensors with no HF parameter: llama3 rope divisors (folded into config.rope_scaling instead).
_GGUF_SKIP = frozenset({"rope_freqs.weight"})
_GGUF_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Old checkpoints saved the rotary buffer; it is recomputed, never loaded.
_HF_SKIP_SUFFIXES = ("rotary_emb.inv_freq",)


def iter_weights(model: str | None, load_format: str = "auto",
                 keep_gguf_blocks: bool = False) -> Iterator[tuple[str, Any]]:
    """(HF name, CPU tensor) pairs of the checkpoint at `model` (a HF directory or a .gguf file;
    None -> the embedded default GGUF). Bad paths and formats raise here, not on first `next`.

    safetensors keep their stored dtype; GGUF tensors (quantized or not) come dequantized to
    float32, except, with ``keep_gguf_blocks``, linear layers' weights in a block format that
    quantization/gguf_formats.py reads: those come as a ``GGUFWeight`` (the bytes as stored).
    """
    if load_format == "dummy":
        raise ValueError("load_format='dummy' has no weights to read: use initialize_dummy_weights(model)")
    path = resolve_model(model)
    if resolve_load_format(path, load_format) == "gguf":
        require_module("gguf", "gguf", "reading a GGUF file")  # its dequantization
        reader = GGUFFile(path)
        config = gguf_config_from_reader(reader, path)
        named = [(t, gguf_to_hf_name(t.name)) for t in reader.tensors]  # fails now on unknown tensors
        return _iter_gguf(reader, [(t, name) for t, name in named if name is not None], config,
                          keep_gguf_blocks)
    return _iter_hf_dir(_hf_weight_files(path))


def _hf_weight_files(path: str) -> list[str]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(path, s) for s in shards]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    # Mistral repos also carry the same weights in their own layout as consolidated*.safetensors.
    hf_files = [f for f in files if not f.startswith("consolidated")]
    files = hf_files or files
    if not files and os.path.isfile(os.path.join(path, "pytorch_model.bin")):
        files = ["pytorch_model.bin"]
    if not files:
        raise ValueError(f"no weights in {path!r}: expected *.safetensors (or pytorch_model.bin)")
    return [os.path.join(path, f) for f in files]


def _iter_hf_dir(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in files:
        if file.endswith(".safetensors"):
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if not name.endswith(_HF_SKIP_SUFFIXES):
                        yield name, f.get_tensor(name)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            for name, tensor in state.items():
                if not name.endswith(_HF_SKIP_SUFFIXES):
                    yield name, tensor
            del state


def gguf_to_hf_name(name: str) -> str | None:
    """HF name of llama.cpp tensor `name`; None for tensors with no HF parameter."""
    if name in _GGUF_SKIP:
        return None
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    m = _GGUF_LAYER_RE.fullmatch(name)
    if m is None or m.group(2) not in _GGUF_LAYER_NAMES:
        raise ValueError(f"GGUF tensor {name!r} has no servelm counterpart; this GGUF is not supported")
    return f"model.layers.{m.group(1)}.{_GGUF_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def unpermute_llama_qk(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undoes llama.cpp's convert-time q/k row permutation (`LlamaModel.permute`).

    HF rotates the halves [x0..x_{d/2-1} | x_{d/2}..x_{d-1}] of each head (rotate_half); llama.cpp
    rotates adjacent pairs, so its converter reorders each head's rows as
    `w.reshape(heads, 2, d/2, ...).swapaxes(1, 2)`. The inverse reads rows as (heads, d/2, 2).
    """
    # w: [num_heads * head_dim, in] (weight) or [num_heads * head_dim] (bias)
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


_LINEAR_WEIGHT_RE = re.compile(r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
                               r"|lm_head)\.weight")


def _iter_gguf(reader: GGUFFile, named: list[tuple[GGUFTensorInfo, str]],
               config: Any, keep_blocks: bool = False) -> Iterator[tuple[str, Any]]:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from servelm.quantization.gguf import GGUFWeight
    from servelm.quantization.gguf_formats import GGUF_BLOCK_SIZES, GGUF_QUANT_TYPES

    permute_heads = {}
    # llama.cpp permutes q/k rows for Llama and Mixtral (its "llama" architecture); qwen2/qwen3
    # GGUFs keep HF row order (NeoX-style rope)
    if config.model_type in ("llama", "mixtral"):
        permute_heads = {"self_attn.q_proj": config.num_attention_heads,
                         "self_attn.k_proj": config.num_key_value_heads}
    for t, hf_name in named:
        module = hf_name.rsplit(".", 1)[0].split(".", 3)[-1]
        # the embedding too: a tied head may keep its blocks (the model dequantizes the
        # embedding's own copy)
        embed_blocks = (hf_name == "model.embed_tokens.weight"
                        and GGUF_BLOCK_SIZES.get(int(t.tensor_type), (1,))[0] > 1)
        # (stacked experts are dequantized: the fused MoE kernel reads dense or int8/fp8 rows)
        if keep_blocks and t.tensor_type in GGUF_QUANT_TYPES and ".experts." not in hf_name and (
                _LINEAR_WEIGHT_RE.fullmatch(hf_name) or embed_blocks):
            # raw: [N, row_bytes] uint8, row n = output row n's blocks, so llama's q/k row
            # permutation applies to it as to the dequantized rows
            # (the reader gives float tensors (F32 / F16) as float arrays: their bytes here)
            n_rows = int(t.shape[1])
            raw = torch.from_numpy(np.array(reader.tensor_data(t)).view(np.uint8).reshape(n_rows, -1))
            if module in permute_heads:
                raw = unpermute_llama_qk(raw, permute_heads[module])
            yield hf_name, GGUFWeight(raw, t.tensor_type, (int(t.shape[1]), int(t.shape[0])))
            continue
        array = dequantize(reader.tensor_data(t), GGMLQuantizationType(t.tensor_type))
        if not array.flags.writeable:  # a view of the read-only file map (F32 tensors)
            array = array.copy()
        # t.shape is in ggml order (fastest dimension first)
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        tensor = tensor.reshape([int(d) for d in reversed(t.shape)])
        if module in permute_heads:
            tensor = unpermute_llama_qk(tensor, permute_heads[module])
        yield hf_name, tensor
