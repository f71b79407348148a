"""Model inputs: configs, weights (safetensors, GGUF, dummy) and tokenizers, all from local files."""
from servelm.loader.arch_config import ArchConfig
from servelm.loader.config import LOAD_FORMATS, load_hf_config, resolve_load_format, rope_parameters
from servelm.loader.default_model import MissingDependencyError, default_model_path, resolve_model
from servelm.loader.dummy import initialize_dummy_weights
from servelm.loader.presets import PRESETS, preset_config
from servelm.loader.tokenizer import load_generation_eos_ids, load_tokenizer
from servelm.loader.weights import iter_weights

__all__ = [
    "ArchConfig",
    "LOAD_FORMATS",
    "MissingDependencyError",
    "PRESETS",
    "default_model_path",
    "initialize_dummy_weights",
    "iter_weights",
    "load_generation_eos_ids",
    "load_hf_config",
    "load_tokenizer",
    "preset_config",
    "resolve_load_format",
    "resolve_model",
    "rope_parameters",
]
