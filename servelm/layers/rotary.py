"""Rotary position embedding (NeoX/HF "rotate_half" style) from a precomputed cos/sin cache."""
from __future__ import annotations

import math
import torch
from torch import nn


def _inv_freq(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """scaling: the config's rope parameters ({"rope_type", ...}, as loader.rope_parameters)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        # Llama 3.1+: long wavelengths divided by factor, short kept, smooth blend in between.
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        return torch.where(medium, blended, scaled)
    raise ValueError(f"rope scaling type {rope_type!r} is not supported; supported: default, "
                     "linear, llama3.")


class RotaryEmbedding(nn.Module):
    """Applies rotary embedding to q [T, H, D] and k [T, KVH, D] at positions [T].

    Models call it through ``AttentionBackend.rotate_and_write_kv``: the Triton backend then
    fuses it with the KV-cache write (kernels/rotary_kv.py) when ``use_kernel`` is set, reading
    ``cos_sin_cache``; the kernel path rotates q and k in place."""

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict,
                 use_kernel: bool = False) -> None:
        super().__init__()
        if torch.get_default_device().type == "meta":
            # a model built for its shapes only (the kernel recording's shadow,
            # worker/kernel_jobs.py): computing on meta runs torch's Python references, whose
            # first use imports sympy and dynamo (Llama-3-8B on an H200 with empty caches: the
            # recording took 9.7 s with them, 2.9 s without)
            cache = torch.empty(max_position, head_dim, dtype=torch.float32)
        else:
            inv_freq = _inv_freq(head_dim, theta, scaling)
            # HF: freqs = inv_freq (x) positions in fp32, emb = cat(freqs, freqs), cos/sin fp32
            freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
            cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
        # cos_sin_cache: [max_position, D]: first D/2 columns cos, last D/2 sin
        self.register_buffer("cos_sin_cache", cache, persistent=False)
        self.use_kernel = use_kernel

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        if self.use_kernel:
            from servelm.kernels.rotary import rotary_embedding
            rotary_embedding(positions, q, k, self.cos_sin_cache)
            return q, k
        from servelm.cpu import ops as cpu_ops
        if (q.dim() == 3 and cpu_ops.takes_elementwise(q) and k.dtype == torch.float32
                and q.shape[-1] % 2 == 0):
            return cpu_ops.rope(positions, q, k, self.cos_sin_cache)  # the CPU's C pass
        cos, sin = self.cos_sin_cache[positions].chunk(2, dim=-1)  # [T, D/2] each
        cos = torch.cat([cos, cos], dim=-1)[:, None, :].to(q.dtype)  # [T, 1, D]
        sin = torch.cat([sin, sin], dim=-1)[:, None, :].to(q.dtype)
        return _apply(q, cos, sin), _apply(k, cos, sin)


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
