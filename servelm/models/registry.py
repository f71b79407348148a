"""Architecture name -> model class."""
from __future__ import annotations

from typing import Any

from torch import nn

from servelm.attention.backend import AttentionBackend

_SUPPORTED = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "llama",
    "Qwen3ForCausalLM": "llama",
}
_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


def build_model(hf_config: Any, backend: AttentionBackend, use_kernels: bool) -> nn.Module:
    archs = list(getattr(hf_config, "architectures", None) or [])
    model_type = getattr(hf_config, "model_type", None)
    if not any(a in _SUPPORTED for a in archs) and model_type not in _MODEL_TYPES:
        raise ValueError(f"model architecture {archs or model_type} is not supported; supported: "
                         f"{sorted(_SUPPORTED)}.")
    from servelm.models.llama import LlamaForCausalLM
    return LlamaForCausalLM(hf_config, backend, use_kernels)
