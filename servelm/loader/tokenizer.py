"""Tokenizers and the token ids that end generation.

A HF directory gets transformers' AutoTokenizer (imported there only); a .gguf file and a dummy
preset get servelm's LightTokenizer (gguf_tokenizer, synthetic_tokenizer), so those paths run
without importing transformers."""
from __future__ import annotations

import json
import os
from typing import Any, Iterator

from servelm.loader.config import check_load_format, resolve_load_format
from servelm.loader.default_model import resolve_model

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(
    model: str | None, tokenizer: str | None = None, load_format: str = "auto"
) -> Any:
    """The tokenizer of `tokenizer` if given (a HF directory or .gguf file), else of `model`.

    With load_format="dummy" and no `tokenizer`: the tokenizer of a HF directory (if it has one)
    or .gguf file given as `model`; for a preset name, a synthetic tokenizer of the preset's
    vocabulary (one word per id, see synthetic_tokenizer); otherwise None (the engine then takes
    and returns token ids only).
    """
    check_load_format(load_format)
    if tokenizer is not None:
        return _load(resolve_model(tokenizer), "auto")
    if load_format == "dummy":
        from servelm.loader.presets import PRESETS
        if model in PRESETS:
            from servelm.loader.synthetic_tokenizer import preset_tokenizer
            return preset_tokenizer(model)
        path = os.path.expanduser(model) if model is not None else ""
        if not os.path.exists(path) or (
            os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES)
        ):
            return None
        return _load(path, "auto")
    path = resolve_model(model)
    return _load(path, load_format)


def _load(path: str, load_format: str) -> Any:
    if resolve_load_format(path, load_format) == "gguf":
        from servelm.loader.gguf_tokenizer import load_gguf_tokenizer
        return load_gguf_tokenizer(path)
    if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        raise ValueError(
            f"{path!r} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}): "
            "pass tokenizer=<a local HF directory or .gguf file> that has one"
        )
    from transformers import AutoTokenizer  # here only: GGUF files and presets never import it

    return AutoTokenizer.from_pretrained(path)


def load_generation_eos_ids(
    model: str | None, config: Any, tokenizer: Any
) -> list[int]:
    """Token ids that stop generation, deduplicated, in the first source that has any:
    the model directory's generation_config.json, config.eos_token_id (plus, for a config built
    by load_hf_config from a GGUF, its end-of-turn/-message ids), tokenizer.eos_token_id.
    Empty if none has any.
    """
    path = _local_path(model)
    sources: list[Any] = []
    if path is not None and os.path.isdir(path):
        gen_file = os.path.join(path, "generation_config.json")
        if os.path.isfile(gen_file):
            with open(gen_file) as f:
                sources.append(json.load(f).get("eos_token_id"))
    sources.append([getattr(config, "eos_token_id", None), getattr(config, "eog_token_ids", None)])
    sources.append(getattr(tokenizer, "eos_token_id", None))
    for source in sources:
        ids = _flatten_ids(source)
        if ids:
            return ids
    return []


def _local_path(model: str | None) -> str | None:
    """The model's local path, or None for a preset name or a missing default model."""
    if model is None:
        try:
            return resolve_model(None)
        except ValueError:
            return None
    path = os.path.expanduser(model)
    return path if os.path.exists(path) else None


def _flatten_ids(value: Any) -> list[int]:
    """Deduplicated ints of an id, a list of ids or nested lists (None entries dropped)."""
    def walk(v: Any) -> Iterator[int]:
        if isinstance(v, (list, tuple)):
            for item in v:
                yield from walk(item)
        elif v is not None:
            yield int(v)

    return list(dict.fromkeys(walk(value)))
