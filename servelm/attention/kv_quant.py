"""fp8 (e4m3) KV cache with inline scales: the layout and its plain-PyTorch reference.

With ``kv_cache_dtype="fp8"`` (vLLM's name) each layer's k_cache and v_cache is a contiguous
``torch.uint8`` tensor ``[num_blocks, block_size, num_kv_heads, head_dim + 4]``. Each head row of
one token holds head_dim e4m3 bytes (``torch.float8_e4m3fn`` bit patterns) followed by its
float32 scale (4 bytes, little-endian), so that ``value = float(e4m3) * scale``. The scale is
dynamic per (token, kv head): ``scale = max(amax(|row|), FP8_KV_TINY) / 448`` and the e4m3
value is ``row / scale`` (fp32, correctly rounded) clamped to +-448, rounded to nearest even.
A uint8 cache dtype therefore means "fp8 with inline scales"; any other dtype holds the values.

Slots, block tables, swaps and block copies address dims 0-1 only and see no difference. The
Triton kernels (kernels/kv_write.py, rotary_kv.py, decode_attention.py, prefill_attention.py)
write the same bytes as ``quantize_kv_rows`` and read them as ``dequantize_kv_rows`` does.
"""
from __future__ import annotations

import torch

FP8_KV_EXTRA = 4  # bytes behind each head row: its float32 scale
FP8_E4M3_MAX = 448.0
# floor of a row's amax: an all-zero row gets a finite, normal scale (2^-100 / 448 > 2^-126)
FP8_KV_TINY = 2.0 ** -100


def kv_cache_torch_dtype(model_dtype: torch.dtype, kv_cache_dtype: str) -> torch.dtype:
    """The cache tensors' dtype: "auto" -> the model's, "bfloat16" -> torch.bfloat16, "fp8" (or
    vLLM's alias "fp8_e4m3") -> torch.uint8 (e4m3 + scales)."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype == "bfloat16":
        return torch.bfloat16
    if kv_cache_dtype in ("fp8", "fp8_e4m3"):
        return torch.uint8
    raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is not supported: use 'auto', "
                     "'bfloat16' or 'fp8'")


def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                   fp8: bool) -> tuple[int, int, int, int]:
    """Shape of one layer's k_cache (and v_cache): head rows grow by the scale's 4 bytes in fp8."""
    if fp8 and head_dim % 4:
        # the scale behind a row must stay 4-byte aligned: rows of head_dim + 4 bytes
        raise ValueError(f"kv_cache_dtype='fp8' needs head_dim % 4 == 0 (got {head_dim})")
    return num_blocks, block_size, num_kv_heads, head_dim + (FP8_KV_EXTRA if fp8 else 0)


def is_fp8_kv(cache: torch.Tensor) -> bool:
    return cache.dtype == torch.uint8


def kv_head_dim(cache: torch.Tensor) -> int:
    """head_dim of a cache [..., head_dim] (or [..., head_dim + 4] uint8 for fp8)."""
    return cache.shape[-1] - (FP8_KV_EXTRA if is_fp8_kv(cache) else 0)


def quantize_kv_rows(x: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D] float -> [T, H, D + 4] uint8: e4m3 bytes of x / scale, then the fp32 scale."""
    x = x.float()
    amax = x.abs().amax(-1, keepdim=True)  # [T, H, 1]
    scale = amax.clamp_min(FP8_KV_TINY) / FP8_E4M3_MAX
    q = (x / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    # scale [T, H, 1] fp32 -> [T, H, 4] bytes in the machine's (little-endian) order
    return torch.cat([q.view(torch.uint8), scale.view(torch.uint8)], dim=-1)


def dequantize_kv_rows(c: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """c: [..., D + 4] uint8 -> [..., D] in dtype (value = float(e4m3) * scale, in fp32)."""
    d = c.shape[-1] - FP8_KV_EXTRA
    vals = c[..., :d].view(torch.float8_e4m3fn).float()  # same item size: views any strides
    scale = c[..., d:].contiguous().view(torch.float32)  # [..., 1]
    return (vals * scale).to(dtype)


def kv_rows(cache_rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Values of gathered cache rows [..., D(+4)] in dtype: dequantized if fp8, else cast."""
    if is_fp8_kv(cache_rows):
        return dequantize_kv_rows(cache_rows, dtype)
    return cache_rows.to(dtype)
