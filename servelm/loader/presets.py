"""Shapes of well-known models, for `load_format="dummy"` (random weights, no files needed).

Each preset is the published `config.json` of the model, reduced to the fields that shape the
network. Benchmarks on a preset measure the real model's speed; its outputs are noise.
Presets build servelm's own `ArchConfig` (no transformers import on the dummy path).
"""
from __future__ import annotations

import copy
from types import MappingProxyType
from typing import Any, Mapping

from servelm.loader.arch_config import ArchConfig

_LLAMA3_ROPE_SCALING = MappingProxyType({
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
})

PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    # meta-llama/Meta-Llama-3-8B
    "llama-3-8b": MappingProxyType({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336,
        "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "tie_word_embeddings": False,
        "bos_token_id": 128000, "eos_token_id": 128001,
    }),
    # meta-llama/Meta-Llama-3-70B (tensor parallelism's benchmark shape: 4 x H100/H200)
    "llama-3-70b": MappingProxyType({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
        "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 28672,
        "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "tie_word_embeddings": False,
        "bos_token_id": 128000, "eos_token_id": 128001,
    }),
    # meta-llama/Llama-3.2-1B. Its rope uses llama3 frequency scaling: a model that ignores
    # `rope_scaling` computes plain rope with theta 500000 (same speed, different numbers).
    "llama-3.2-1b": MappingProxyType({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 8192,
        "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE_SCALING, "tie_word_embeddings": True,
        "bos_token_id": 128000, "eos_token_id": 128001,
    }),
    # Qwen/Qwen2.5-7B (q/k/v projections carry a bias)
    "qwen2.5-7b": MappingProxyType({
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "intermediate_size": 18944,
        "vocab_size": 152064, "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "tie_word_embeddings": False, "use_sliding_window": False,
        "bos_token_id": 151643, "eos_token_id": 151643,
    }),
    # Qwen/Qwen3-8B (per-head RMSNorm on q and k)
    "qwen3-8b": MappingProxyType({
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"],
        "hidden_size": 4096, "num_hidden_layers": 36, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 12288,
        "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "tie_word_embeddings": False, "use_sliding_window": False,
        "bos_token_id": 151643, "eos_token_id": 151645,
    }),
    # mistralai/Mistral-7B-v0.1: every layer attends to the last 4096 positions only
    "mistral-7b": MappingProxyType({
        "model_type": "mistral", "architectures": ["MistralForCausalLM"],
        "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336,
        "vocab_size": 32000, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "sliding_window": 4096,
        "bos_token_id": 1, "eos_token_id": 2,
    }),
    # Qwen/Qwen3-30B-A3B: 128 experts of 768, 8 routed a token (~3.3B of 30.5B parameters active)
    "qwen3-30b-a3b": MappingProxyType({
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
        "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144,
        "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
        "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "tie_word_embeddings": False, "use_sliding_window": False,
        "bos_token_id": 151643, "eos_token_id": 151645,
    }),
    # HuggingFaceTB/SmolLM2-135M-Instruct: the shape of the embedded default GGUF
    "smollm2-135m": MappingProxyType({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536,
        "vocab_size": 49152, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
    }),
})

DEFAULT_DUMMY_PRESET = "smollm2-135m"


def preset_config(name: str) -> ArchConfig:
    """A fresh config of the preset `name` (case-insensitive)."""
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(
            f"unknown dummy preset {name!r}: choose one of {sorted(PRESETS)}, "
            "or pass a local Hugging Face directory whose config.json gives the shape"
        )
    kwargs = {k: copy.deepcopy(dict(v) if isinstance(v, Mapping) else v) for k, v in PRESETS[key].items()}
    return ArchConfig.from_dict({**kwargs, "name_or_path": key})
