"""The routed experts of a mixture-of-experts layer: every expert's gate/up and down weights
stacked into two tensors, run by the fused grouped-GEMM kernel on GPUs (kernels/fused_moe.py)
or its PyTorch reference elsewhere. Under tensor parallelism each rank holds every expert's
slice of the intermediate dimension (gate/up rows, down columns), so the output is a partial
sum the caller all-reduces.

Quantized experts (``quant`` "int8" or "fp8", weight-only, converted at load): the weights
held as int8 or e4m3 with one fp32 scale per output row (``w13_scale`` [E, 2I], ``w2_scale``
[E, H]; a down row's scale spans the full row, so a tensor-parallel rank's slice is its part of
the one-rank weights); the kernel converts a tile to the activation dtype for the dot and
scales the accumulator's columns after it, the reference dequantizes first."""
from __future__ import annotations

from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from servelm.distributed import ParallelGroup, shard_range

# checkpoint names of an expert's three matrices -> (which, ...): Mixtral's w1/w3/w2 and the
# Qwen families' gate/up/down projections
EXPERT_PARTS = MappingProxyType({"gate_proj": "gate", "up_proj": "up", "down_proj": "down",
                                 "w1": "gate", "w3": "up", "w2": "down"})


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, k] fp32, expert ids [T, k]): softmax in fp32 over
    all experts, the top k, renormalised to sum to 1 when the family does (Mixtral always,
    Qwen-MoE by ``norm_topk_prob``)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


QUANT_METHODS = ("int8", "fp8")


def quantize_rows(w: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (int8 or e4m3 [N, K], fp32 scale [N]): symmetric, each row's max at the
    format's largest value (quantization/ref.py's per-row conversions)."""
    from servelm.quantization.ref import quantize_fp8_per_channel, quantize_int8
    if method == "fp8":
        return quantize_fp8_per_channel(w)
    q, s = quantize_int8(w.float(), w.shape[1])
    return q, s[:, 0]


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


def fused_experts_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                      topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                      w13_scale: torch.Tensor | None = None,
                      w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H]; w13 [E, 2I, H] (gate rows, then up rows); w2 [E, H, I]; topk_weights
    [T, k] (x's dtype or fp32); topk_ids [T, k] -> [T, H] in x's dtype: for each token, the sum
    over its k experts of weight * down(silu(gate(x)) * up(x)), summed in fp32. With scales
    ([E, 2I], [E, H]): w13 and w2 are quantized rows, dequantized to x's dtype here."""
    T, H = x.shape
    inter = w2.shape[2]
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.reshape(-1)
    for e in torch.unique(flat_ids).tolist():
        pos = (flat_ids == e).nonzero(as_tuple=True)[0]  # (token, choice) pairs routed to e
        tok = pos // topk_ids.shape[1]
        a, b = w13[e], w2[e]
        if w13_scale is not None:
            a, b = dequantize_rows(a, w13_scale[e], x.dtype), dequantize_rows(b, w2_scale[e], x.dtype)
        h = x[tok] @ a.t()  # [n, 2I]
        act = F.silu(h[:, :inter]) * h[:, inter:]
        y = (act @ b.t()).float() * topk_weights.reshape(-1)[pos, None].float()
        out.index_add_(0, tok, y)
    return out.to(x.dtype)


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 use_kernels: bool = False, tp: ParallelGroup = ParallelGroup(),
                 prefix: str = "", quant: str | None = None) -> None:
        super().__init__()
        if quant is not None and quant not in QUANT_METHODS:
            raise ValueError(f"quantization={quant!r} does not cover mixture-of-experts layers "
                             f"yet: use one of {list(QUANT_METHODS)} (experts converted at "
                             "load), or 'none'.")
        self.num_experts, self.hidden_size, self.quant = num_experts, hidden_size, quant
        self.tp, self.prefix, self.use_kernels = tp, prefix, use_kernels
        self.i_lo, self.i_hi = shard_range(intermediate_size, tp, f"{prefix} expert intermediate")
        inter = self.i_hi - self.i_lo
        wdt = {None: None, "int8": torch.int8, "fp8": torch.float8_e4m3fn}[quant]
        # w13: [E, 2 * I / ws, H] (this rank's gate rows, then its up rows); w2: [E, H, I / ws]
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden_size,
                                                   dtype=wdt), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, inter, dtype=wdt),
                                      requires_grad=False)
        self.w13_scale = self.w2_scale = None
        if quant is not None:  # one fp32 scale per output row
            self.w13_scale = nn.Parameter(torch.empty(num_experts, 2 * inter,
                                                      dtype=torch.float32), requires_grad=False)
            self.w2_scale = nn.Parameter(torch.empty(num_experts, hidden_size,
                                                     dtype=torch.float32), requires_grad=False)

    def checkpoint_keys(self, mod_name: str) -> set[str]:
        """What load_expert must have seen: each expert's gate, up and down."""
        return {f"{mod_name}.{e}.{p}" for e in range(self.num_experts)
                for p in ("gate", "up", "down")}

    def load_expert(self, expert: int, part: str, full: torch.Tensor) -> None:
        """full: one expert's checkpoint matrix (gate/up [I, H], down [H, I]); this rank's
        slice is copied."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"{self.prefix}: expert {expert} is outside the model's "
                             f"{self.num_experts}.")
        inter = self.i_hi - self.i_lo
        if part == "down":
            if self.quant is not None:  # full rows quantized, then this rank's columns
                q, sc = quantize_rows(full.to(self.w2_scale.device), self.quant)
                self._copy(self.w2_scale.data[expert], sc, part)
                full = q
            self._copy(self.w2_weight.data[expert], full[:, self.i_lo:self.i_hi], part)
        else:
            rows = slice(0, inter) if part == "gate" else slice(inter, 2 * inter)
            w = full[self.i_lo:self.i_hi]
            if self.quant is not None:
                w, sc = quantize_rows(w.to(self.w13_scale.device), self.quant)
                self._copy(self.w13_scale.data[expert, rows], sc, part)
            self._copy(self.w13_weight.data[expert, rows], w, part)

    def fill_dummy(self, seed: int) -> None:
        """load_format='dummy': U(-1/sqrt(in), 1/sqrt(in)) weights; quantized experts get each
        expert's dense matrices through load_expert (converted as a checkpoint's)."""
        inter = self.i_hi - self.i_lo
        full_i = inter * self.tp.world_size
        dev = self.w13_weight.device
        g = torch.Generator(device=dev)
        g.manual_seed(seed)
        if self.quant is None:  # dense: the stacked tensors directly (two launches)
            self.w13_weight.data.uniform_(-self.hidden_size ** -0.5, self.hidden_size ** -0.5,
                                          generator=g)
            self.w2_weight.data.uniform_(-full_i ** -0.5, full_i ** -0.5, generator=g)
            return
        for e in range(self.num_experts):
            g.manual_seed(seed + e)
            for part, shape in (("gate", (full_i, self.hidden_size)),
                                ("up", (full_i, self.hidden_size)),
                                ("down", (self.hidden_size, full_i))):
                bound = shape[1] ** -0.5
                w = torch.empty(shape, device=dev).uniform_(-bound, bound, generator=g)
                self.load_expert(e, part, w)

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, part: str) -> None:
        if dst.shape != src.shape:
            raise ValueError(f"{self.prefix}: expert {part} slice has shape {tuple(src.shape)}, "
                             f"the model expects {tuple(dst.shape)}")
        dst.copy_(src)

    def load_stacked(self, name: str, full: torch.Tensor) -> list[tuple[int, str]]:
        """Every expert in one tensor: transformers 5's ``gate_up_proj`` [E, 2I, H], or GGUF's
        ``gate_proj`` / ``up_proj`` [E, I, H]; ``down_proj`` [E, H, I]. The (expert, part)
        pairs it filled."""
        if full.dim() != 3 or full.shape[0] != self.num_experts:
            raise ValueError(f"{self.prefix}.{name}: stacked experts of shape "
                             f"{tuple(full.shape)}, the model has {self.num_experts} experts.")
        done = []
        for e in range(full.shape[0]):
            if name == "gate_up_proj":
                inter = full.shape[1] // 2
                self.load_expert(e, "gate", full[e, :inter])
                self.load_expert(e, "up", full[e, inter:])
                done += [(e, "gate"), (e, "up")]
            else:
                part = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}[name]
                self.load_expert(e, part, full[e])
                done.append((e, part))
        return done

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], weights/ids [T, k] -> [T, H]: this rank's partial sum over the
        intermediate slice (all-reduced by the caller under tensor parallelism)."""
        if self.use_kernels:
            from servelm.kernels.fused_moe import fused_experts
            return fused_experts(x, self.w13_weight, self.w2_weight, weights, ids,
                                 self.w13_scale, self.w2_scale)
        return fused_experts_ref(x, self.w13_weight, self.w2_weight, weights, ids,
                                 self.w13_scale, self.w2_scale)
