"""Random PEFT LoRA adapters for transformers models, and those models with an adapter merged
in (the reference servelm's adapters are compared with)."""
from __future__ import annotations

import copy
import json
import math
import os

import torch

from servelm.lora.synthetic import write_random_adapter


def write_adapter(path: str, hf_model, **kw) -> str:
    """A random PEFT adapter for hf_model (servelm.lora.synthetic.write_random_adapter's
    keywords: rank, seed, targets, alpha, use_rslora, layers, scale, extra_config)."""
    return write_random_adapter(path, hf_model.config, **kw)


def merged_model(hf_model, path: str):
    """A copy of hf_model with the adapter at ``path`` merged: W + scale * B @ A."""
    from safetensors.torch import load_file
    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    m = copy.deepcopy(hf_model)
    mods = dict(m.named_modules())
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        name = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        r = a.shape[0]
        alpha = cfg["lora_alpha"]
        for pat, v in (cfg.get("alpha_pattern") or {}).items():
            if name.endswith(pat):
                alpha = v
        s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        with torch.no_grad():
            mods[name].weight += s * (b.double() @ a.double()).to(mods[name].weight.dtype)
    return m
