"""servelm: fast serving of generative language models.

The public names load on first use (PEP 562): ``import servelm`` and the ``servelm`` command
start without importing torch, so `servelm serve` can start its engine core process first
(engine/core_launcher.py)."""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_EXPORTS = {"LLM": "servelm.engine.llm", "EngineArgs": "servelm.config",
            "SamplingParams": "servelm.sampling_params",
            "StructuredOutputsParams": "servelm.structured_output",
            "RequestOutput": "servelm.outputs", "CompletionOutput": "servelm.outputs",
            "Logprob": "servelm.outputs", "LoRARequest": "servelm.lora.request"}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'servelm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
