"""Reading a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors, or .bin) and
checking it against the base model, so a bad adapter is refused with a reason before any
request uses it.

Supported: LoRA on the attention projections (q/k/v/o_proj) and the dense MLP (gate/up/
down_proj) of Llama-family layers, any rank up to max_lora_rank (per module, rank_pattern
included), ``lora_alpha`` / r scaling or rsLoRA's ``lora_alpha`` / sqrt(r) (alpha_pattern
included). Refused with a ValueError: DoRA, LoRA biases, embedding or lm_head adapters,
modules_to_save, fan_in_fan_out layouts, MoE expert projections, shapes that do not match the
base model."""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

# the projections an adapter may target -> (module path inside a layer, part of our merged
# Linear it becomes: (merged name, part index))
TARGETS = {"q_proj": ("self_attn", "qkv_proj", 0), "k_proj": ("self_attn", "qkv_proj", 1),
           "v_proj": ("self_attn", "qkv_proj", 2), "o_proj": ("self_attn", "o_proj", 0),
           "gate_proj": ("mlp", "gate_up_proj", 0), "up_proj": ("mlp", "gate_up_proj", 1),
           "down_proj": ("mlp", "down_proj", 0)}
_KEY = re.compile(r"^layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


@dataclass
class AdapterWeights:
    """One adapter's low-rank pairs, unsharded: "layers.{i}.{proj}" -> (A [r, in], B [out, r])
    with the scaling folded into B, in ``dtype``; ``rank`` the largest r."""

    path: str
    rank: int
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def num_bytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                   for a, b in self.modules.values())


def projection_shapes(hf_config: Any) -> dict[str, tuple[int, int]]:
    """(out, in) of each targetable projection of the base model (MoE models: attention
    only; their MLP projections are experts)."""
    h = hf_config.hidden_size
    heads = hf_config.num_attention_heads
    kv = getattr(hf_config, "num_key_value_heads", None) or heads
    d = getattr(hf_config, "head_dim", None) or h // heads
    shapes = {"q_proj": (heads * d, h), "k_proj": (kv * d, h), "v_proj": (kv * d, h),
              "o_proj": (h, heads * d)}
    moe = any(getattr(hf_config, k, None) for k in ("num_local_experts", "num_experts"))
    if not moe:
        i = hf_config.intermediate_size
        shapes.update(gate_proj=(i, h), up_proj=(i, h), down_proj=(h, i))
    return shapes


def _pattern_value(patterns: dict, name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the
    module's full name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", name):
            return value
    return default


def read_config(path: str) -> dict:
    cfg_file = os.path.join(path, "adapter_config.json")
    if not os.path.isdir(path):
        raise ValueError(f"LoRA adapter directory {path!r} does not exist.")
    if not os.path.isfile(cfg_file):
        raise ValueError(f"{path!r} has no adapter_config.json: not a PEFT adapter.")
    try:
        with open(cfg_file) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_file}: cannot read it ({e}).") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_file}: not a JSON object.")
    ptype = str(cfg.get("peft_type", "LORA")).upper()
    if ptype != "LORA":
        raise ValueError(f"{path!r} is a {ptype} adapter; only LORA adapters are supported.")
    unsupported = [
        (cfg.get("use_dora"), "DoRA (use_dora) adapters are not supported yet"),
        (cfg.get("bias", "none") not in (None, "none"),
         f"LoRA biases (bias={cfg.get('bias')!r}) are not supported"),
        (cfg.get("modules_to_save"), f"modules_to_save ({cfg.get('modules_to_save')}) is not "
                                     "supported (it replaces base weights)"),
        (cfg.get("fan_in_fan_out"), "fan_in_fan_out layouts are not supported"),
    ]
    for bad, why in unsupported:
        if bad:
            raise ValueError(f"LoRA adapter {path!r}: {why}.")
    targets = cfg.get("target_modules") or []
    names = [targets] if isinstance(targets, str) else list(targets)
    for t in names:
        if any(w in str(t) for w in ("embed_tokens", "lm_head", "wte")):
            raise ValueError(f"LoRA adapter {path!r} targets {t!r}: embedding and lm_head "
                             "adapters are not supported yet.")
    return cfg


def _weights_file(path: str) -> str:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            return f
    raise ValueError(f"{path!r} has no adapter_model.safetensors (or adapter_model.bin).")


def _tensor_shapes(file: str) -> dict[str, tuple[tuple[int, ...], bool]]:
    """name -> (shape, floating point) from a safetensors header (no tensor is read), or from
    a loaded .bin."""
    try:
        if file.endswith(".safetensors"):
            from safetensors import safe_open
            out = {}
            with safe_open(file, framework="pt", device="cpu") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    out[k] = (tuple(sl.get_shape()), sl.get_dtype() in _FLOAT_DTYPES)
            return out
        return {k: (tuple(t.shape), t.is_floating_point()) for k, t in _load(file).items()}
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"{file}: cannot read it ({type(e).__name__}: {e}).") from None


_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _load(file: str) -> dict[str, torch.Tensor]:
    try:
        if file.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(file)
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{file}: cannot read it ({type(e).__name__}: {e}).") from None


@dataclass(frozen=True)
class _Module:
    """One adapted projection: "layers.{i}.{block}.{proj}", its checkpoint keys, rank, scale."""

    name: str
    key_a: str
    key_b: str
    rank: int
    scale: float


def check_adapter(path: str, hf_config: Any, max_rank: int) -> list[_Module]:
    """The adapter at ``path`` checked against ``hf_config``'s shapes and ``max_rank`` from
    its config and tensor headers; ValueError naming what is wrong."""
    cfg = read_config(path)
    shapes = projection_shapes(hf_config)
    num_layers = hf_config.num_hidden_layers
    use_rslora = bool(cfg.get("use_rslora", False))
    r_default, alpha_default = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    pairs: dict[str, dict[str, tuple[str, tuple[int, ...], bool]]] = {}
    for key, (shape, floating) in _tensor_shapes(_weights_file(path)).items():
        name = key.removeprefix("base_model.model.").removeprefix("model.")
        m = _KEY.match(name)
        if m is None:
            what = ("DoRA magnitudes" if "lora_magnitude" in key else
                    "an embedding adapter" if "embedding" in key or "embed_tokens" in key else
                    "an lm_head adapter" if "lm_head" in key else "a tensor")
            raise ValueError(f"LoRA adapter {path!r}: {key!r} is {what} that servelm does not "
                             "support (LoRA A/B pairs of q/k/v/o_proj and gate/up/down_proj "
                             "only).")
        layer, block, proj, ab = int(m[1]), m[2], m[3], m[4]
        if proj not in shapes or TARGETS[proj][0] != block:
            why = ("MoE expert projections are not supported yet"
                   if proj in TARGETS else "not a projection servelm adapts")
            raise ValueError(f"LoRA adapter {path!r}: {key!r} targets {block}.{proj}: {why}.")
        if layer >= num_layers:
            raise ValueError(f"LoRA adapter {path!r}: {key!r} is for layer {layer}, but the "
                             f"base model has {num_layers} layers.")
        if not floating:
            raise ValueError(f"LoRA adapter {path!r}: {key!r} is not floating point.")
        pairs.setdefault(f"layers.{layer}.{block}.{proj}", {})[ab] = (key, shape, floating)
    if not pairs:
        raise ValueError(f"LoRA adapter {path!r} has no LoRA weights.")
    modules = []
    for mod, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA adapter {path!r}: {mod} has lora_{''.join(ab)} without "
                             f"lora_{'B' if 'A' in ab else 'A'}.")
        (ka, sa, _), (kb, sb, _) = ab["A"], ab["B"]
        out, inp = shapes[mod.rsplit(".", 1)[1]]
        r = sa[0] if sa else 0
        if len(sa) != 2 or len(sb) != 2 or sa[1] != inp or sb != (out, r):
            raise ValueError(f"LoRA adapter {path!r}: {mod} has A {sa} and B {sb}; the base "
                             f"model needs A [r, {inp}] and B [{out}, r] (an adapter for "
                             "another model?).")
        if r > max_rank:
            raise ValueError(f"LoRA adapter {path!r}: {mod} has rank {r}, over max_lora_rank "
                             f"({max_rank}); start the engine with --max-lora-rank >= {r}.")
        full = f"model.{mod}"
        r_cfg = _pattern_value(cfg.get("rank_pattern"), full, r_default)
        if r_cfg != r:
            raise ValueError(f"LoRA adapter {path!r}: {mod} has rank {r}, but its "
                             f"adapter_config.json says r={r_cfg}.")
        alpha = _pattern_value(cfg.get("alpha_pattern"), full, alpha_default)
        modules.append(_Module(mod, ka, kb, r, alpha / math.sqrt(r) if use_rslora else alpha / r))
    return modules


def read_adapter(path: str, hf_config: Any, max_rank: int,
                 dtype: torch.dtype = torch.float32) -> AdapterWeights:
    """The adapter at ``path`` (checked as ``check_adapter`` does), its scaling folded into B,
    in ``dtype``."""
    modules = check_adapter(path, hf_config, max_rank)
    tensors = _load(_weights_file(path))
    out = {m.name: (tensors[m.key_a].to(dtype), (tensors[m.key_b].float() * m.scale).to(dtype))
           for m in modules}
    return AdapterWeights(path, max(m.rank for m in modules), out)
