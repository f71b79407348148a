"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE (with its gated shared expert) and Qwen3-MoE.
Attention, norms, embedding and head are the Llama family's (models/llama.py: Qwen2-MoE has
its QKV bias, Qwen3-MoE its q/k norms); the feed-forward block of a sparse layer routes each
token to its top-k experts (layers/fused_moe.py), which Qwen's ``decoder_sparse_step`` and
``mlp_only_layers`` leave dense on some layers."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from servelm.layers.fused_moe import EXPERT_PARTS, FusedMoE, select_experts
from servelm.models.llama import LayerOptions, LlamaForCausalLM, LlamaMLP

# layers.{i}.mlp.experts.{e}.{part}.weight (per-expert checkpoints), or transformers 5's stacked
# layers.{i}.mlp.experts.{gate_up_proj|down_proj}
logger = logging.getLogger(__name__)

_PER_EXPERT = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\.weight$")
# or GGUF's stacked layers.{i}.mlp.experts.{gate_proj|up_proj|down_proj}.weight
_STACKED = re.compile(
    r"^(layers\.\d+\.mlp\.experts)\.(gate_up_proj|gate_proj|up_proj|down_proj)(?:\.weight)?$")


@dataclass(frozen=True)
class MoEArgs:
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    renormalize: bool  # the top-k weights rescaled to sum to 1
    shared_expert_intermediate_size: int  # 0: none
    sparse_step: int  # layer i is sparse when (i + 1) % sparse_step == 0 ...
    dense_layers: frozenset  # ... and i is not one of these

    @staticmethod
    def from_hf(c: Any) -> "MoEArgs":
        mixtral = getattr(c, "model_type", "") == "mixtral"
        E = getattr(c, "num_local_experts" if mixtral else "num_experts", 0) or 0
        k = getattr(c, "num_experts_per_tok", 0) or 0
        if E < 1:
            raise ValueError(f"a mixture-of-experts config needs num_experts >= 1, got {E}.")
        if not 1 <= k <= E:
            raise ValueError(f"num_experts_per_tok must be in [1, num_experts={E}], got {k}.")
        step = 1 if mixtral else int(getattr(c, "decoder_sparse_step", 1) or 1)
        if step < 1:
            raise ValueError(f"decoder_sparse_step must be >= 1, got {step}.")
        return MoEArgs(
            num_experts=E, top_k=k,
            expert_intermediate_size=(c.intermediate_size if mixtral
                                      else c.moe_intermediate_size),
            renormalize=True if mixtral else bool(getattr(c, "norm_topk_prob", False)),
            shared_expert_intermediate_size=(
                0 if mixtral else int(getattr(c, "shared_expert_intermediate_size", 0) or 0)),
            sparse_step=step,
            dense_layers=frozenset(() if mixtral else getattr(c, "mlp_only_layers", ()) or ()))

    def is_sparse(self, layer: int) -> bool:
        return layer not in self.dense_layers and (layer + 1) % self.sparse_step == 0


class SparseMoeBlock(nn.Module):
    """[T, hidden] -> [T, hidden]: the routed experts' weighted sum, plus (Qwen2-MoE) the shared
    expert scaled by sigmoid(shared_expert_gate(x)) per token."""

    def __init__(self, m: MoEArgs, a, o: LayerOptions, prefix: str) -> None:
        super().__init__()
        self.top_k, self.renormalize, self.tp = m.top_k, m.renormalize, o.tp
        # the router: [E, hidden], replicated on every rank (every rank routes alike)
        self.gate = nn.Linear(a.hidden_size, m.num_experts, bias=False)
        # quantized experts: int8 / fp8 rows converted at load (others refused there); a GGUF
        # file's experts are dequantized as they load (its other linears may keep blocks)
        method = o.quantization.method if o.quantization is not None else None
        if method is not None and getattr(o.quantization, "prequantized", False):
            raise ValueError(f"this {method} checkpoint holds pre-quantized weights, which "
                             "servelm's mixture-of-experts layers do not load yet: use the "
                             f"dense checkpoint with quantization={method!r} (converted at "
                             "load).")
        self.experts = FusedMoE(m.num_experts, a.hidden_size, m.expert_intermediate_size,
                                o.use_kernels, o.tp, f"{prefix}.experts",
                                None if method == "gguf" else method)
        self.shared_expert = self.shared_expert_gate = None
        if m.shared_expert_intermediate_size:
            self.shared_expert = LlamaMLP(a, o, f"{prefix}.shared_expert",
                                          m.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(a.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)  # [T, E]
        if self.experts.use_kernels:  # one launch; the weights stay fp32 into the kernel
            from servelm.kernels.fused_moe import route_topk
            weights, ids = route_topk(logits, self.top_k, self.renormalize)
        else:  # (rounded to the model dtype, as transformers' Qwen-MoE blocks do)
            weights, ids = select_experts(logits, self.top_k, self.renormalize)
            weights = weights.to(x.dtype)
        # the experts' partial sums over this rank's intermediate slice, summed over ranks
        y = self.tp.all_reduce(self.experts(x, weights, ids))
        if self.shared_expert is not None:  # (its down projection all-reduces itself)
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y


class MoEForCausalLM(LlamaForCausalLM):
    """MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM."""

    def build_mlp(self, hf_config: Any, o: LayerOptions, layer: int) -> nn.Module:
        m = MoEArgs.from_hf(hf_config)
        q = o.quantization
        if (layer == self.start and q is not None and q.method in ("int8", "fp8")
                and getattr(q, "group_size", -1) not in (None, -1)):
            logger.info("quantization_group_size=%s applies to the dense layers; the experts "
                        "take one scale per output row", q.group_size)
        if m.is_sparse(layer):
            return SparseMoeBlock(m, self.args, o, f"layers.{layer}.mlp")
        return LlamaMLP(self.args, o, f"layers.{layer}.mlp")

    def rename(self, name: str) -> str:
        # Mixtral's checkpoints name the block block_sparse_moe
        return name.replace(".block_sparse_moe.", ".mlp.", 1)

    def load_special(self, name: str, tensor: torch.Tensor) -> list[str]:
        if name.endswith("shared_expert_gate.weight") and tensor.dim() == 1:
            # GGUF stores the shared expert's gate [1, H] as a vector
            self.get_parameter(name).data.copy_(tensor.view(1, -1))
            return [name]
        m = _PER_EXPERT.match(name)
        if m is not None and m.group(3) in EXPERT_PARTS:
            experts, e, part = m.group(1), int(m.group(2)), EXPERT_PARTS[m.group(3)]
            self._experts(experts, name).load_expert(e, part, tensor)
            return [f"{experts}.{e}.{part}"]
        m = _STACKED.match(name)
        if m is not None:
            experts = m.group(1)
            done = self._experts(experts, name).load_stacked(m.group(2), tensor)
            return [f"{experts}.{e}.{part}" for e, part in done]
        return []

    def _experts(self, mod_name: str, name: str) -> FusedMoE:
        try:
            mod = self.get_submodule(mod_name)
        except AttributeError:
            mod = None
        if not isinstance(mod, FusedMoE):
            raise ValueError(f"checkpoint tensor {name!r} has no place in this model (its "
                             "layer is not a mixture-of-experts layer here).")
        return mod
