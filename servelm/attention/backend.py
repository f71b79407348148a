"""Attention backend contract.

The KV cache of one layer is two tensors, ``k_cache`` and ``v_cache``, each
``[num_blocks, block_size, num_kv_heads, head_dim]``. Token ``i`` of a sequence lives in slot
``block_table[i // block_size] * block_size + i % block_size``; a flat view
``k_cache.view(-1, num_kv_heads, head_dim)[slot]`` addresses it.

fp8 KV cache (``kv_cache_dtype="fp8"``, see ``attention/kv_quant.py``): the caches are
``torch.uint8`` ``[num_blocks, block_size, num_kv_heads, head_dim + 4]``, contiguous. Each head
row of a token is head_dim e4m3 bytes (``torch.float8_e4m3fn`` bit patterns) followed by a
float32 scale (little-endian): value = float(e4m3) * scale. The scale is dynamic per (token, kv
head), max(amax(|row|), tiny) / 448, and the e4m3 value is row / scale clamped to +-448, rounded
to nearest even. A backend quantizes in ``write_kv`` / ``rotate_and_write_kv`` and dequantizes
in ``forward``; a uint8 cache always means this layout, any other dtype holds the values
themselves. Slots, block tables, swaps and block copies use dims 0-1 only, alike for both.

A step's batch is ragged: the query tokens of all sequences are concatenated, sequence ``s`` owning
rows ``query_start_loc[s]:query_start_loc[s+1]``. Those are the *last* query_len tokens of its
context of ``seq_lens[s]`` tokens (the earlier ones are already in the cache), so causal masking
puts query row ``j`` of sequence ``s`` at absolute position ``seq_lens[s] - query_len + j``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from servelm.layers.rotary import RotaryEmbedding


@dataclass(frozen=True)
class AttentionMetadata:
    """Per-step attention inputs, all on the model's device.

    num_tokens = total query tokens this step; num_seqs = sequences in the batch.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot to write each new token's k/v
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: prefix sums of query lengths
    seq_lens: torch.Tensor  # [num_seqs] int32: context length after this step's tokens
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, unused entries arbitrary
    max_query_len: int  # host int: longest query this step (1 => decode only)
    max_seq_len: int  # host int: longest context this step
    # Host copies, for backends that loop or pick kernels on the host (the reference backend).
    query_lens_cpu: tuple[int, ...] = ()
    seq_lens_cpu: tuple[int, ...] = ()
    # Token trees (speculative verification of several branches at once): a query sees the
    # keys before its sequence's tree_start, and of the tree positions tree_start + j those
    # whose bit j its tree_mask sets (its ancestors and itself; <= 64 positions). A sequence
    # without a tree has tree_start >= its seq_len. None: plain causal attention.
    tree_mask: Optional[torch.Tensor] = None  # [num_tokens] int64 bitmasks
    tree_start: Optional[torch.Tensor] = None  # [num_seqs] int32
    # KV eviction under h2o: [num_slots] fp32, the attention each cached token has received;
    # the model adds each layer's (kv_eviction/scores.py). None: not gathered.
    kv_scores: Optional[torch.Tensor] = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def decode_only(self) -> bool:
        return self.max_query_len == 1 and self.tree_mask is None


class AttentionBackend(ABC):
    """Computes causal attention of a ragged batch against the paged KV cache.

    Contract: ``write_kv`` (or ``rotate_and_write_kv``, which applies the rotary embedding
    first) stores this step's k/v at ``slot_mapping`` *before* ``forward`` runs, so ``forward``
    reads every context token (old and new) from the cache. Implementations may read ``k``/``v``
    directly for the new tokens as an optimisation, with identical results.
    """

    name: str = "abstract"
    # whether forward takes window > 0 and softcap > 0 (models refuse a backend without them)
    supports_window_softcap: bool = False

    @abstractmethod
    def write_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """k, v: [num_tokens, num_kv_heads, head_dim]; caches as in the module docstring (fp8:
        each row quantized with its own scale)."""

    def rotate_and_write_kv(self, rotary: "RotaryEmbedding", positions: torch.Tensor,
                            q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            k_cache: torch.Tensor, v_cache: torch.Tensor,
                            slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``rotary(positions, q, k)``, then ``write_kv`` of the rotated k and v; returns the
        rotated (q, k) to pass to ``forward``. positions: [num_tokens]; shapes as in write_kv.
        A backend may do both in one kernel (rotating q and k in place); results are identical."""
        q, k = rotary(positions, q, k)
        self.write_kv(k, v, k_cache, v_cache, slot_mapping)
        return q, k

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                window: int = 0, softcap: float = 0.0) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim].

        Returns [num_tokens, num_heads, head_dim] in q's dtype. num_heads is a multiple of
        num_kv_heads (GQA: query head h uses kv head h // (num_heads // num_kv_heads)).
        window > 0: a query at position p sees keys p - window + 1 .. p only (sliding-window
        attention, as transformers' masks). softcap > 0: scores become
        softcap * tanh(scores / softcap) before the mask (Gemma 2). Only a backend with
        ``supports_window_softcap`` takes them.
        """
