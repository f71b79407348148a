"""Architecture name -> model class, as a registry (HF ``architectures`` names, then
``model_type`` for configs that lack them)."""
from __future__ import annotations

from types import MappingProxyType
from typing import Any

from torch import nn

from servelm.attention.backend import AttentionBackend
from servelm.distributed import ParallelGroup
from servelm.registry import load_class

MODELS = MappingProxyType({
    "LlamaForCausalLM": "servelm.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "servelm.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "servelm.models.llama:LlamaForCausalLM",
    "Qwen3ForCausalLM": "servelm.models.llama:LlamaForCausalLM",
    "MixtralForCausalLM": "servelm.models.moe:MoEForCausalLM",
    "Qwen2MoeForCausalLM": "servelm.models.moe:MoEForCausalLM",
    "Qwen3MoeForCausalLM": "servelm.models.moe:MoEForCausalLM",
})
# model_type -> architecture, for configs without `architectures`
MODEL_TYPES = MappingProxyType({"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                                "mixtral": "MixtralForCausalLM",
                                "qwen2_moe": "Qwen2MoeForCausalLM",
                                "qwen3_moe": "Qwen3MoeForCausalLM"})


def resolve_architecture(hf_config: Any) -> str:
    archs = list(getattr(hf_config, "architectures", None) or [])
    for a in archs:
        if a in MODELS:
            return a
    arch = MODEL_TYPES.get(getattr(hf_config, "model_type", None))
    if arch is None:
        raise ValueError(f"model architecture {archs or getattr(hf_config, 'model_type', None)} "
                         f"is not supported; supported: {sorted(MODELS)}.")
    return arch


def build_model(hf_config: Any, backend: AttentionBackend, use_kernels: bool,
                quantization=None, tp: ParallelGroup = ParallelGroup(),
                pp: ParallelGroup = ParallelGroup()) -> nn.Module:
    cls = load_class(MODELS, resolve_architecture(hf_config), "architecture")
    return cls(hf_config, backend, use_kernels=use_kernels, quantization=quantization, tp=tp,
               pp=pp)
