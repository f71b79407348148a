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
    "Gemma2ForCausalLM": "servelm.models.gemma:GemmaForCausalLM",
    "Gemma3ForCausalLM": "servelm.models.gemma:GemmaForCausalLM",
})
# model_type -> architecture, for configs without `architectures`
MODEL_TYPES = MappingProxyType({"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                                "mixtral": "MixtralForCausalLM",
                                "qwen2_moe": "Qwen2MoeForCausalLM",
                                "qwen3_moe": "Qwen3MoeForCausalLM",
                                "gemma2": "Gemma2ForCausalLM",
                                "gemma3_text": "Gemma3ForCausalLM"})


def windowed_attention(hf_config: Any) -> bool:
    """Whether the model's attention has a sliding window or logit soft-capping that servelm
    computes (then its context is not capped at the window, and the attention backend must
    support them): Mistral/Mixtral with a window, Gemma 2 and 3."""
    mt = getattr(hf_config, "model_type", "")
    if mt in ("gemma2", "gemma3_text"):
        return True
    return mt in ("mistral", "mixtral") and bool(getattr(hf_config, "sliding_window", None))


def uniform_window(hf_config: Any) -> int:
    """The sliding window every layer has (Mistral/Mixtral with one), else 0 (none, or Gemma's
    mix of local and global layers, whose global layers keep every block)."""
    if getattr(hf_config, "model_type", "") in ("mistral", "mixtral"):
        return int(getattr(hf_config, "sliding_window", None) or 0)
    return 0


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
