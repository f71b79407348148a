"""``speculative_config``: vLLM's keys, validated once into a frozen SpeculativeConfig."""
from __future__ import annotations

import json
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Optional, Union

# method -> "module:Class" of its Proposer (servelm.registry.load_class)
PROPOSERS = MappingProxyType({"ngram": "servelm.spec_decode.ngram:NgramProposer"})
# named by the issue and vLLM, not built yet: refused with that reason, never ignored
PLANNED_METHODS = ("draft_model", "layer_skip")

_KEYS = {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
         "disable_by_batch_size"}


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int  # k: drafts per request per step (at most)
    prompt_lookup_min: int = 1  # ngram: shortest suffix matched against the earlier tokens
    prompt_lookup_max: int = 4  # ngram: longest (tried first)
    # no drafts while more requests than this sample in a step: large batches are compute-bound,
    # where verifying drafts costs more than it saves (vLLM's speculative_disable_by_batch_size)
    disable_by_batch_size: Optional[int] = None


def _int(d: dict, key: str, default: Optional[int], lo: int) -> Optional[int]:
    v = d.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"speculative_config[{key!r}] must be an integer >= {lo}, got {v!r}.")
    return v


def parse_speculative_config(raw: Union[None, str, dict, SpeculativeConfig]
                             ) -> Optional[SpeculativeConfig]:
    """A dict (or its JSON text, as the CLI passes it) -> SpeculativeConfig; None: off."""
    if raw is None or isinstance(raw, SpeculativeConfig):
        return raw
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"speculative_config is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"speculative_config must be a dict, got {type(raw).__name__}.")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ValueError(f"speculative_config has unknown key(s) {unknown}; known keys: "
                         f"{sorted(_KEYS)}.")
    method = raw.get("method")
    if method in PLANNED_METHODS:
        raise ValueError(f"speculative_config['method'] {method!r} is not implemented yet; "
                         f"available: {sorted(PROPOSERS)}.")
    if method not in PROPOSERS:
        raise ValueError(f"speculative_config['method'] must be one of {sorted(PROPOSERS)}, "
                         f"got {method!r}.")
    k = _int(raw, "num_speculative_tokens", None, 1)
    if k is None:
        raise ValueError("speculative_config needs 'num_speculative_tokens' (an integer >= 1).")
    lo = _int(raw, "prompt_lookup_min", 1, 1)
    hi = _int(raw, "prompt_lookup_max", max(lo, 4), 1)
    if hi < lo:
        raise ValueError(f"speculative_config['prompt_lookup_max'] ({hi}) must be >= "
                         f"prompt_lookup_min ({lo}).")
    return SpeculativeConfig(method, k, lo, hi, _int(raw, "disable_by_batch_size", None, 1))


def build_proposer(cfg: SpeculativeConfig, model_config: Any) -> Any:
    from servelm.registry import load_class
    proposer = load_class(PROPOSERS, cfg.method, "speculative_config['method']")(cfg)
    proposer.load(model_config)
    return proposer
