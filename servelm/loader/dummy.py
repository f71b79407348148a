"""Random weights for `load_format="dummy"`: the real model's shapes and speed, meaningless outputs."""
from __future__ import annotations

import torch

_NORM_NOISE = 0.02  # norm gains are 1 +- this (bf16 resolves steps of 1/128 near 1)
_BIAS_BOUND = 1e-3


@torch.no_grad()
def initialize_dummy_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Fills every floating-point parameter of `model` in place, on its own device, from `seed`.

    Matrices get U(-1/sqrt(in), 1/sqrt(in)) so each linear keeps unit scale, and RMSNorm rescales
    every layer's input: activations stay finite in bf16 through any depth. Norm gains are
    ~1 and biases ~0. Parameter i draws from its own generator seeded with `seed` and i, so the
    result does not depend on which other parameters exist on which device.
    """
    for i, (name, param) in enumerate(model.named_parameters()):
        if not param.is_floating_point() or param.device.type == "meta":
            continue  # packed integer weights of quantized layers keep their values; meta has no storage
        generator = torch.Generator(device=param.device)
        generator.manual_seed(seed * 1_000_003 + i)
        module_name = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
        if param.dim() >= 2:
            bound = param.shape[-1] ** -0.5  # [out, in]: fan-in is the last dim
            param.uniform_(-bound, bound, generator=generator)
        elif "norm" in module_name:
            param.uniform_(1.0 - _NORM_NOISE, 1.0 + _NORM_NOISE, generator=generator)
        else:
            param.uniform_(-_BIAS_BOUND, _BIAS_BOUND, generator=generator)
