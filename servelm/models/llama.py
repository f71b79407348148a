"""Llama-family decoder (Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2 with QKV bias, Qwen3 with
q/k RMSNorm), written with servelm's layers over a flat ragged batch of tokens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from servelm.attention.backend import AttentionBackend, AttentionMetadata
from servelm.layers.activation import silu_and_mul
from servelm.layers.linear import Linear, MergedLinear, linear
from servelm.layers.norm import RMSNorm
from servelm.layers.rotary import RotaryEmbedding
from servelm.loader.config import rope_parameters


@dataclass(frozen=True)
class LlamaArgs:
    """The shape and variant switches read off a HF config."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    max_position: int
    rope_theta: float
    rope_scaling: dict
    qkv_bias: bool  # Qwen2
    qk_norm: bool  # Qwen3
    tie_word_embeddings: bool

    @staticmethod
    def from_hf(c: Any) -> "LlamaArgs":
        model_type = getattr(c, "model_type", "llama")
        rope = rope_parameters(c)
        heads = c.num_attention_heads
        return LlamaArgs(
            hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_layers=c.num_hidden_layers, num_heads=heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
            vocab_size=c.vocab_size, rms_norm_eps=c.rms_norm_eps,
            max_position=getattr(c, "max_position_embeddings", 8192),
            rope_theta=float(rope["rope_theta"]), rope_scaling=rope,
            qkv_bias=model_type == "qwen2" or bool(getattr(c, "attention_bias", False)),
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)))


class LlamaAttention(nn.Module):
    def __init__(self, a: LlamaArgs, backend: AttentionBackend, use_kernels: bool) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        self.q_size, self.kv_size = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        self.qkv_proj = MergedLinear(a.hidden_size, [self.q_size, self.kv_size, self.kv_size],
                                     bias=a.qkv_bias, use_kernel=use_kernels)
        self.o_proj = Linear(self.q_size, a.hidden_size, use_kernel=use_kernels)
        self.q_norm = RMSNorm(a.head_dim, a.rms_norm_eps, use_kernels) if a.qk_norm else None
        self.k_norm = RMSNorm(a.head_dim, a.rms_norm_eps, use_kernels) if a.qk_norm else None
        self.rotary = RotaryEmbedding(a.head_dim, a.max_position, a.rope_theta, a.rope_scaling,
                                      use_kernels)
        self.backend = backend
        self.scale = a.head_dim ** -0.5

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        # x: [T, hidden] -> q [T, H, D], k/v [T, KVH, D]
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(T, self.num_heads, self.head_dim)
        k = k.reshape(T, self.num_kv_heads, self.head_dim)
        v = v.reshape(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(T, self.num_heads, self.head_dim)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(T, self.num_kv_heads, self.head_dim)
        if self.rotary.use_kernel:
            q, k = q.contiguous(), k.contiguous()
        q, k = self.rotary(positions, q, k)
        k_cache, v_cache = kv_cache
        self.backend.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        o = self.backend.forward(q, k, v, k_cache, v_cache, meta, self.scale)  # [T, H, D]
        return self.o_proj(o.reshape(T, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, a: LlamaArgs, use_kernels: bool) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(a.hidden_size, [a.intermediate_size] * 2,
                                         use_kernel=use_kernels)
        self.down_proj = Linear(a.intermediate_size, a.hidden_size, use_kernel=use_kernels)
        self.use_kernels = use_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x), self.use_kernels))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, a: LlamaArgs, backend: AttentionBackend, use_kernels: bool) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(a, backend, use_kernels)
        self.mlp = LlamaMLP(a, use_kernels)
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps, use_kernels)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps, use_kernels)

    def forward(self, positions, x, residual, kv_cache, meta):
        # residual carries the un-normalised stream; the first layer starts it
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, kv_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    # checkpoint projection name -> (merged module name, shard index)
    _merged = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
               "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, hf_config: Any, backend: AttentionBackend, use_kernels: bool = False) -> None:
        super().__init__()
        a = self.args = LlamaArgs.from_hf(hf_config)
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size, _weight=torch.empty(a.vocab_size, a.hidden_size))
        self.layers = nn.ModuleList(LlamaDecoderLayer(a, backend, use_kernels)
                                    for _ in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps, use_kernels)
        self.lm_head = None if a.tie_word_embeddings else Linear(a.hidden_size, a.vocab_size)
        self.use_kernels = use_kernels

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden] after the final norm."""
        x, residual = self.embed_tokens(input_ids), None
        for layer, kv in zip(self.layers, kv_caches):
            x, residual = layer(positions, x, residual, kv, meta)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> logits [N, vocab] in fp32."""
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return linear(hidden, w, use_kernel=self.use_kernels).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors in; every parameter must be filled exactly once."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding serves as the head
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in self._merged:
                merged, idx = self._merged[parts[-2]]
                mod_name = ".".join(parts[:-2] + [merged])
                self.get_submodule(mod_name).load_shard(idx, tensor, is_bias=parts[-1] == "bias")
                loaded.add(f"{mod_name}.{parts[-1]}#{idx}")
                continue
            if name not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            if params[name].shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"model expects {tuple(params[name].shape)}")
            params[name].data.copy_(tensor)
            loaded.add(name)
        expected = set()
        for pname, p in params.items():
            mod = pname.rsplit(".", 1)[0]
            sub = self.get_submodule(mod) if mod != pname else self
            if isinstance(sub, MergedLinear):
                expected.update(f"{pname}#{i}" for i in range(len(sub.offsets) - 1))
            else:
                expected.add(pname)
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:4]}")
