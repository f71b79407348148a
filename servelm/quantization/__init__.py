"""Linear methods (weight layouts and their matmuls), chosen by the ``quantization`` engine
argument from a registry; see ``base.LinearMethod``."""
from __future__ import annotations

from types import MappingProxyType
from typing import Optional

from servelm.quantization.base import LinearMethod
from servelm.registry import check_name, load_class

# name -> LinearMethod class. None (the default) means "unquantized": weights as stored.
QUANTIZATION_METHODS = MappingProxyType({
    "unquantized": "servelm.quantization.unquantized:UnquantizedLinearMethod",
})


def check_quantization(name: Optional[str]) -> Optional[str]:
    return None if name is None else check_name(QUANTIZATION_METHODS, name, "quantization")


def get_linear_method(quantization: Optional[str], prefix: str,
                      use_kernel: bool = False) -> LinearMethod:
    """The method for the layer named ``prefix`` (e.g. "layers.3.mlp.down_proj"), chosen once
    when the layer is built. ``prefix`` lets a method leave some layers dense."""
    cls = load_class(QUANTIZATION_METHODS, quantization or "unquantized", "quantization")
    return cls(use_kernel=use_kernel)


__all__ = ["LinearMethod", "QUANTIZATION_METHODS", "check_quantization", "get_linear_method"]
