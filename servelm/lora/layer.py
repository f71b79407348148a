"""The LoRA seam on linear layers: ``LoRALinearMethod`` wraps a layer's own LinearMethod (dense
or quantized alike) and adds, to each token's output, the low-rank product of the adapter that
token's request runs with:

    y[t] = base(x)[t] + (x[t] @ A[s].T) @ B[s].T,   s = the slot of token t's adapter

A and B of every slot sit stacked on the device ([S, P*R, K] and [S, N, R] for a layer of P
merged parts, R = max_lora_rank; an adapter of lower rank is zero-padded, a part it does not
target all zeros). ``LoRABatch`` says which slot each token of the step uses; it is shared by
every wrapped layer of one model."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from servelm.layers.activation import silu_and_mul
from servelm.quantization.base import LinearMethod


class LoRABatch:
    """Per step: the adapter slot of each token (-1: none).

    On CUDA with kernels, ``token_lora`` is a persistent device buffer (read inside CUDA
    graphs; tokens past the step's, a graph's padding, hold -1) and ``prepare`` sorts the
    tokens by slot on the device; a decode graph always runs the kernels (a slot with no
    tokens costs its programs an early exit). Elsewhere the step's groups of tokens per slot
    are built on the host. An eager step with no adapter skips LoRA altogether."""

    def __init__(self, num_slots: int, max_tokens: int, device: torch.device,
                 use_kernels: bool) -> None:
        self.num_slots = num_slots
        self.use_kernels = use_kernels
        self.token_lora = torch.full((max_tokens,), -1, dtype=torch.int32, device=device)
        self.active = False  # some token of this step has an adapter
        # a decode graph's forward (capture, warm-up): the LoRA kernels must be in it whatever
        # this step holds, since replays of it serve steps with adapters
        self.in_graph = False
        self.host_slots = torch.zeros(0, dtype=torch.int32)  # set_tokens' slots
        # eager torch path, one adapter in the step: (slot, its tokens [n] or None for all)
        self.groups: list[tuple[int, Optional[torch.Tensor]]] = []
        # several: the G adapters' slots [G], their tokens padded to the largest group's m
        # [G, m] (a group's first token repeated) and a mask of the real ones [G, m, 1]
        self.padded: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        # kernel path, set by prepare(): tokens grouped by slot [T], slot s's range [S + 1]
        self.sorted_tokens: Optional[torch.Tensor] = None
        self.slot_start: Optional[torch.Tensor] = None

    def set_tokens(self, slots: np.ndarray) -> None:
        """slots: [T] int, each token's slot (-1: no adapter), in the step's token order."""
        T = len(slots)
        if T > self.token_lora.shape[0]:
            raise RuntimeError(f"a step of {T} tokens exceeds the LoRA token buffer "
                               f"({self.token_lora.shape[0]})")
        self.active = bool((slots >= 0).any())
        # [T] int32 on the host: the CPU's C decode step reads it (one token per row there)
        self.host_slots = torch.from_numpy(np.ascontiguousarray(slots, dtype=np.int32))
        if self.use_kernels:
            self.token_lora[:T].copy_(self.host_slots, non_blocking=True)
            self.token_lora[T:].fill_(-1)
            return
        self.groups, self.padded = [], None
        present = np.unique(slots[slots >= 0])
        if len(present) == 1:
            idx = np.nonzero(slots == present[0])[0]
            self.groups.append((int(present[0]), None if len(idx) == T else
                                torch.from_numpy(idx).to(self.token_lora.device)))
        elif len(present) > 1:  # one batched matmul pair for all adapters (op count is the cost)
            members = [np.nonzero(slots == s)[0] for s in present]
            m = max(len(g) for g in members)
            pad = np.stack([np.concatenate([g, np.full(m - len(g), g[0])]) for g in members])
            mask = np.arange(m)[None, :] < np.array([len(g) for g in members])[:, None]
            dev = self.token_lora.device
            self.padded = (torch.from_numpy(present.astype(np.int64)).to(dev),
                           torch.from_numpy(pad.astype(np.int64)).to(dev),
                           torch.from_numpy(mask[:, :, None]).to(dev))

    def prepare(self, num_tokens: int) -> None:
        """At the start of a forward of num_tokens tokens (inside a graph's capture too)."""
        if self.use_kernels:
            from servelm.kernels.lora import lora_segments
            self.sorted_tokens, self.slot_start = lora_segments(self.token_lora[:num_tokens],
                                                                self.num_slots)


class LoRALinearMethod(LinearMethod):
    """``base``'s weights and matmul, plus the step's adapters' low-rank products."""

    def __init__(self, base: LinearMethod, layer, batch: LoRABatch, rank: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(base.quant_config, base.prefix, base.use_kernel)
        self.base, self.batch, self.rank = base, batch, rank
        self.checkpoint_names, self.accepts_dense = base.checkpoint_names, base.accepts_dense
        S, P = batch.num_slots, layer.num_parts
        # [S, P*R, K_rank]: part p's A in rows p*R..p*R+r; [S, N_rank, R]: B rows by part
        self.a = torch.zeros(S, P * rank, layer.input_size_per_rank, dtype=dtype, device=device)
        self.b = torch.zeros(S, layer.output_size_per_rank, rank, dtype=dtype, device=device)
        self.part_offsets = tuple(layer.part_offsets)
        self._b_full: Optional[torch.Tensor] = None  # the torch path's block form of b

    # the base method's seam, unchanged
    def create_weights(self, layer) -> None:
        self.base.create_weights(layer)

    def load_weight(self, layer, name: str, full_tensor: torch.Tensor, shard_id: int = 0) -> None:
        self.base.load_weight(layer, name, full_tensor, shard_id)

    def process_after_loading(self, layer) -> None:
        self.base.process_after_loading(layer)

    def apply(self, layer, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        # x: [T, K_rank] -> [T, N_rank]
        return self._add_lora(self.base.apply(layer, x, bias), x)

    def apply_silu_mul(self, layer, gate_up: torch.Tensor,
                       bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not (self.batch.active or self.batch.in_graph):  # the base's fused path
            return self.base.apply_silu_mul(layer, gate_up, bias)
        # the activation once, for the base matmul and the adapters' (not twice)
        act = silu_and_mul(gate_up, layer.use_kernel)
        return self._add_lora(self.base.apply(layer, act, bias), act)

    def _add_lora(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        st = self.batch
        if not (st.active or st.in_graph):
            return y
        if st.use_kernels:
            from servelm.kernels.lora import lora_expand, lora_shrink
            t = lora_shrink(x, self.a, st.sorted_tokens, st.slot_start)  # [T, P*R] fp32
            lora_expand(y, t, self.b, st.sorted_tokens, st.slot_start, self.part_offsets)
            return y
        # the torch path (CPU): in the model dtype, few ops (each op's overhead is what a small
        # step pays), each part added into its slice of y in place
        R, off = self.rank, self.part_offsets
        if st.padded is not None:
            slots, pad, mask = st.padded  # [G], [G, m], [G, m, 1]
            G, m = pad.shape
            xs = x.index_select(0, pad.reshape(-1)).view(G, m, -1)  # [G, m, K]
            t = torch.bmm(xs, self.a[slots].transpose(1, 2)) * mask  # [G, m, P*R]
            delta = torch.bmm(t, self._b_blocks()[slots])  # [G, m, N]
            y.index_add_(0, pad.reshape(-1), delta.view(G * m, -1))
            return y
        for slot, idx in st.groups:
            xs = x if idx is None else x.index_select(0, idx)
            t = xs @ self.a[slot].T  # [n, P*R]
            for p in range(len(off) - 1):
                delta = t[:, p * R:(p + 1) * R] @ self.b[slot, off[p]:off[p + 1]].T
                if idx is None:
                    y[:, off[p]:off[p + 1]] += delta
                else:
                    y[:, off[p]:off[p + 1]].index_add_(0, idx, delta)
        return y

    # ---- slots ----------------------------------------------------------------------------
    def shard(self, layer, part: int, a: torch.Tensor, b: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Full A [r, in], B [part rows, r] -> this rank's (as the base weight is split:
        column-parallel layers keep their rows of B, row-parallel ones their columns of A)."""
        b = layer.shard_rows(b, part, "lora_B")
        a = layer.shard_cols(a, "lora_A")
        return a.contiguous(), b.contiguous()

    def _b_blocks(self) -> torch.Tensor:
        """[S, P*R, N]: B transposed, part p's rows in its own rank rows p*R..(p+1)*R and
        its own columns (zero elsewhere), so one matmul expands every part (torch path)."""
        if self._b_full is None:
            S, N, R = self.b.shape
            off = self.part_offsets
            full = torch.zeros(S, (len(off) - 1) * R, N, dtype=self.b.dtype, device=self.b.device)
            for p in range(len(off) - 1):
                full[:, p * R:(p + 1) * R, off[p]:off[p + 1]] = \
                    self.b[:, off[p]:off[p + 1]].transpose(1, 2)
            self._b_full = full
        return self._b_full

    def set_slot(self, slot: int, parts: list) -> None:
        """parts: per part (A [r, K_rank], B [rows, r]) of this rank, or None (not adapted)."""
        self._b_full = None  # rebuilt from b when next needed
        self.a[slot].zero_()
        self.b[slot].zero_()
        R = self.rank
        for p, ab in enumerate(parts):
            if ab is None:
                continue
            a, b = ab
            r = a.shape[0]
            lo, hi = self.part_offsets[p], self.part_offsets[p + 1]
            self.a[slot, p * R:p * R + r].copy_(a, non_blocking=True)
            self.b[slot, lo:hi, :r].copy_(b, non_blocking=True)
