"""A light model config for presets and GGUF files: the fields servelm reads off a transformers
`PretrainedConfig`, with the same names and defaults, so the dummy and GGUF paths never import
transformers (its import costs 1-14 s at start-up; measured in benchmarks/NOTES.md).

The engine reads configs only through attributes (`config.hidden_size`, `getattr(config,
"sliding_window", None)`, `rope_parameters(config)`), so a Hugging Face directory's
`PretrainedConfig` and an `ArchConfig` are interchangeable for it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

TokenIds = Optional[Union[int, list[int]]]


@dataclass(frozen=True)
class ArchConfig:
    """Shape and variant switches of a decoder-only model (Llama-family names and defaults).

    num_key_value_heads defaults to num_attention_heads and head_dim to
    hidden_size // num_attention_heads, as transformers fills them in. Read-only: derive variants
    with `dataclasses.replace`. Lists and dicts inside are the caller's to leave alone.
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    model_type: str = "llama"
    architectures: list[str] = field(default_factory=list)
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # transformers 4 style: {"rope_type", "factor", ...} without rope_theta (see rope_parameters)
    rope_scaling: Optional[dict[str, Any]] = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: Optional[int] = None
    use_sliding_window: bool = False
    bos_token_id: TokenIds = None
    eos_token_id: TokenIds = None
    pad_token_id: TokenIds = None
    # end-of-turn/-message ids that also end generation (GGUF: eos, eot, eom), deduplicated
    eog_token_ids: list[int] = field(default_factory=list)
    # mixtures of experts (models/moe.py): Mixtral's num_local_experts, Qwen's num_experts, ...
    num_local_experts: int = 0
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    torch_dtype: Optional[str] = None
    name_or_path: str = ""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model config field {name} must be a positive integer, got {value!r}")
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple "
                             f"of num_key_value_heads ({self.num_key_value_heads})")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ArchConfig":
        """From config.json-style keys; unknown keys are an error (they would be silently dropped)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"model config keys {unknown} are not known to servelm's ArchConfig "
                             f"(known: {sorted(known)})")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """A deep copy of every field, as transformers' `PretrainedConfig.to_dict` gives its own."""
        return dataclasses.asdict(self)
