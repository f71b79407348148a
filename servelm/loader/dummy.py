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

    Quantized linear layers (any LinearMethod but the dense one) get the same kind of dense
    random weight, part by part, through their method's ``load_weight``: a random checkpoint
    that their method converts as it would a real one.
    """
    from servelm.layers.linear import Linear
    from servelm.quantization.unquantized import UnquantizedLinearMethod
    quantized = {id(m): m for m in model.modules()
                 if isinstance(m, Linear) and not isinstance(m.method, UnquantizedLinearMethod)}
    # modules that fill themselves (a mixture of experts' stacked, maybe quantized, experts)
    quantized.update({id(m): m for m in model.modules() if hasattr(m, "fill_dummy")})
    for i, (name, mod) in enumerate(model.named_modules()):
        if hasattr(mod, "fill_dummy"):
            mod.fill_dummy(seed * 1_000_003 + 7919 * i)
        elif id(mod) in quantized:
            _fill_quantized(mod, seed * 1_000_003 + 7919 * i)
    owned = {id(p) for m in quantized.values() for p in m.parameters()}
    for i, (name, param) in enumerate(model.named_parameters()):
        if id(param) in owned or not param.is_floating_point() or param.device.type == "meta":
            continue
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


def _fill_quantized(layer, seed: int) -> None:
    """Dense U(-1/sqrt(in), 1/sqrt(in)) weights (and small biases) for each part of a quantized
    layer, on its device, loaded through its method."""
    if not layer.method.accepts_dense:
        raise ValueError(f"{layer.prefix}: load_format='dummy' makes dense weights, which "
                         f"{type(layer.method).__name__} cannot load")
    device = next(layer.parameters()).device
    dtype = torch.float32  # methods round to the model dtype before they quantize
    generator = torch.Generator(device=device)
    bound = layer.input_size ** -0.5
    for part, rows in enumerate(layer.output_sizes):
        generator.manual_seed(seed + part)
        w = torch.empty(rows, layer.input_size, device=device, dtype=dtype)
        layer.load_weight("weight", w.uniform_(-bound, bound, generator=generator), part)
        if layer.bias is not None:
            b = torch.empty(rows, device=device, dtype=dtype)
            layer.load_weight("bias", b.uniform_(-_BIAS_BOUND, _BIAS_BOUND, generator=generator), part)
