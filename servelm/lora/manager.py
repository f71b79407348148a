"""The worker's adapters (S-LoRA's memory management): ``max_loras`` device slots, filled on
demand from a host cache of ``max_cpu_loras`` adapters (read from disk on a miss), each the
least recently used one out when full. A step's adapters are made resident before its forward;
the scheduler never runs more distinct adapters at once than there are slots."""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import re
from typing import Any, Optional

import numpy as np
import torch

from servelm.layers.linear import Linear
from servelm.lora.config import LoRAConfig
from servelm.lora.layer import LoRABatch, LoRALinearMethod
from servelm.lora.peft import TARGETS, read_adapter
from servelm.lora.request import LoRARequest

logger = logging.getLogger(__name__)

# the model's linear layers LoRA wraps: "layers.{i}.{self_attn|mlp}.{merged name}"
_WRAPPED = re.compile(r"^layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))$")

# this rank's weights of one adapter: wrapped module name -> per part (A, B) or None
HostAdapter = dict[str, list[Optional[tuple[torch.Tensor, torch.Tensor]]]]


class LoRAManager:
    def __init__(self, config: LoRAConfig, model: torch.nn.Module, hf_config: Any,
                 dtype: torch.dtype, device: torch.device, max_tokens: int,
                 use_kernels: bool) -> None:
        self.config, self.hf_config, self.dtype, self.device = config, hf_config, dtype, device
        S = config.max_loras
        self.batch = LoRABatch(S, max_tokens, device, use_kernels)
        self.layers: dict[str, tuple[Linear, LoRALinearMethod]] = {}
        for name, mod in model.named_modules():
            if isinstance(mod, Linear) and _WRAPPED.match(name):
                method = LoRALinearMethod(mod.method, mod, self.batch, config.max_lora_rank,
                                          dtype, device)
                mod.method = method
                self.layers[name] = (mod, method)
        self.slot_ids: list[Optional[int]] = [None] * S  # lora_int_id in each device slot
        self.slot_lru: collections.OrderedDict[int, int] = collections.OrderedDict()  # id -> slot
        self.host: collections.OrderedDict[int, HostAdapter] = collections.OrderedDict()
        self.req_lora: dict[str, LoRARequest] = {}  # running request -> its adapter
        self.num_slot_loads = 0  # adapters copied into a device slot (paging)
        self.num_disk_reads = 0
        # reads of waiting requests' adapters in a background thread: id -> its future
        self._reading: dict[int, concurrent.futures.Future] = {}
        self._reader: Optional[concurrent.futures.ThreadPoolExecutor] = None

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, req_id: str, lora: Optional[LoRARequest]) -> None:
        if lora is None:
            self.req_lora.pop(req_id, None)
        else:
            self.req_lora[req_id] = lora

    def remove_request(self, req_id: str) -> None:
        self.req_lora.pop(req_id, None)

    def set_step(self, req_ids: list[str], seq_of_tok: np.ndarray) -> None:
        """Makes the step's adapters resident and tells the layers each token's slot."""
        loras = [self.req_lora.get(r) for r in req_ids]
        seq_slots = self.activate(loras)
        self.batch.set_tokens(seq_slots[seq_of_tok] if len(seq_slots) else
                              np.zeros(0, np.int32))

    def activate(self, loras: list[Optional[LoRARequest]]) -> np.ndarray:
        """Slot of each entry (-1 for None), loading the missing ones into free or least
        recently used slots that this step does not need."""
        needed = {lo.lora_int_id: lo for lo in loras if lo is not None}
        if len(needed) > len(self.slot_ids):
            raise RuntimeError(f"a step with {len(needed)} adapters, over max_loras "
                               f"({len(self.slot_ids)}): the scheduler must bound them")
        for lid, lo in needed.items():
            if lid not in self.slot_lru:
                self._load_slot(lo, needed)
            self.slot_lru.move_to_end(lid)
        return np.fromiter((-1 if lo is None else self.slot_lru[lo.lora_int_id] for lo in loras),
                           np.int32, len(loras))

    # ---- paging ---------------------------------------------------------------------------
    def _load_slot(self, lora: LoRARequest, needed: dict) -> None:
        if None in self.slot_ids:
            slot = self.slot_ids.index(None)
        else:  # the least recently used adapter this step does not run
            victim = next(i for i in self.slot_lru if i not in needed)
            slot = self.slot_lru.pop(victim)
        weights = self._host_weights(lora)
        for name, (mod, method) in self.layers.items():
            method.set_slot(slot, weights.get(name, [None] * mod.num_parts))
        self.slot_ids[slot] = lora.lora_int_id
        self.slot_lru[lora.lora_int_id] = slot
        self.num_slot_loads += 1

    def prefetch(self, loras: list[LoRARequest]) -> None:
        """Start reading adapters that waiting requests will need (in a background thread;
        at most max_loras reads outstanding), so the step that first runs one only copies it.
        Finished reads join the host cache (bounded by max_cpu_loras) as they are found."""
        for lid in [i for i, f in self._reading.items() if f.done()]:
            try:
                self._cache_host(lid, self._reading.pop(lid).result())
            except Exception:  # read again, its error raised, if a step needs it
                pass
        for lo in loras:
            lid = lo.lora_int_id
            if lid in self.host or lid in self.slot_lru or lid in self._reading:
                continue
            if len(self._reading) >= self.config.max_loras:
                break
            if self._reader is None:
                self._reader = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="servelm-lora-read")
            self._reading[lid] = self._reader.submit(self._read, lo)

    def _host_weights(self, lora: LoRARequest) -> HostAdapter:
        lid = lora.lora_int_id
        if lid in self.host:
            self.host.move_to_end(lid)
            return self.host[lid]
        fut = self._reading.pop(lid, None)
        try:  # (a background read that failed is tried again here, its error raised)
            out = fut.result() if fut is not None else None
        except Exception:
            out = None
        if out is None:
            out = self._read(lora)
        self._cache_host(lid, out)
        return out

    def _cache_host(self, lid: int, weights: HostAdapter) -> None:
        while len(self.host) >= self.config.max_cpu_loras:
            self.host.popitem(last=False)
        self.host[lid] = weights

    def _read(self, lora: LoRARequest) -> HostAdapter:
        """This rank's shards of an adapter, from disk (pinned on CUDA)."""
        aw = read_adapter(lora.lora_path, self.hf_config, self.config.max_lora_rank, self.dtype)
        self.num_disk_reads += 1
        pin = self.device.type == "cuda"
        out: HostAdapter = {}
        for key, (a, b) in aw.modules.items():
            layer_path, proj = key.rsplit(".", 1)
            block, merged, part = TARGETS[proj]
            name = f"{layer_path.rsplit('.', 1)[0]}.{block}.{merged}"
            if name not in self.layers:  # a layer of another pipeline stage
                continue
            mod, method = self.layers[name]
            a, b = method.shard(mod, part, a, b)
            if pin:
                a, b = a.pin_memory(), b.pin_memory()
            out.setdefault(name, [None] * mod.num_parts)[part] = (a, b)
        logger.info("LoRA %r (id %d) read from %s: rank %d, %.1f MiB", lora.lora_name,
                    lora.lora_int_id, lora.lora_path, aw.rank, aw.num_bytes / 2**20)
        return out


def with_lora_kernels(model: torch.nn.Module, manager: LoRAManager) -> None:
    """``model`` (the kernel warm-up's shadow, its layers wrapped by ``manager``) runs the LoRA
    kernels in every forward, as decode graphs do, so a dry run records their
    specializations too (worker/kernel_jobs.py)."""
    batch = manager.batch
    batch.in_graph = True
    forward = model.forward

    def with_segments(input_ids, positions, kv_caches, meta):
        batch.prepare(input_ids.shape[0])  # as the runner's _forward does
        return forward(input_ids, positions, kv_caches, meta)
    model.forward = with_segments
