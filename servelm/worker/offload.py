"""CPU weight offload (``cpu_offload_gb``, vLLM's name; the idea of FlexGen and ZeRO-Inference):
the parameters of the first decoder layers, as many as make up that many GiB, live in host
memory (pinned, so copies run at the bus's speed) and each runs from one of two device staging
buffers. While layer j computes, layer j + 1's weights are copied into the other buffer on a
side stream; a copy into a buffer waits for the layer that last used it (events), and a layer
waits for its own copy. So a model larger than the device still serves, at a speed set by the
host-to-device bandwidth for the offloaded part.

Offloaded layers run eagerly (no CUDA graphs: the copies are issued by Python hooks). On the
CPU the same hooks copy between host tensors: correct, and only useful to test the mechanism.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import nn


def layers_to_offload(layers: list[nn.Module], gib: float) -> int:
    """How many of the first decoder layers hold ``gib`` GiB of parameters (at least one
    when gib > 0; at most all)."""
    if gib <= 0 or not layers:
        return 0
    per_layer = sum(p.numel() * p.element_size() for p in layers[0].parameters())
    return min(len(layers), max(1, math.ceil(gib * (1 << 30) / per_layer)))


class LayerStreamer:
    """Streams ``layers``' parameters (host copies) through two device buffers. Layers must
    share one structure (the same parameter names, shapes and dtypes, in order)."""

    def __init__(self, layers: list[nn.Module], device: torch.device) -> None:
        first = [(n, p.shape, p.dtype) for n, p in layers[0].named_parameters()]
        for layer in layers[1:]:
            if [(n, p.shape, p.dtype) for n, p in layer.named_parameters()] != first:
                raise ValueError("cpu_offload_gb: the offloaded layers differ in their "
                                 "parameters; only layers of one shape can share buffers")
        self.layers, self.device = layers, device
        self.cuda = device.type == "cuda"
        # host[j][i]: layer j's i-th parameter in (pinned) host memory
        self.host = [[self._to_host(p) for p in layer.parameters()] for layer in layers]
        # two staging buffers, each one layer's parameters on the device
        self.slots = [[torch.empty(p.shape, dtype=p.dtype, device=device)
                       for p in layers[0].parameters()] for _ in range(2)]
        for layer, slot in zip(layers, self.slots * len(layers)):
            for p, t in zip(layer.parameters(), slot):
                p.data = t  # until its turn: the device holds two layers' worth, no more
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.filled: list[Optional[torch.cuda.Event]] = [None, None]
        self.freed: list[Optional[torch.cuda.Event]] = [None, None]
        self.loaded: list[Optional[int]] = [None, None]  # the layer each buffer holds
        for j, layer in enumerate(layers):
            layer.register_forward_pre_hook(functools.partial(self._before, j))
            layer.register_forward_hook(functools.partial(self._after, j))
        self._fill(0)

    def _to_host(self, p: torch.Tensor) -> torch.Tensor:
        t = p.detach().to("cpu", copy=True)
        return t.pin_memory() if self.cuda else t

    @property
    def device_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.slots for t in s)

    @property
    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for h in self.host for t in h)

    def _fill(self, j: int) -> None:
        """Start copying layer j's parameters into buffer j % 2, once its last user is done."""
        slot = j % 2
        self.loaded[slot] = j
        if not self.cuda:
            for dst, src in zip(self.slots[slot], self.host[j]):
                dst.copy_(src)
            return
        with torch.cuda.stream(self.stream):
            if self.freed[slot] is not None:
                self.stream.wait_event(self.freed[slot])
            for dst, src in zip(self.slots[slot], self.host[j]):
                dst.copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
            self.filled[slot] = ev

    def _before(self, j: int, module: nn.Module, args) -> None:
        slot = j % 2
        if self.loaded[slot] != j:  # out of the usual order (a forward through the first
            self._fill(j)           # layers only, as layer-skip drafting runs): fetch it now
        if self.cuda and self.filled[slot] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.filled[slot])
        for p, t in zip(module.parameters(), self.slots[slot]):
            p.data = t
        if j + 1 < len(self.layers):  # the next offloaded layer, into the other buffer
            self._fill(j + 1)

    def _after(self, j: int, module: nn.Module, args, output) -> None:
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self.freed[j % 2] = ev
        if j + 1 == len(self.layers):  # the next forward starts with the first one again
            self._fill(0)


def offload_layers(model: nn.Module, gib: float, device: torch.device) -> LayerStreamer:
    """``model`` built and loaded in host memory: its first decoder layers (of this pipeline
    stage), ``gib`` GiB of them, stay there behind a LayerStreamer; every other parameter and
    every buffer moves to ``device``."""
    layers = [m for m in model.layers if not isinstance(m, nn.Identity)]
    offloaded = layers[:layers_to_offload(layers, gib)]
    kept_on_host = {id(p) for m in offloaded for p in m.parameters()}
    for mod in model.modules():
        for name, p in mod._parameters.items():
            if p is not None and id(p) not in kept_on_host:
                p.data = p.data.to(device)
        for name, b in mod._buffers.items():
            if b is not None:
                mod._buffers[name] = b.to(device)
        for name, v in list(vars(mod).items()):  # plain tensor attributes (rotary tables)
            if isinstance(v, torch.Tensor) and not name.startswith("_"):
                setattr(mod, name, v.to(device))
    return LayerStreamer(offloaded, device)
