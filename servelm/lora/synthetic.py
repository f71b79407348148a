"""Random PEFT LoRA adapters for a base model's shapes, for tests and benchmarks (no weights are
downloaded). A *and* B are random: PEFT initialises B to zero, which would leave the output
unchanged and every comparison vacuous."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Optional, Sequence

import torch

from servelm.lora.peft import TARGETS, projection_shapes

ALL_TARGETS = tuple(TARGETS)


def write_random_adapter(path: str, hf_config: Any, rank: int = 8, seed: int = 0,
                         targets: Sequence[str] = ALL_TARGETS, alpha: Optional[float] = None,
                         use_rslora: bool = False, layers: Optional[Sequence[int]] = None,
                         scale: float = 0.5, extra_config: Optional[dict] = None,
                         dtype: torch.dtype = torch.float32) -> str:
    """Writes adapter_config.json and adapter_model.safetensors at ``path``: rank ``rank`` on
    ``targets`` of ``layers`` (default all), entries of A ~ N(0, scale^2 / in) and of
    B ~ N(0, scale^2 / r), so the product moves the output by about ``scale`` of its size."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    shapes = projection_shapes(hf_config)
    missing = [t for t in targets if t not in shapes]
    if missing:
        raise ValueError(f"this model has no adaptable {missing}")
    tensors = {}
    for i in range(hf_config.num_hidden_layers):
        if layers is not None and i not in layers:
            continue
        for proj in targets:
            out, inp = shapes[proj]
            key = f"base_model.model.model.layers.{i}.{TARGETS[proj][0]}.{proj}"
            a = torch.randn(rank, inp, generator=g) * (scale / math.sqrt(inp))
            b = torch.randn(out, rank, generator=g) * (scale / math.sqrt(rank))
            tensors[f"{key}.lora_A.weight"] = a.to(dtype)
            tensors[f"{key}.lora_B.weight"] = b.to(dtype)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank if alpha is None else alpha,
              "target_modules": list(targets), "use_rslora": use_rslora, "use_dora": False,
              "bias": "none", "task_type": "CAUSAL_LM", **(extra_config or {})}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    return path
