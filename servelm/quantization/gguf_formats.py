"""llama.cpp's GGUF block formats in plain PyTorch (any device): the reference the Triton kernels
(kernels/gguf_matmul.py) are tested against, and the CPU path of the ``gguf`` linear method.

A GGUF linear weight [N, K] is kept as its file bytes: uint8 [N, K // QK * TS], row n being row
n's K // QK blocks one after another (QK elements in TS bytes each, little-endian, no padding).
Values are exactly what ``gguf.quants.dequantize`` (the gguf package's numpy reference, from
ggml-quants.c) gives: fp16 scales read from the bytes, all arithmetic in fp32 in ggml's order,
rounded once to the requested dtype. In each layout, ``d``/``dmin`` are fp16, ``q`` the quants:

* Q4_0  (QK 32, 18 B): d, qs[16]. Element j < 16 is qs[j] & 15, element 16 + j is qs[j] >> 4;
  w = d * (q - 8).
* Q4_1  (QK 32, 20 B): d, m (fp16), qs[16] as Q4_0; w = d * q + m.
* Q8_0  (QK 32, 34 B): d, qs int8[32]; w = d * q.
* Q4_K  (QK 256, 144 B): d, dmin, scales[12], qs[128]. Eight sub-blocks of 32, each with a
  6-bit scale sc[j] and min m[j] packed in ``scales`` (s = the 12 bytes):
  j < 4: sc = s[j] & 63, m = s[j + 4] & 63;
  j >= 4: sc = (s[j + 4] & 15) | (s[j - 4] >> 6) << 4, m = (s[j + 4] >> 4) | (s[j] >> 6) << 4.
  qs in 4 chunks of 32 bytes: chunk c holds sub-block 2c in its low nibbles and 2c + 1 in its
  high ones; w = (d * sc) * q - dmin * m.
* Q5_K  (QK 256, 176 B): d, dmin, scales[12], qh[32], qs[128]: Q4_K plus a fifth bit, element l
  of sub-block j taking bit j of qh[l] as its bit 4.
* Q6_K  (QK 256, 210 B): ql[128], qh[64], scales int8[16], d. Two halves of 128 elements; in
  half h, element r (0..127) = (ql[64h + r % 64] >> 4 * (r // 64)) & 15
  | ((qh[32h + r % 32] >> 2 * (r // 32)) & 3) << 4, minus 32; w = (d * scales[8h + r // 16]) * q.
* F32 / F16 / BF16 (QK 1): the plain little-endian values.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Optional

import torch
import torch.nn.functional as F

QK_K = 256

# ggml type id -> name: the formats these functions (and kernels/gguf_matmul.py) read
GGUF_QUANT_TYPES = MappingProxyType({
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 8: "Q8_0", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K",
    30: "BF16",
})
# ggml type id -> (elements per block, bytes per block), as gguf.constants.GGML_QUANT_SIZES
GGUF_BLOCK_SIZES = MappingProxyType({
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 8: (32, 34), 12: (256, 144), 13: (256, 176),
    14: (256, 210), 30: (1, 2),
})


# every ggml type id -> name (gguf.constants.GGMLQuantizationType), for error messages
_GGML_NAMES = MappingProxyType({
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS",
    24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0",
    35: "TQ2_0", 39: "MXFP4",
})


def gguf_type_name(ggml_type: int) -> str:
    return _GGML_NAMES.get(int(ggml_type), f"ggml type {int(ggml_type)}")


def gguf_row_bytes(ggml_type: int, k: int) -> int:
    """Bytes of one weight row of k elements in this format."""
    if int(ggml_type) not in GGUF_BLOCK_SIZES:
        raise ValueError(f"GGUF tensors of {gguf_type_name(ggml_type)} are not supported here; "
                         f"supported: {', '.join(GGUF_QUANT_TYPES.values())} (dequantize the "
                         "file at load, quantization='none', for the others)")
    qk, ts = GGUF_BLOCK_SIZES[int(ggml_type)]
    if k <= 0 or k % qk:
        raise ValueError(f"a {gguf_type_name(ggml_type)} row holds a multiple of {qk} elements, "
                         f"got K={k}")
    return k // qk * ts


def _f16(blocks: torch.Tensor, off: int) -> torch.Tensor:
    """blocks: [N, nb, TS] uint8 -> the fp16 at byte ``off`` of each block, as fp32 [N, nb, 1]."""
    return blocks[..., off:off + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """qs: [..., B] uint8 -> [..., 2B]: the low nibbles, then the high ones (ggml's order)."""
    return torch.cat([qs & 15, qs >> 4], dim=-1)


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """s: [N, nb, 12] uint8 (a K-quant block's packed scales) -> (sc, m) fp32 [N, nb, 8, 1]."""
    s = s.to(torch.int32)
    lo, mid, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([lo & 63, (hi & 15) | ((lo >> 6) << 4)], dim=-1)
    m = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], dim=-1)
    return sc.float().unsqueeze(-1), m.float().unsqueeze(-1)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    # b: [N, nb, 18] -> [N, nb, 32]
    q = _nibbles(b[..., 2:18]).to(torch.int8) - 8
    return _f16(b, 0) * q.float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * _nibbles(b[..., 4:20]).float() + _f16(b, 2)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[..., 2:34].contiguous().view(torch.int8).float() * _f16(b, 0)


def _k_quant(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Q4_K / Q5_K: b [N, nb, TS], q [N, nb, 8, 32] the sub-blocks' quants -> [N, nb, 256]."""
    sc, m = _k_scale_min(b[..., 4:16])
    d = _f16(b, 0).unsqueeze(-1) * sc  # [N, nb, 8, 1]
    dm = _f16(b, 2).unsqueeze(-1) * m
    return (d * q.float() - dm).flatten(-2)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n, nb = b.shape[:2]
    qs = b[..., 16:144].reshape(n, nb, 4, 32)  # chunk c: sub-blocks 2c (low), 2c + 1 (high)
    return _k_quant(b, torch.stack([qs & 15, qs >> 4], dim=3).reshape(n, nb, 8, 32))


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n, nb = b.shape[:2]
    qs = b[..., 48:176].reshape(n, nb, 4, 32)
    ql = torch.stack([qs & 15, qs >> 4], dim=3).reshape(n, nb, 8, 32)
    bit = torch.arange(8, device=b.device, dtype=torch.uint8).view(1, 1, 8, 1)
    qh = (b[..., 16:48].unsqueeze(2) >> bit) & 1  # [N, nb, 8, 32]: bit j of qh[l]
    return _k_quant(b, ql | (qh << 4))


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n, nb = b.shape[:2]
    ql = b[..., 0:128].reshape(n, nb, 2, 1, 64)  # [.., half, nibble, 64]
    ql = (ql >> torch.tensor([0, 4], device=b.device, dtype=torch.uint8).view(2, 1)) & 15
    qh = b[..., 128:192].reshape(n, nb, 2, 1, 32)  # [.., half, 2-bit field, 32]
    sh = torch.tensor([0, 2, 4, 6], device=b.device, dtype=torch.uint8).view(4, 1)
    qh = (qh >> sh) & 3
    q = (ql.reshape(n, nb, 2, 128) | (qh.reshape(n, nb, 2, 128) << 4)).to(torch.int8) - 32
    scales = b[..., 192:208].contiguous().view(torch.int8).float()  # [N, nb, 16]
    d = (_f16(b, 208) * scales).unsqueeze(-1)  # [N, nb, 16, 1]
    return (d * q.reshape(n, nb, 16, 16).float()).reshape(n, nb, QK_K)


_DEQUANT = MappingProxyType({2: _q4_0, 3: _q4_1, 8: _q8_0, 12: _q4_k, 13: _q5_k, 14: _q6_k})
_PLAIN = MappingProxyType({0: torch.float32, 1: torch.float16})


def dequantize_gguf(raw: torch.Tensor, ggml_type: int, k: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """raw: uint8 [N, row_bytes] (a GGUF tensor's rows of blocks) -> w [N, k] in dtype, computed
    in fp32 exactly as ggml does and rounded once."""
    ggml_type = int(ggml_type)
    row_bytes = gguf_row_bytes(ggml_type, k)
    if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[1] != row_bytes:
        raise ValueError(f"a {gguf_type_name(ggml_type)} weight of K={k} is uint8 [N, "
                         f"{row_bytes}], got {raw.dtype} {tuple(raw.shape)}")
    raw = raw.contiguous()
    n = raw.shape[0]
    if ggml_type in _PLAIN:
        return raw.view(_PLAIN[ggml_type]).to(dtype)
    if ggml_type == 30:  # BF16: the top half of an fp32
        return (raw.view(torch.int16).to(torch.int32) << 16).view(torch.float32).to(dtype)
    qk, ts = GGUF_BLOCK_SIZES[ggml_type]
    w = _DEQUANT[ggml_type](raw.view(n, k // qk, ts))  # [N, nb, QK] fp32
    return w.reshape(n, k).to(dtype)


def gguf_linear_ref(x: torch.Tensor, raw: torch.Tensor, ggml_type: int,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x: [M, K] -> [M, N] in x's dtype: F.linear with the weight dequantized to x's dtype."""
    return F.linear(x, dequantize_gguf(raw, ggml_type, x.shape[-1], x.dtype), bias)


# byte offsets of each format's fp16 block scales (d; and m or dmin) within a block
_SCALE_FIELDS = MappingProxyType({2: (0,), 3: (0, 2), 8: (0,), 12: (0, 2), 13: (0, 2),
                                  14: (208,)})


def random_gguf_blocks(n: int, k: int, ggml_type: int,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random uint8 [N, row_bytes] in a block format (tests, warmup, benchmarks): random quants
    and packed scales, fp16 block scales of magnitude 1e-3..1e-1 (never NaN/inf; Q4_1's m about
    -8 d, so weights centre on 0). Plain types get random normal values."""
    ggml_type = int(ggml_type)
    row_bytes = gguf_row_bytes(ggml_type, k)
    if ggml_type in _PLAIN or ggml_type == 30:
        w = torch.randn(n, k, generator=generator)
        w = w.to(torch.bfloat16) if ggml_type == 30 else w.to(_PLAIN[ggml_type])
        return w.view(torch.uint8).reshape(n, row_bytes)
    qk, ts = GGUF_BLOCK_SIZES[ggml_type]
    nb = k // qk
    raw = torch.randint(0, 256, (n, nb, ts), dtype=torch.uint8, generator=generator)
    for off in _SCALE_FIELDS[ggml_type]:
        scale = torch.empty(n, nb).uniform_(1e-3, 1e-1, generator=generator)
        if ggml_type == 3 and off == 2:
            scale = raw[..., 0:2].contiguous().view(torch.float16).float().squeeze(-1) * -8
        else:
            scale = scale * (torch.randint(0, 2, (n, nb), generator=generator) * 2 - 1)
        raw[..., off:off + 2] = scale.to(torch.float16).unsqueeze(-1).view(torch.uint8)
    return raw.reshape(n, row_bytes)
