"""The CPU counterpart of worker/cuda_graphs.DecodeGraphs: decode-only steps of up to
``max_rows`` sequences run as one C call (csrc/decode.c) instead of PyTorch's per-op dispatch,
returning what a decode graph returns, (logits [B, V] fp32, greedy ids [B]).

Measured on the 2-core CPU machine (SmolLM2-135M Q4_1, benchmarks/cpu_suite.py): see
benchmarks/NOTES.md "CPU fast path". Prompt work keeps the PyTorch path (oneDNN's GEMMs over
the blocks dequantized per matmul; chunks of <= 64 tokens through the C GEMV)."""
from __future__ import annotations

import logging
from typing import Optional

import torch

from servelm.attention.backend import AttentionMetadata
from servelm.cpu import native
from servelm.cpu.plan import NativePlan, Unsupported, build_plan

logger = logging.getLogger(__name__)

# decode batches up to this many sequences take the C step (its scratch is sized for them);
# from 9 sequences on its matmuls decode each weight row once and run a tiled product
# (SmolLM2 Q4_1, 64 sequences on the 2-core machine: 91 ms a step against 150 ms for the
# GEMV tiles; 64 prompts x 32 new tokens ran at 326 output tok/s with the C step taking the
# batch, 245 when such batches kept the PyTorch path)
MAX_ROWS = 256


class CpuDecodeStep:
    """``padded_size`` / ``run`` as DecodeGraphs, for the engine's decode-only CPU steps."""

    def __init__(self, lib, plan: NativePlan, model, threads: int, lora_batch=None) -> None:
        self.lib, self.plan, self.model, self.threads = lib, plan, model, threads
        # multi-LoRA (lora.layer.LoRABatch): each row's adapter slot, read by the step
        self.lora_batch = lora_batch
        floats = lib.sl_scratch_floats(plan.model, threads)
        self.scratch = torch.empty(floats, dtype=torch.float32)
        # output buffers grow with the largest batch seen (256 rows of a 128k vocabulary would
        # be 131 MB held from the start)
        self.logits = torch.empty(0, plan.model.vocab, dtype=torch.float32)
        self.greedy = torch.empty(0, dtype=torch.int64)
        self.prof = None  # a float64 tensor's pointer: time per phase (profile(), benchmarks)

    def padded_size(self, num_seqs: int) -> Optional[int]:
        return num_seqs if 1 <= num_seqs <= self.plan.max_rows else None

    def capture(self) -> None:
        pass  # nothing to record: the C step reads the model in place

    def capture_next(self) -> bool:
        return False

    def profile(self, on: bool = True) -> Optional[torch.Tensor]:
        """Starts accumulating seconds per phase of the C step (norm, qkv, rope+kv, attention,
        o, norm, gate_up, silu*mul, down, final norm, head; thread 0, barrier to barrier) into
        the returned tensor; off with on=False."""
        self._prof_t = torch.zeros(11, dtype=torch.float64) if on else None
        self.prof = self._prof_t.data_ptr() if on else None
        return self._prof_t

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        S = input_ids.shape[0]
        x = self.model.embed_tokens(input_ids).float().contiguous()  # [S, hidden]
        pos = positions.to(torch.int64).contiguous()
        slots = meta.slot_mapping.to(torch.int64).contiguous()
        bt = meta.block_tables[:S].to(torch.int32).contiguous()
        lens = meta.seq_lens.to(torch.int32).contiguous()
        if S > self.logits.shape[0]:
            rows = min(self.plan.max_rows, max(S, 2 * self.logits.shape[0]))
            self.logits = torch.empty(rows, self.plan.model.vocab, dtype=torch.float32)
            self.greedy = torch.empty(rows, dtype=torch.int64)
        logits, greedy = self.logits[:S], self.greedy[:S]
        rc = self.lib.sl_decode(self.plan.model, S, x.data_ptr(), pos.data_ptr(), slots.data_ptr(),
                                bt.data_ptr(), bt.shape[1], lens.data_ptr(), logits.data_ptr(),
                                greedy.data_ptr(), self.scratch.data_ptr(), self.threads,
                                self.prof, self._lora_slots(S))
        if rc:
            raise ValueError(f"CPU decode step refused its inputs (batch {S}, contexts "
                             f"{lens.tolist()}; limits {self.plan.max_rows} rows, "
                             f"{self.plan.model.max_ctx} tokens)")
        # the ids outlive this call (an overlapped step lands them after the next one runs):
        # a copy, not the buffer the next step overwrites; the logits are sampled before that
        return logits, greedy.clone()


    def _lora_slots(self, S: int) -> Optional[int]:
        """Pointer to the step's [S] adapter slots, or None (no adapter this step)."""
        lb = self.lora_batch
        if lb is None or not lb.active:
            return None
        if lb.host_slots.shape[0] != S:
            raise ValueError(f"LoRA slots of {lb.host_slots.shape[0]} tokens for a step of {S}")
        return lb.host_slots.data_ptr()


def build_decode_step(model, kv_caches, max_model_len: int, threads: int,
                      max_rows: int = MAX_ROWS, lora_batch=None) -> Optional[CpuDecodeStep]:
    """The C decode step for this model, or None (logged once, with the reason) where the
    PyTorch path must run: no compiler, or a layer layout the C code does not read."""
    lib = native.load()
    if lib is None:
        return None
    try:
        plan = build_plan(model, kv_caches, max_rows, max_model_len)
    except Unsupported as e:
        logger.info("CPU fast path off for this model: %s; decode runs the PyTorch path", e)
        return None
    return CpuDecodeStep(lib, plan, model, threads, lora_batch)
