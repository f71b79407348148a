"""Serve-time settings taken from files, as vLLM takes them: ``--chat-template`` (a file or an
inline Jinja string) and ``--generation-config`` (the sampling defaults of a model's
generation_config.json), and how those defaults fill the fields a request leaves unset."""
from __future__ import annotations

import codecs
import json
import logging
import os
from typing import Any, Optional

logger = logging.getLogger(__name__)

# generation_config.json key -> request field, the keys vLLM reads (transformers' names)
_GENERATION_KEYS = (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                    ("min_p", "min_p"), ("repetition_penalty", "repetition_penalty"),
                    ("max_new_tokens", "max_tokens"))
_JINJA_CHARS = "{}\n"  # a string with none of these is meant as a path, not a template


def load_chat_template(value: Optional[str]) -> Optional[str]:
    """``--chat-template``: a readable file's text, else the value itself as a template
    (backslash escapes such as ``\\n`` interpreted, as vLLM does). A value that looks like a
    path but cannot be read is an error rather than a one-line template. Checked to compile."""
    if value is None:
        return None
    try:
        with open(value, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        if not any(c in value for c in _JINJA_CHARS):
            raise ValueError(f"--chat-template {value!r} looks like a file path but cannot be "
                             f"read ({e.strerror}); pass a readable file or a Jinja string.") \
                from None
        text = codecs.decode(value, "unicode_escape")
    from servelm.loader.chat_template import compile_chat_template
    try:
        compile_chat_template(text)
    except Exception as e:  # jinja2.TemplateSyntaxError and friends
        raise ValueError(f"--chat-template is not a valid Jinja template: {e}") from None
    return text


def set_chat_template(tokenizer: Any, template: Optional[str]) -> None:
    """Makes ``template`` the tokenizer's own, so chat completions, /tokenize and
    /tokenizer_info all use it (no tokenizer: nothing to override)."""
    if template is not None and tokenizer is not None:
        tokenizer.chat_template = template


def load_generation_defaults(setting: str, model_path: str) -> tuple[tuple[str, Any], ...]:
    """``--generation-config``: ``auto`` reads generation_config.json of the model directory
    if there is one, ``vllm`` reads nothing, anything else is a folder holding that file.
    Returns (request field, value) pairs for the keys vLLM takes; checked against
    SamplingParams here so a bad file fails at startup, not as every request's 400."""
    if setting == "vllm":
        return ()
    if setting == "auto":
        folder = model_path if os.path.isdir(model_path) else None
        if folder is None or not os.path.isfile(os.path.join(folder, "generation_config.json")):
            return ()
    else:
        folder = setting
        if not os.path.isfile(os.path.join(folder, "generation_config.json")):
            raise ValueError(f"--generation-config {setting!r}: no generation_config.json there; "
                             "pass 'auto', 'vllm' or a folder that has one.")
    path = os.path.join(folder, "generation_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"--generation-config: cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--generation-config: {path} is not a JSON object.")
    out = tuple((field, data[key]) for key, field in _GENERATION_KEYS
                if data.get(key) is not None)
    from servelm.sampling_params import SamplingParams
    try:
        SamplingParams(**dict(out))
    except (TypeError, ValueError) as e:
        raise ValueError(f"--generation-config: {path} has a value servelm cannot use ({e}); "
                         "pass --generation-config vllm to ignore the file.") from None
    if out:
        logger.warning("servelm: sampling defaults from %s: %s (--generation-config vllm "
                       "ignores them)", os.path.basename(path), dict(out))
    return out


def with_defaults(req: Any, max_tokens: Optional[int], defaults: tuple[tuple[str, Any], ...]
                  ) -> tuple[Any, Optional[int]]:
    """The request with the server's sampling defaults in the fields it left unset (None),
    and ``max_tokens`` capped by the default one: as in vLLM, a generation config's
    max_new_tokens is a server-wide limit on output tokens, which also makes it the default
    of requests that set none."""
    if not defaults:
        return req, max_tokens
    fill = {k: v for k, v in defaults if k != "max_tokens" and getattr(req, k, 0) is None}
    cap = dict(defaults).get("max_tokens")
    if cap is not None:
        max_tokens = cap if max_tokens is None else min(max_tokens, cap)
    return (req.model_copy(update=fill) if fill else req), max_tokens
