"""The dict-valued engine settings (``speculative_config``, ``structured_outputs_config``,
``early_exit_config``): given as a dict or as its JSON text (the CLI's form)."""
from __future__ import annotations

import json
from typing import Any, Iterable


def parse_config_dict(value: Any, what: str, known: Iterable[str]) -> dict:
    """``value`` (a dict, or its JSON text) as a dict whose keys are all in ``known``; a
    ValueError naming ``what`` for text that is not JSON, a value that is not an object, or
    unknown keys."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object (a dict), got {type(value).__name__}.")
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ValueError(f"{what} has unknown key(s) {unknown}; known keys: {sorted(known)}.")
    return value
