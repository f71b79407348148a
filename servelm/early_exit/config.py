"""``early_exit_config``: {"threshold": 0.9, "min_layer": 12, "criterion": "max_prob"|"margin",
"exit_layers": [...]}, validated into a frozen EarlyExitConfig."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from servelm.config_dict import parse_config_dict

CRITERIA = ("max_prob", "margin", "state")
_KEYS = ("threshold", "min_layer", "criterion", "exit_layers")


@dataclass(frozen=True)
class EarlyExitConfig:
    """threshold: a token exits after a candidate layer once its confidence there is at least
    this (above 1: never). criterion: "max_prob" (the top token's probability), "margin"
    (the top two tokens' probability gap), or "state" (CALM's hidden-state saturation: the
    cosine similarity of the residual stream before and after the layer, which needs no
    lm_head pass at the candidates). Candidate layers: every n from ``min_layer`` to the second
    to last (layer counts: exiting after layer n skips layers n+1..), or of those only the ones
    ``exit_layers`` lists. Each candidate costs the final norm, and (but for "state") the
    lm_head on the tokens still running."""

    threshold: float
    min_layer: int = 1
    criterion: str = "max_prob"
    exit_layers: Optional[tuple[int, ...]] = None

    def candidates(self, num_layers: int) -> tuple[int, ...]:
        ok = range(max(1, self.min_layer), num_layers)
        return tuple(n for n in (self.exit_layers or ok) if n in ok)


def parse_early_exit_config(value: Any) -> Optional[EarlyExitConfig]:
    """A dict, its JSON text, or None (off) -> EarlyExitConfig; ValueError naming the key."""
    if value is None or isinstance(value, EarlyExitConfig):
        return value
    value = parse_config_dict(value, "early_exit_config", _KEYS)
    if "threshold" not in value:
        raise ValueError("early_exit_config needs a 'threshold' (confidence in [0, 1] at which "
                         "a token exits; above 1: never).")
    thr = value["threshold"]
    if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not thr >= 0:
        raise ValueError(f"early_exit_config threshold must be a number >= 0, got {thr!r}.")
    crit = value.get("criterion", "max_prob")
    if crit not in CRITERIA:
        raise ValueError(f"early_exit_config criterion must be one of {list(CRITERIA)}, "
                         f"got {crit!r}.")
    min_layer = value.get("min_layer", 1)
    if isinstance(min_layer, bool) or not isinstance(min_layer, int) or min_layer < 1:
        raise ValueError(f"early_exit_config min_layer must be an integer >= 1, got "
                         f"{min_layer!r}.")
    layers = value.get("exit_layers")
    if layers is not None:
        if (not isinstance(layers, list) or not layers
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1
                           for n in layers)):
            raise ValueError("early_exit_config exit_layers must be a non-empty list of layer "
                             "counts >= 1.")
        layers = tuple(sorted(set(layers)))
    return EarlyExitConfig(float(thr), min_layer, crit, layers)


def check_early_exit(cfg: EarlyExitConfig, num_layers: int) -> None:
    """Against the model: some candidate layer before the last."""
    if not cfg.candidates(num_layers):
        raise ValueError(f"early_exit_config has no exit layer before the model's last "
                         f"({num_layers} layers): lower min_layer or exit_layers.")
