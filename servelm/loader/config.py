"""Model configs: a transformers `PretrainedConfig` for a HF directory; servelm's own `ArchConfig`
for GGUF metadata and presets (so those paths never import transformers).

load_format: "auto" (a directory -> safetensors, a *.gguf file -> gguf), "safetensors" (a HF
directory: config.json + *.safetensors, or pytorch_model.bin), "gguf", "dummy" (random weights:
the shape comes from a preset name, a HF directory, a .gguf file, or the default preset).
"""
from __future__ import annotations

import math
import os
from types import MappingProxyType
from typing import Any

import numpy as np

from servelm.loader.arch_config import ArchConfig
from servelm.loader.default_model import require_module, resolve_model
from servelm.loader.gguf_file import GGUFFile, GGUFTensorInfo
from servelm.loader.presets import DEFAULT_DUMMY_PRESET, preset_config

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")

# GGUF `general.architecture` -> (HF model_type, architecture class name).
# A Mistral GGUF is written by llama.cpp as "llama" (same tensors, same q/k permutation).
GGUF_ARCHITECTURES = MappingProxyType({
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "qwen2moe": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
})


def check_load_format(load_format: str) -> None:
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load_format {load_format!r}: choose one of {list(LOAD_FORMATS)}")


def resolve_load_format(path: str, load_format: str) -> str:
    """The concrete format ("safetensors" or "gguf") of the existing local `path`."""
    check_load_format(load_format)
    is_gguf_file = os.path.isfile(path) and path.endswith(".gguf")
    if load_format == "auto":
        if os.path.isdir(path):
            return "safetensors"
        if is_gguf_file:
            return "gguf"
        raise ValueError(
            f"cannot tell the format of {path!r}: pass a Hugging Face directory or a .gguf file"
        )
    if load_format == "safetensors" and not os.path.isdir(path):
        raise ValueError(
            f"load_format='safetensors' needs a Hugging Face directory, got {path!r}; "
            "for a .gguf file use load_format='gguf' or 'auto'"
        )
    if load_format == "gguf" and not is_gguf_file:
        raise ValueError(f"load_format='gguf' needs a path to a .gguf file, got {path!r}")
    return load_format


def load_hf_config(model: str | None, load_format: str = "auto") -> Any:
    """The config of `model` (None -> the embedded SmolLM2 GGUF, or for dummy its preset): an
    `ArchConfig` for a preset or a .gguf file, a transformers `PretrainedConfig` for a HF directory."""
    check_load_format(load_format)
    if load_format == "dummy":
        if model is None:
            return preset_config(DEFAULT_DUMMY_PRESET)
        if not os.path.exists(os.path.expanduser(model)):
            return preset_config(model)
        load_format = "auto"
    path = resolve_model(model)
    if resolve_load_format(path, load_format) == "gguf":
        return gguf_config_from_reader(GGUFFile(path), path)
    return _hf_dir_config(path)


def rope_parameters(config: Any) -> dict[str, Any]:
    """{"rope_type", "rope_theta", scaling fields...} under transformers 5 (`rope_parameters`) and 4."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        out = dict(params)
    else:
        out = dict(getattr(config, "rope_scaling", None) or {})
        out["rope_theta"] = float(getattr(config, "rope_theta", 10000.0))
    out.setdefault("rope_type", out.pop("type", "default"))
    return out


# multimodal checkpoints served as text-only models: architecture -> its language model's
TEXT_ONLY = MappingProxyType({"Gemma3ForConditionalGeneration": "Gemma3ForCausalLM"})


def text_only_config(config: Any) -> Any:
    """A multimodal checkpoint's language-model config (its ``text_config``, named as the text
    architecture), for serving text with the vision weights left unloaded; other configs as
    they are."""
    archs = list(getattr(config, "architectures", None) or [])
    text = getattr(config, "text_config", None)
    if text is None or not any(a in TEXT_ONLY for a in archs):
        return config
    text.architectures = [TEXT_ONLY[next(a for a in archs if a in TEXT_ONLY)]]
    if getattr(config, "tie_word_embeddings", None) is not None:
        text.tie_word_embeddings = config.tie_word_embeddings
    text.multimodal_architecture = archs[0]
    return text


def _hf_dir_config(path: str) -> Any:
    if not os.path.isfile(os.path.join(path, "config.json")):
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        hint = f"; to load a GGUF pass its file path, e.g. {os.path.join(path, ggufs[0])!r}" if ggufs else ""
        raise ValueError(f"{path!r} has no config.json, so it is not a Hugging Face model directory{hint}")
    from transformers import AutoConfig  # here only: the preset and GGUF paths never import it

    return text_only_config(AutoConfig.from_pretrained(path))


def gguf_field(reader: GGUFFile, key: str, default: Any = None) -> Any:
    """The value of metadata `key` of a GGUF file (str, number, bool or list), or default."""
    return reader.field(key, default)


def gguf_config_from_reader(reader: GGUFFile, path: str = "") -> ArchConfig:
    """Builds the model config from GGUF metadata (llama.cpp key names)."""
    arch = gguf_field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported: servelm loads GGUF files of "
            f"{sorted(GGUF_ARCHITECTURES)} (convert others to a Hugging Face directory)"
        )
    model_type, class_name = GGUF_ARCHITECTURES[arch]

    def required(key: str) -> Any:
        value = gguf_field(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"{path!r}: GGUF metadata lacks {arch}.{key}; the file is incomplete")
        return value

    tensors = {t.name: t for t in reader.tensors}
    hidden = int(required("embedding_length"))
    num_heads = int(required("attention.head_count"))
    num_kv_heads = gguf_field(reader, f"{arch}.attention.head_count_kv", num_heads)
    if isinstance(num_kv_heads, list):  # per-layer counts; servelm needs them uniform
        if len(set(num_kv_heads)) != 1:
            raise ValueError(
                f"{path!r}: per-layer KV head counts {sorted(set(num_kv_heads))} are not supported"
            )
        num_kv_heads = num_kv_heads[0]
    head_dim = gguf_field(reader, f"{arch}.attention.key_length")
    if head_dim is None and arch == "llama":
        head_dim = gguf_field(reader, f"{arch}.rope.dimension_count")
    head_dim = int(head_dim) if head_dim is not None else hidden // num_heads
    if "token_embd.weight" in tensors:
        vocab_size = int(tensors["token_embd.weight"].shape[1])  # ne order: [hidden, vocab]
    else:
        vocab_size = int(required("vocab_size"))
    rope_theta = float(gguf_field(reader, f"{arch}.rope.freq_base", 10000.0))

    experts = int(gguf_field(reader, f"{arch}.expert_count", 0) or 0)
    expert_ffn = gguf_field(reader, f"{arch}.expert_feed_forward_length")
    moe: dict[str, Any] = {}
    if experts:
        if arch == "llama":  # llama.cpp writes Mixtral as a Llama with experts
            model_type, class_name = "mixtral", "MixtralForCausalLM"
            moe["num_local_experts"] = experts
        else:
            moe["num_experts"] = experts
            moe["moe_intermediate_size"] = int(expert_ffn if expert_ffn is not None
                                               else required("feed_forward_length"))
            moe["shared_expert_intermediate_size"] = int(gguf_field(
                reader, f"{arch}.expert_shared_feed_forward_length", 0) or 0)
            # expert_weights_norm where written; else Qwen3-MoE renormalises its top-k weights
            # and Qwen1.5/2-MoE do not (their releases' norm_topk_prob, as llama.cpp assumes)
            moe["norm_topk_prob"] = bool(gguf_field(reader, f"{arch}.expert_weights_norm",
                                                    arch == "qwen3moe"))
        moe["num_experts_per_tok"] = int(required("expert_used_count"))
    ffn = gguf_field(reader, f"{arch}.feed_forward_length")
    if ffn is None and expert_ffn is not None:  # (only expert layers)
        ffn = expert_ffn
    kwargs: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [class_name],
        "hidden_size": hidden,
        "num_hidden_layers": int(required("block_count")),
        "intermediate_size": int(ffn if ffn is not None else required("feed_forward_length")),
        **moe,
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(num_kv_heads),
        "head_dim": head_dim,
        "vocab_size": vocab_size,
        "max_position_embeddings": int(gguf_field(reader, f"{arch}.context_length", 4096)),
        "rms_norm_eps": float(gguf_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": rope_theta,
        # llama.cpp writes no output.weight when the LM head is the embedding matrix
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    rope_scaling = _gguf_rope_scaling(reader, arch, tensors, head_dim, rope_theta, path)
    if rope_scaling is not None:
        kwargs["rope_scaling"] = rope_scaling
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("pad_token_id", "padding_token_id")):
        value = gguf_field(reader, f"tokenizer.ggml.{gguf_key}")
        if value is not None:
            kwargs[hf_key] = int(value)
    # End-of-turn/-message ids (e.g. Llama 3's <|eot_id|>) also end generation; kept here so
    # load_generation_eos_ids need not parse the file again.
    eog = (gguf_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom"))
    kwargs["eog_token_ids"] = [int(i) for i in dict.fromkeys(eog) if i is not None]
    return ArchConfig(**kwargs, name_or_path=path)


def _gguf_rope_scaling(
    reader: GGUFFile, arch: str, tensors: dict[str, GGUFTensorInfo], head_dim: int,
    rope_theta: float, path: str
) -> dict[str, Any] | None:
    scaling_type = gguf_field(reader, f"{arch}.rope.scaling.type")
    factor = gguf_field(reader, f"{arch}.rope.scaling.factor")
    orig_ctx = gguf_field(reader, f"{arch}.rope.scaling.original_context_length")
    if "rope_freqs.weight" in tensors:
        info = tensors["rope_freqs.weight"]
        gguf = require_module("gguf", "gguf", "reading llama3 rope scaling from a GGUF file")
        divisors = gguf.quants.dequantize(reader.tensor_data(info),
                                         gguf.GGMLQuantizationType(info.tensor_type))
        return _llama3_scaling_from_rope_freqs(divisors, head_dim, rope_theta, orig_ctx, path)
    if scaling_type in (None, "none") or factor is None or float(factor) == 1.0:
        return None
    if scaling_type == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if scaling_type == "yarn" and orig_ctx is not None:
        return {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": int(orig_ctx)}
    raise ValueError(
        f"{path!r}: GGUF rope scaling {scaling_type!r} is not supported (linear, yarn and llama3 are)"
    )


def _llama3_scaling_from_rope_freqs(
    divisors: np.ndarray, head_dim: int, rope_theta: float, orig_ctx: int | None, path: str
) -> dict[str, Any]:
    """llama.cpp stores Llama 3.1+ rope scaling as per-frequency divisors (`rope_freqs.weight`,
    [head_dim // 2]) instead of its parameters. Every Llama 3.x uses low/high freq factors 1 and 4
    and an original context of 8192, so recover the factor and check the divisors match."""
    divisors = np.asarray(divisors, dtype=np.float64).ravel()
    factor, low, high = float(divisors.max()), 1.0, 4.0
    orig = int(orig_ctx) if orig_ctx else 8192
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (orig / wavelen - low) / (high - low)
    expected = np.where(
        wavelen < orig / high, 1.0,
        np.where(wavelen > orig / low, factor, 1.0 / ((1 - smooth) / factor + smooth)),
    )
    if expected.shape != divisors.shape or not np.allclose(expected, divisors, rtol=1e-3):
        raise ValueError(f"{path!r}: rope_freqs.weight is not llama3 rope scaling; this GGUF is not supported")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": orig}
