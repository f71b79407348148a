"""Gemma 2 and Gemma 3 (text) decoders: interleaved sliding-window and global attention layers
(``layer_types``), RMSNorm scaling by (1 + weight), four norms a layer (around attention and
around the MLP), the embedding scaled by sqrt(hidden), a GeLU(tanh)-gated MLP, the attention
scale query_pre_attn_scalar ** -0.5; Gemma 2 soft-caps attention scores and the final logits,
Gemma 3 normalises q and k per head and gives its local and global layers their own rope."""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from servelm.layers.norm import RMSNorm
from servelm.loader.config import rope_parameters
from servelm.models.llama import LayerOptions, LlamaAttention, LlamaForCausalLM

logger = logging.getLogger(__name__)


class GemmaMLP(nn.Module):
    def __init__(self, a, o: LayerOptions, prefix: str) -> None:
        super().__init__()
        self.gate_up_proj = o.linear(f"{prefix}.gate_up_proj", a.hidden_size,
                                     [a.intermediate_size] * 2, parallel="column")
        self.down_proj = o.linear(f"{prefix}.down_proj", a.intermediate_size, a.hidden_size,
                                  parallel="row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [T, hidden] -> gelu_tanh(gate) * up [T, I] -> [T, hidden]
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


def layer_rope(c: Any, layer_type: str) -> dict:
    """Gemma 3's rope parameters are per layer type (local layers a base of 10000, global ones
    1e6 and maybe linear scaling); Gemma 2's one set serves every layer."""
    params = getattr(c, "rope_parameters", None)
    if isinstance(params, dict) and layer_type in params:
        out = dict(params[layer_type])
        out.setdefault("rope_type", out.pop("type", "default"))
        return out
    if getattr(c, "model_type", "") == "gemma3_text" and layer_type == "sliding_attention":
        # transformers 4's Gemma 3 configs: rope_local_base_freq for the local layers
        return {"rope_type": "default",
                "rope_theta": float(getattr(c, "rope_local_base_freq", 10000.0))}
    return rope_parameters(c)


def layer_types(c: Any) -> list[str]:
    types = getattr(c, "layer_types", None)
    if types:
        return list(types)
    if getattr(c, "model_type", "") == "gemma2":  # older configs: even layers local
        return ["sliding_attention" if i % 2 == 0 else "full_attention"
                for i in range(c.num_hidden_layers)]
    pattern = int(getattr(c, "sliding_window_pattern", None)
                  or getattr(c, "_sliding_window_pattern", 6))
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(c.num_hidden_layers)]


class GemmaDecoderLayer(nn.Module):
    def __init__(self, c: Any, a, o: LayerOptions, i: int) -> None:
        super().__init__()
        kind = layer_types(c)[i]
        if kind not in ("sliding_attention", "full_attention"):
            raise ValueError(f"layer {i} has layer type {kind!r}; Gemma layers are "
                             "'sliding_attention' or 'full_attention'.")
        window = int(c.sliding_window or 0) if kind == "sliding_attention" else 0
        self.self_attn = LlamaAttention(
            a, o, f"layers.{i}.self_attn", window=window,
            softcap=float(getattr(c, "attn_logit_softcapping", None) or 0.0),
            scale=float(c.query_pre_attn_scalar) ** -0.5, rope=layer_rope(c, kind))
        self.mlp = GemmaMLP(a, o, f"layers.{i}.mlp")
        norm = lambda: RMSNorm(a.hidden_size, a.rms_norm_eps, o.use_kernels)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()

    def forward(self, positions, x, residual, kv_cache, meta):
        # x: the block's input [T, hidden]; residual: the stream before it (None: x is the
        # stream). Returns (this block's output, the stream it adds to), as Llama's layers do.
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(positions, x, kv_cache, meta))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual

    def propagate_kv(self, positions, state, kv_cache, meta) -> None:
        """Early exit: this layer's KV from the residual stream ``state`` of exited tokens."""
        self.self_attn.propagate_kv(positions, self.input_layernorm(state), kv_cache, meta)


# a multimodal checkpoint's tensors that text-only serving does not load
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.")


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma2ForCausalLM, Gemma3ForCausalLM (text)."""

    def __init__(self, hf_config: Any, *args, **kwargs) -> None:
        act = getattr(hf_config, "hidden_activation", None) or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"hidden_activation={act!r} is not supported for Gemma; "
                             "supported: gelu_pytorch_tanh.")
        super().__init__(hf_config, *args, **kwargs)
        # sqrt(hidden) in the model dtype, as transformers rounds it
        self.embed_scale = float(torch.tensor(self.args.hidden_size ** 0.5,
                                              dtype=torch.get_default_dtype()))
        self.final_softcap = float(getattr(hf_config, "final_logit_softcapping", None) or 0.0)
        mm = getattr(hf_config, "multimodal_architecture", None)
        if mm is not None:
            logger.info("%s checkpoint: serving its language model (text only; the vision "
                        "tower is not loaded)", mm)

    def build_layer(self, hf_config: Any, o: LayerOptions, i: int) -> nn.Module:
        return GemmaDecoderLayer(hf_config, self.args, o, i)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def rename(self, name: str) -> str:
        # a multimodal checkpoint (Gemma3ForConditionalGeneration): its language model's
        # tensors under language_model.(model.)
        if name.startswith("language_model."):
            return name[len("language_model."):].removeprefix("model.")
        return name

    def load_special(self, name: str, tensor: torch.Tensor) -> list[str]:
        if name.startswith(_VISION_PREFIXES):  # served text-only: the image path stays unloaded
            return [name]
        # Gemma's RMSNorm scales by (1 + weight): stored here as 1 + weight, so the common
        # norm kernel applies it
        if name.endswith("norm.weight"):
            param = self.get_parameter(name)
            if param.shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"model expects {tuple(param.shape)}")
            param.data.copy_(tensor.float() + 1.0)
            return [name]
        return []
