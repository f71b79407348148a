"""Name -> implementation registries: each is a read-only map from a public name to the
``"module:Class"`` path of its class, imported only when chosen (so optional dependencies such
as triton load only for the backend that needs them)."""
from __future__ import annotations

import importlib
from typing import Any, Mapping


def check_name(registry: Mapping[str, str], name: object, what: str, extra: tuple[str, ...] = ()) -> str:
    """``name`` if the registry (or ``extra``) has it; else a ValueError listing the known ones."""
    if not isinstance(name, str) or (name not in registry and name not in extra):
        known = ", ".join(repr(n) for n in (*extra, *registry))
        raise ValueError(f"{what} must be one of {known}; got {name!r}.")
    return name


def load_class(registry: Mapping[str, str], name: str, what: str) -> Any:
    module, _, cls = registry[check_name(registry, name, what)].partition(":")
    return getattr(importlib.import_module(module), cls)
