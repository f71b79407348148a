"""Llama-family decoder (Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2 with QKV bias, Qwen3 with
q/k RMSNorm), written with servelm's layers over a flat ragged batch of tokens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from servelm.attention.backend import AttentionBackend, AttentionMetadata
from servelm.distributed import ParallelGroup
from servelm.layers.embedding import VocabParallelEmbedding
from servelm.layers.linear import Linear
from servelm.layers.norm import RMSNorm
from servelm.layers.rotary import RotaryEmbedding
from servelm.loader.config import rope_parameters
from servelm.quantization.gguf import GGUFWeight
from servelm.quantization.unquantized import UnquantizedLinearMethod, dense_linear


@dataclass(frozen=True)
class LayerOptions:
    """What every layer of one model is built with."""

    backend: AttentionBackend
    use_kernels: bool = False
    quantization: Any = None  # servelm.quantization.QuantConfig, or None (dense)
    tp: ParallelGroup = ParallelGroup()

    def linear(self, prefix: str, input_size: int, output_sizes, bias: bool = False,
               parallel: str = "replicated", part_shards=None) -> Linear:
        return Linear(input_size, output_sizes, bias, quantization=self.quantization,
                      prefix=prefix, use_kernel=self.use_kernels, tp=self.tp, parallel=parallel,
                      part_shards=part_shards)


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
    sliding_window: int = 0  # Mistral's (every layer); 0: full attention

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
            qkv_bias=(model_type in ("qwen2", "qwen2_moe")
                      or bool(getattr(c, "attention_bias", False))),
            qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            sliding_window=(int(getattr(c, "sliding_window", None) or 0)
                            if model_type in ("mistral", "mixtral") else 0))


class LlamaAttention(nn.Module):
    def __init__(self, a: LlamaArgs, o: LayerOptions, prefix: str, window: int = -1,
                 softcap: float = 0.0, scale: float = 0.0, rope: dict | None = None) -> None:
        """window (-1: the model's, ``a.sliding_window``), softcap, scale (0: head_dim ** -0.5)
        and rope (the rope parameters; None: the model's): a family's per-layer variants."""
        super().__init__()
        self.window = a.sliding_window if window < 0 else window
        self.softcap = softcap
        if (self.window or softcap) and not o.backend.supports_window_softcap:
            raise ValueError(f"this model needs sliding-window attention or logit soft-capping, "
                             f"which the {o.backend.name!r} attention backend does not do yet: "
                             "use attention_backend='torch'.")
        ws, use_kernels = o.tp.world_size, o.use_kernels
        # this rank's heads: q/k/v are column-parallel by heads, o_proj row-parallel; with
        # fewer KV heads than ranks each rank holds the one KV head its query heads read
        # (ranks r * kv // ws share it: KV replicated)
        kv_shards = min(a.num_kv_heads, ws)
        self.num_heads, self.num_kv_heads = a.num_heads // ws, a.num_kv_heads // kv_shards
        self.head_dim = a.head_dim
        self.q_size, self.kv_size = self.num_heads * a.head_dim, self.num_kv_heads * a.head_dim
        full_q, full_kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        self.qkv_proj = o.linear(f"{prefix}.qkv_proj", a.hidden_size, [full_q, full_kv, full_kv],
                                 bias=a.qkv_bias, parallel="column",
                                 part_shards=[ws, kv_shards, kv_shards])
        self.o_proj = o.linear(f"{prefix}.o_proj", full_q, a.hidden_size, parallel="row")
        self.q_norm = RMSNorm(a.head_dim, a.rms_norm_eps, use_kernels) if a.qk_norm else None
        self.k_norm = RMSNorm(a.head_dim, a.rms_norm_eps, use_kernels) if a.qk_norm else None
        rope = rope or a.rope_scaling
        self.rotary = RotaryEmbedding(a.head_dim, a.max_position, float(rope["rope_theta"]), rope,
                                      use_kernels)
        self.backend = o.backend
        self.scale = scale or a.head_dim ** -0.5

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self._qkv(x)
        k_cache, v_cache = kv_cache
        # q, k, v may be strided views of the qkv output: the kernels take strides
        q, k = self.backend.rotate_and_write_kv(self.rotary, positions, q, k, v, k_cache, v_cache,
                                                meta.slot_mapping)
        o = self.backend.forward(q, k, v, k_cache, v_cache, meta, self.scale,
                                 window=self.window, softcap=self.softcap)  # [T, H, D]
        if meta.kv_scores is not None:  # h2o: the attention its keys received, per slot
            from servelm.kv_eviction.scores import accumulate_scores
            accumulate_scores(q, k_cache, meta, self.scale, meta.kv_scores, self.softcap)
        return self.o_proj(o.reshape(T, self.q_size))

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [T, hidden] -> q [T, H, D], k/v [T, KVH, D] (per-head norms applied)."""
        T = x.shape[0]
        q, kv = self.qkv_proj(x).split([self.q_size, 2 * self.kv_size], dim=-1)
        q = q.reshape(T, self.num_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(T, self.num_heads, self.head_dim)
        return (q, *self._kv_heads(kv))

    def _kv_heads(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """kv: [T, 2 * kv_size] (k | v) -> k, v [T, KVH, D], the per-head norm applied to k."""
        T = kv.shape[0]
        k, v = kv.split([self.kv_size, self.kv_size], dim=-1)
        k = k.reshape(T, self.num_kv_heads, self.head_dim)
        if self.k_norm is not None:
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(T, self.num_kv_heads, self.head_dim)
        return k, v.reshape(T, self.num_kv_heads, self.head_dim)

    def propagate_kv(self, positions: torch.Tensor, x: torch.Tensor,
                     kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> None:
        """Early exit: write this layer's K and V of tokens whose (normed) input is x, with no
        attention (early_exit/forward.py). Where the merged projection is dense only its k and
        v rows are read (Llama-3-8B: 8 of its 25 M parameters a layer); the rotary paths take
        a q, so a one-head scratch one rides along."""
        p = self.qkv_proj
        if isinstance(p.method, UnquantizedLinearMethod):
            k, v = self._kv_heads(dense_linear(
                x, p.weight[self.q_size:], None if p.bias is None else p.bias[self.q_size:],
                p.method.use_kernel))
            q = x.new_empty(x.shape[0], 1, self.head_dim)
        else:
            q, k, v = self._qkv(x)
        self.backend.rotate_and_write_kv(self.rotary, positions, q, k, v, *kv_cache,
                                         meta.slot_mapping)


class LlamaMLP(nn.Module):
    def __init__(self, a: LlamaArgs, o: LayerOptions, prefix: str,
                 intermediate_size: int = 0) -> None:
        super().__init__()
        inter = intermediate_size or a.intermediate_size  # (a MoE's shared expert: its own)
        self.gate_up_proj = o.linear(f"{prefix}.gate_up_proj", a.hidden_size, [inter] * 2,
                                     parallel="column")
        self.down_proj = o.linear(f"{prefix}.down_proj", inter, a.hidden_size, parallel="row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [T, hidden] -> gate | up [T, 2I] -> down(silu(gate) * up) [T, hidden]; the down
        # projection's method may compute the activation as it loads its input
        return self.down_proj.forward_silu_mul(self.gate_up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, a: LlamaArgs, o: LayerOptions, prefix: str, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(a, o, f"{prefix}.self_attn")
        self.mlp = mlp  # [T, hidden] -> [T, hidden]: dense, or a mixture of experts
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps, o.use_kernels)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps, o.use_kernels)

    def forward(self, positions, x, residual, kv_cache, meta):
        # residual carries the un-normalised stream; the first layer starts it
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, kv_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual

    def propagate_kv(self, positions, state, kv_cache, meta) -> None:
        """Early exit: this layer's KV from the residual stream ``state`` of exited tokens."""
        self.self_attn.propagate_kv(positions, self.input_layernorm(state), kv_cache, meta)


def stage_layers(num_layers: int, pp: ParallelGroup) -> tuple[int, int]:
    """[start, end) of pipeline stage pp.rank's layers: equal shares, the first
    num_layers % stages stages one more."""
    n, extra = divmod(num_layers, pp.world_size)
    start = pp.rank * n + min(pp.rank, extra)
    return start, start + n + (pp.rank < extra)


class LlamaForCausalLM(nn.Module):
    # checkpoint projection name -> (merged module name, part index)
    _merged = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
               "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, hf_config: Any, backend: AttentionBackend, use_kernels: bool = False,
                 quantization: Any = None, tp: ParallelGroup = ParallelGroup(),
                 pp: ParallelGroup = ParallelGroup()) -> None:
        super().__init__()
        a = self.args = LlamaArgs.from_hf(hf_config)
        o = LayerOptions(backend, use_kernels, quantization, tp)
        self.tp, self.pp = tp, pp
        # pipeline stage pp.rank holds layers [start, end) (the first stages one more when the
        # layers do not split evenly), the first stage the embedding, the last the norm and
        # the head; the other layers are placeholders that keep the checkpoint's indices
        self.first_stage, self.last_stage = pp.rank == 0, pp.rank == pp.world_size - 1
        self.start, self.end = stage_layers(a.num_layers, pp)
        # [V / ws, hidden] on each rank (vocab-parallel), and under a tied head its shard of
        # the logits
        self.embed_tokens = (VocabParallelEmbedding(a.vocab_size, a.hidden_size, tp)
                             if self.first_stage else nn.Identity())
        self.layers = nn.ModuleList(self.build_layer(hf_config, o, i)
                                    if self.start <= i < self.end else nn.Identity()
                                    for i in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps, use_kernels) if self.last_stage else None
        # the head is dense (vLLM's default) unless the QuantConfig quantizes it; a tied head is
        # the embedding itself, or a quantized copy of it (or, on a last stage without the
        # embedding, a copy of it)
        tied = a.tie_word_embeddings
        head_q = quantization if quantization is not None and quantization.quantized_head(tied) else None
        # column-parallel over the vocabulary: each rank computes its logits, gathered after
        own_head = not tied or head_q is not None or not self.first_stage
        self.lm_head = (Linear(a.hidden_size, a.vocab_size, quantization=head_q, prefix="lm_head",
                               use_kernel=use_kernels, tp=tp, parallel="column")
                        if self.last_stage and own_head else None)
        self.use_kernels = use_kernels
        self.quantization = quantization

    embed_scale: float = 0.0  # a family's embedding multiplier (Gemma: sqrt(hidden)); 0: none

    def build_layer(self, hf_config: Any, o: LayerOptions, layer: int) -> nn.Module:
        """Decoder layer ``layer`` (a subclass's may differ in layout)."""
        return LlamaDecoderLayer(self.args, o, f"layers.{layer}",
                                 self.build_mlp(hf_config, o, layer))

    def build_mlp(self, hf_config: Any, o: LayerOptions, layer: int) -> nn.Module:
        """Layer ``layer``'s feed-forward block (a subclass's may be a mixture of experts)."""
        return LlamaMLP(self.args, o, f"layers.{layer}.mlp")

    def rename(self, name: str) -> str:
        """A checkpoint tensor's name (without "model.") as this model's modules call it."""
        return name

    def load_special(self, name: str, tensor: torch.Tensor) -> list[str]:
        """The loaded-keys of a checkpoint tensor this model loads itself (a subclass's
        experts), or [] for the common path."""
        return []

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden] after the final norm; on a
        pipeline stage before the last, None (its hidden states and residual go to the next
        stage). kv_caches: this stage's layers' only."""
        if self.first_stage:
            x, residual = self.embed_tokens(input_ids), None
            if self.embed_scale:
                x = x * self.embed_scale
        else:  # [T, hidden] twice from the stage before
            T, H = input_ids.shape[0], self.args.hidden_size
            dtype = torch.get_default_dtype() if self.norm is None else self.norm.weight.dtype
            x = self.pp.recv(torch.empty(T, H, dtype=dtype, device=input_ids.device),
                             self.pp.rank - 1)
            residual = self.pp.recv(torch.empty_like(x), self.pp.rank - 1)
        for layer, kv in zip(self.layers[self.start:self.end], kv_caches):
            x, residual = layer(positions, x, residual, kv, meta)
        if not self.last_stage:
            self.pp.send(x, self.pp.rank + 1)
            self.pp.send(x if residual is None else residual, self.pp.rank + 1)
            return None
        x, _ = self.norm(x, residual)
        return x

    @property
    def num_stage_layers(self) -> int:
        return self.end - self.start

    def _on_this_stage(self, name: str) -> bool:
        """Whether checkpoint tensor ``name`` (without "model.") has a place on this stage."""
        if name.startswith("layers."):
            return self.start <= int(name.split(".", 2)[1]) < self.end
        if name.startswith("norm."):
            return self.last_stage
        if name.startswith("lm_head."):
            return self.last_stage
        if name.startswith("embed_tokens."):  # a last stage's tied head copies it
            return self.first_stage or (self.last_stage and self.lm_head is not None)
        return True

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> logits [N, vocab] in fp32 (every rank: all of them)."""
        if self.lm_head is None:
            part = dense_linear(hidden, self.embed_tokens.weight, use_kernel=self.use_kernels)
        else:
            part = self.lm_head(hidden)
        # [N, V / ws] per rank -> [N, V], gathered in the model dtype (half the bytes of fp32;
        # the cast after the gather gives the same values)
        return self.tp.all_gather(part, dim=-1).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors in; every parameter (every part of a merged one) must be filled
        exactly once. Linear layers take theirs through their LinearMethod."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = self.rename(name.removeprefix("model."))
            if "rotary_emb" in name:
                continue
            if not self._on_this_stage(name):
                continue
            special = self.load_special(name, tensor)
            if special:
                loaded.update(special)
                continue
            if name == "lm_head.weight" and self.args.tie_word_embeddings:
                continue  # tied: the embedding serves as the head (or its quantized copy)
            if name == "embed_tokens.weight" and self.args.tie_word_embeddings and self.lm_head is not None:
                keep = getattr(self.quantization, "tied_head_blocks", ())
                self.lm_head.load_weight("weight", tensor if not isinstance(tensor, GGUFWeight)
                                         or tensor.ggml_type in keep else tensor.dequantize())
                loaded.add("lm_head.weight#0")
            if name == "embed_tokens.weight":
                if not self.first_stage:
                    continue  # (the tied head's copy taken above)
                if isinstance(tensor, GGUFWeight):  # GGUF blocks: the lookup table is dense
                    tensor = tensor.dequantize(torch.float32)
                self.embed_tokens.load_weight(tensor)
                loaded.add(name)
                continue
            mod_name, _, pname = name.rpartition(".")
            shard_id = 0
            head, _, proj = mod_name.rpartition(".")
            if proj in self._merged:
                merged, shard_id = self._merged[proj]
                mod_name = f"{head}.{merged}"
            try:
                module = self.get_submodule(mod_name)
            except AttributeError:
                module = None
            if isinstance(module, Linear):
                module.load_weight(pname, tensor, shard_id)
                loaded.add(f"{mod_name}.{pname}#{shard_id}")
                continue
            if name not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            if params[name].shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"model expects {tuple(params[name].shape)}")
            params[name].data.copy_(tensor)
            loaded.add(name)
        expected = set()
        for mod_name, mod in self.named_modules():
            if isinstance(mod, Linear):
                expected.update(f"{mod_name}.{p}#{i}" for p in mod.method.checkpoint_names
                                for i in range(mod.num_parts))
            elif hasattr(mod, "checkpoint_keys"):  # loaded through load_special
                expected.update(mod.checkpoint_keys(mod_name))
            else:
                expected.update(f"{mod_name}.{p}" if mod_name else p
                                for p, _ in mod.named_parameters(recurse=False))
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:4]}")
