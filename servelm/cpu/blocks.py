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
    """codes [N, K/2] (Q4) or [N, K] (Q8) uint8, d [N, K/32] fp16, m [N, K/32] fp16 or None."""

    ggml_type: int
    codes: torch.Tensor
    d: torch.Tensor
    m: Optional[torch.Tensor]


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
    """(type, row_bytes, data, d, m) pointers of an ``sl_mat``."""
    return (blocks.ggml_type, blocks.codes.shape[1], blocks.codes.data_ptr(),
            blocks.d.data_ptr(), blocks.m.data_ptr() if blocks.m is not None else None)


def dequantize(blocks: SplitBlocks, dtype: torch.dtype) -> torch.Tensor:
    """The dense [N, K] matrix in dtype (fp32 or bf16; ggml's arithmetic in fp32, rounded once)."""
    lib = native.load()
    n, nb = blocks.d.shape
    out_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    out = torch.empty(n, nb * 32, dtype=out_dtype)
    mat = native.SlMat()
    mat.type, mat.n, mat.k, mat.out_off = blocks.ggml_type, n, nb * 32, 0
    _, mat.row_bytes, mat.data, mat.d, mat.m = mat_fields(blocks)
    lib.sl_dequantize(mat, out.data_ptr(), int(out_dtype == torch.bfloat16), torch.get_num_threads())
    return out if out.dtype == dtype else out.to(dtype)
