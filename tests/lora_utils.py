"""PEFT-format LoRA adapters with random A *and* B (PEFT starts B at zero, which would make
every comparison vacuous), and transformers models with an adapter merged in (the reference)."""
from __future__ import annotations

import copy
import json
import math
import os
from typing import Optional, Sequence

import torch

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(path: str, hf_model, rank: int = 8, seed: int = 0,
                  targets: Sequence[str] = ALL_TARGETS, alpha: Optional[float] = None,
                  use_rslora: bool = False, layers: Optional[Sequence[int]] = None,
                  scale: float = 0.5, extra_config: Optional[dict] = None) -> str:
    """A PEFT adapter for hf_model (a Llama-family transformers model) at ``path``: rank
    ``rank`` on ``targets`` of ``layers`` (default all), random A and B of a size that moves
    the greedy output."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    cfg = hf_model.config
    tensors = {}
    for i, layer in enumerate(hf_model.model.layers):
        if layers is not None and i not in layers:
            continue
        for proj in targets:
            block = layer.self_attn if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
            w = getattr(block, proj).weight
            out, inp = w.shape
            kind = "self_attn" if block is layer.self_attn else "mlp"
            key = f"base_model.model.model.layers.{i}.{kind}.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, inp, generator=g) * scale / math.sqrt(inp)
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=g) * scale / math.sqrt(rank)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha if alpha is not None else 2 * rank,
              "target_modules": list(targets), "use_rslora": use_rslora, "use_dora": False,
              "bias": "none", "base_model_name_or_path": cfg.name_or_path, "task_type": "CAUSAL_LM",
              **(extra_config or {})}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    return path


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
