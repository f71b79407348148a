"""Grammar masks applied to logits in one kernel: logits row rows[k] keeps token t only where
bit t % 32 of word t // 32 of bitmask row k is set (xgrammar's layout), else -inf.

The PyTorch reference (``apply_bitmask_ref`` in structured_output/processor.py, the CPU's path)
expands the bits into a [A, V] bool tensor and rewrites the rows through an index (about ten
launches and two [A, V] temporaries); the kernel reads each mask word where it is needed and
writes -inf only where a token is forbidden.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BITS = 32


@triton.jit
def _apply_bitmask_kernel(logits_ptr, bitmask_ptr, rows_ptr, stride_l, stride_b, V,
                          BLOCK: tl.constexpr):
    k = tl.program_id(0)
    row = tl.load(rows_ptr + k).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < V
    # each word serves 32 neighbouring columns (one cache line per 32 x 32 tokens)
    words = tl.load(bitmask_ptr + k.to(tl.int64) * stride_b + cols // 32, mask=inside, other=-1)
    forbidden = ((words >> (cols % 32)) & 1) == 0
    tl.store(logits_ptr + row * stride_l + cols, float("-inf"), mask=inside & forbidden)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """structured_output.processor.apply_bitmask_ref's result, in one launch (logits' last dimension contiguous)."""
    A, V = bitmask.shape[0], logits.shape[1]
    assert logits.stride(1) == 1 and bitmask.stride(1) == 1 and bitmask.dtype == torch.int32
    assert bitmask.shape[1] * _BITS >= V
    if A == 0:
        return
    block = min(4096, triton.next_power_of_2(V))
    _apply_bitmask_kernel[(A, triton.cdiv(V, block))](
        logits, bitmask, rows, logits.stride(0), bitmask.stride(0), V, BLOCK=block, num_warps=4)
