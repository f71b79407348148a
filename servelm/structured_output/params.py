"""What a request constrains its output to (vLLM's ``StructuredOutputsParams``), and the engine's
structured-output settings (vLLM's ``--structured-outputs-config``).

Exactly one constraint per request: a JSON schema, any JSON object, a regular expression, one of
a list of strings, or an EBNF grammar. The schema travels as JSON text (property order kept:
the grammar emits properties in schema order), so the params hash, compare and cross the
process boundary as plain data.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

from servelm.config_dict import parse_config_dict

# bounds on what one request may ask the compiler to build (larger is a 400)
MAX_SPEC_CHARS = 256 * 1024
MAX_CHOICES = 1024

_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputsParams:
    json: Optional[str] = None  # a JSON schema, as JSON text (a dict is converted)
    json_object: bool = False  # any JSON object (OpenAI's response_format json_object)
    regex: Optional[str] = None
    choice: Optional[tuple[str, ...]] = None
    grammar: Optional[str] = None  # EBNF (GBNF-style, as xgrammar and llama.cpp read it)
    # JSON without free whitespace between tokens (vLLM's disable_any_whitespace); None: the
    # engine's default
    disable_any_whitespace: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.json is not None and not isinstance(self.json, str):
            if not isinstance(self.json, (dict, bool)):
                raise ValueError("structured_outputs json must be a JSON schema (an object), "
                                 f"got {type(self.json).__name__}.")
            object.__setattr__(self, "json", json.dumps(self.json, ensure_ascii=False))
        if self.choice is not None and not isinstance(self.choice, tuple):
            if not isinstance(self.choice, list):
                raise ValueError("structured_outputs choice must be a list of strings.")
            object.__setattr__(self, "choice", tuple(self.choice))
        kinds = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(kinds) != 1:
            raise ValueError("structured outputs take exactly one of json, json_object, regex, "
                             f"choice, grammar; got {kinds or 'none'}.")
        text = self.spec_text
        if len(text) > MAX_SPEC_CHARS:
            raise ValueError(f"the structured-output {self.kind} is {len(text)} characters; the "
                             f"limit is {MAX_SPEC_CHARS}.")
        if self.choice is not None:
            if not self.choice or len(self.choice) > MAX_CHOICES:
                raise ValueError(f"structured_outputs choice must have 1 to {MAX_CHOICES} "
                                 f"entries, got {len(self.choice)}.")
            if not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError("structured_outputs choice must be non-empty strings.")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"structured_outputs {name} must be a non-empty string.")
        v = self.disable_any_whitespace
        if v is not None and not isinstance(v, bool):
            raise ValueError(f"structured_outputs disable_any_whitespace must be a boolean, "
                             f"got {v!r}.")

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    @property
    def spec_text(self) -> str:
        if self.choice is not None:
            return "\n".join(self.choice)
        v = getattr(self, self.kind)
        return "" if isinstance(v, bool) else v

    def with_defaults(self, config: "StructuredOutputsConfig") -> "StructuredOutputsParams":
        """Options the request left unset take the engine's defaults (so equal requests share
        a cache key whichever way they were spelled)."""
        return replace(
            self,
            disable_any_whitespace=(config.disable_any_whitespace
                                    if self.disable_any_whitespace is None
                                    else self.disable_any_whitespace))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["choice"] = list(self.choice) if self.choice is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StructuredOutputsParams":
        return cls(**d)


BACKENDS = ("auto", "xgrammar")


@dataclass(frozen=True)
class StructuredOutputsConfig:
    """Engine-wide settings (``structured_outputs_config``, vLLM's keys plus a compile limit)."""

    backend: str = "auto"  # auto = xgrammar, the one backend here
    disable_any_whitespace: bool = False
    # a grammar still compiling after this long fails its request (HTTP 400); the compile
    # itself runs on in its thread and lands in the cache
    compile_timeout_s: float = 10.0
    # compiled grammars kept (xgrammar's own cache is bounded in bytes as well)
    max_cached_grammars: int = 1024
    # grammars compiled and masks filled in a process of their own (service.py), beside the
    # engine's host work: "auto" = on CUDA with the model in the engine's process, else off
    mask_process: Any = "auto"

    @classmethod
    def parse(cls, value: Any) -> "StructuredOutputsConfig":
        """From engine arguments: None, a dict, or its JSON text."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        value = parse_config_dict(value, "structured_outputs_config",
                                  ("backend", "disable_any_whitespace", "compile_timeout_s",
                                   "max_cached_grammars", "mask_process"))
        cfg = cls(**value)
        if cfg.backend not in BACKENDS:
            raise ValueError(f"structured_outputs_config backend must be one of {list(BACKENDS)}, "
                             f"got {cfg.backend!r}.")
        if not isinstance(cfg.disable_any_whitespace, bool):
            raise ValueError("structured_outputs_config disable_any_whitespace must be a boolean.")
        t = cfg.compile_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ValueError(f"structured_outputs_config compile_timeout_s must be > 0, got {t!r}.")
        if cfg.mask_process not in ("auto", True, False):
            raise ValueError("structured_outputs_config mask_process must be \"auto\", true or "
                             f"false, got {cfg.mask_process!r}.")
        n = cfg.max_cached_grammars
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError("structured_outputs_config max_cached_grammars must be an integer "
                             ">= 1.")
        return cfg
