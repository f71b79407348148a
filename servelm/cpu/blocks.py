"""GGUF blocks in the CPU kernels' layout: each block's fp16 scale (and Q4_1 min) moved out of
the block into arrays of their own, the codes left as they are (csrc/decode.c, ``sl_mat``).
The same bytes as the file (20 per Q4_1 block), so no copy stays behind; ``dequantize`` gives
the dense matrix back for prompt-sized matmuls."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from servelm.cpu import native

BLOCK_FORMATS = {2: (18, 2, None, 16), 3: (20, 4, 2, 16), 8: (34, 2, None, 32)}
# ggml type -> (bytes per block, offset of the codes, offset of the min (Q4_1), code bytes);
# the scale d is the block's first two bytes


@dataclass(frozen=True)
class SplitBlocks:
    """codes [N, K/2] (Q4) or [N, K] (Q8) uint8/int8, d [N, groups] (fp16 for GGUF: a group
    per 32-block; the int4/int8 methods' groups of G columns in fp32/bf16), m [N, groups] (the
    offset of w = d * q + m) or None."""

    ggml_type: int
    codes: torch.Tensor
    d: torch.Tensor
    m: Optional[torch.Tensor]
    group: int = 32  # input columns per scale (the last group of a row may be shorter)


def split_blocks(raw: torch.Tensor, ggml_type: int) -> SplitBlocks:
    """raw: [N, row_bytes] uint8 as the file stores a Q4_0 / Q4_1 / Q8_0 matrix."""
    ts, qoff, moff, qbytes = BLOCK_FORMATS[ggml_type]
    n = raw.shape[0]
    b = raw.reshape(n, -1, ts)
    d = b[..., 0:2].contiguous().view(torch.float16).reshape(n, -1)
    m = b[..., moff:moff + 2].contiguous().view(torch.float16).reshape(n, -1) if moff else None
    codes = b[..., qoff:qoff + qbytes].reshape(n, -1).contiguous()
    return SplitBlocks(ggml_type, codes, d, m)


def mat_fields(blocks: SplitBlocks) -> tuple:
    """(type, row_bytes, data, d, m, group, scale dtype) of an ``sl_mat``."""
    return (blocks.ggml_type, blocks.codes.shape[1], blocks.codes.data_ptr(),
            blocks.d.data_ptr(), blocks.m.data_ptr() if blocks.m is not None else None,
            blocks.group, native.SCALE_DTYPES[str(blocks.d.dtype).removeprefix("torch.")])


def dequantize(blocks: SplitBlocks, dtype: torch.dtype) -> torch.Tensor:
    """The dense [N, K] matrix in dtype (fp32 or bf16; ggml's arithmetic in fp32, rounded once)."""
    lib = native.load()
    n = blocks.codes.shape[0]
    k = blocks.codes.shape[1] * (2 if blocks.ggml_type != 8 else 1)
    out_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    out = torch.empty(n, k, dtype=out_dtype)
    mat = native.SlMat()
    mat.type, mat.n, mat.k, mat.out_off = blocks.ggml_type, n, k, 0
    _, mat.row_bytes, mat.data, mat.d, mat.m, mat.group, mat.scale_dtype = mat_fields(blocks)
    lib.sl_dequantize(mat, out.data_ptr(), int(out_dtype == torch.bfloat16), torch.get_num_threads())
    return out if out.dtype == dtype else out.to(dtype)


def int4_blocks(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group: int) -> Optional[SplitBlocks]:
    """The int4 method's GPTQ layout (qweight int32 [K / 8, N], scales and zeros [groups, N],
    w = (q - z) * s) in the kernels' Q4_1 layout: codes [N, K / 2] in ggml's nibble order,
    d = s and m = -z * s in fp32 [N, groups] (exact: z is an integer). None where K or the
    group is not a multiple of 32."""
    from servelm.quantization.ref import unpack_int4
    k = qweight.shape[0] * 8
    if k % 32 or group % 32:
        return None
    q = unpack_int4(qweight).t().to(torch.uint8).reshape(-1, k // 32, 2, 16)  # [N, nb, 2, 16]
    codes = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(q.shape[0], k // 2).contiguous()
    s, z = scales.float(), zeros.float()
    return SplitBlocks(3, codes, s.t().contiguous(), (-z * s).t().contiguous(), group)
