"""Linear methods (weight layouts and their matmuls), chosen once per layer from the model's
QuantConfig (quantization/config.py) through a registry; see ``base.LinearMethod``."""
from __future__ import annotations

from types import MappingProxyType
from typing import Optional

from servelm.quantization.base import LinearMethod
from servelm.quantization.config import QuantConfig, resolve_quant_config
from servelm.registry import check_name, load_class

# the `quantization` engine argument's names -> LinearMethod class
QUANTIZATION_METHODS = MappingProxyType({
    "none": "servelm.quantization.unquantized:UnquantizedLinearMethod",
    "unquantized": "servelm.quantization.unquantized:UnquantizedLinearMethod",  # = none
    "fp8": "servelm.quantization.fp8:Fp8LinearMethod",
    "int8": "servelm.quantization.int8:Int8LinearMethod",
    "int4": "servelm.quantization.int4:Int4LinearMethod",
    "gptq": "servelm.quantization.gptq:GPTQLinearMethod",
    "awq": "servelm.quantization.gptq:AWQLinearMethod",
    "gguf": "servelm.quantization.gguf:GGUFLinearMethod",
})


def check_quantization(name: Optional[str]) -> Optional[str]:
    return None if name is None else check_name(QUANTIZATION_METHODS, name, "quantization")


def get_linear_method(quant_config: Optional[QuantConfig], prefix: str,
                      use_kernel: bool = False) -> LinearMethod:
    """The method for the layer named ``prefix`` (e.g. "layers.3.mlp.down_proj"), chosen once
    when the layer is built: dense for None and for the layers the checkpoint keeps dense."""
    name = "none" if quant_config is None or quant_config.keeps_dense(prefix) else quant_config.method
    cls = load_class(QUANTIZATION_METHODS, name, "quantization")
    return cls(quant_config, prefix, use_kernel)


__all__ = ["LinearMethod", "QUANTIZATION_METHODS", "QuantConfig", "check_quantization",
           "get_linear_method", "resolve_quant_config"]
