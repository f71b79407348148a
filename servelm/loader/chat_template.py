"""Chat templates rendered as transformers renders them (`apply_chat_template`, transformers 5):
jinja2's immutable sandbox with trim_blocks and lstrip_blocks, the `loopcontrols` extension, a
`{% generation %}` block tag, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII
and does not escape HTML, and namespaces that refuse underscore names. Messages are copied to
plain dicts with None-valued keys dropped (many templates print "None" otherwise) and reasoning
aliased under the names templates read; the special tokens (bos_token, eos_token, ...) are in
the context, overridden by the caller's variables.
"""
from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from typing import Any, Mapping, Optional, Sequence

# A message's reasoning, under the names templates read (the first is the standard one).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def compile_chat_template(source: str) -> Any:
    """A jinja2 `Template` for `source` in transformers' sandboxed environment."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks;
        for rendering it is the body itself."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    class Namespace(jinja2.utils.Namespace):
        # attributes starting with "_" could reach CPython internals
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot set underscore attributes on a namespace: {name!r}")

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Optional[int] = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = lambda *a, **k: dict(*a, **k)
    env.globals["namespace"] = Namespace
    return env.from_string(source)


def render_chat(template: Any, source: str, messages: Sequence[Any], *,
                add_generation_prompt: bool = False, continue_final_message: Any = False,
                tools: Optional[list] = None, documents: Optional[list] = None,
                **context: Any) -> str:
    """One conversation rendered by the compiled `template` (of text `source`).

    continue_final_message (True, or the name of the field to continue) ends the text inside
    the last message, so the model continues it instead of starting a new turn.
    """
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be set: "
                         "one continues the last message, the other starts a new assistant turn.")
    chat = [_alias_reasoning(_drop_none(_plain(m))) for m in messages]
    if not all(isinstance(m, dict) for m in chat):
        raise TypeError(f"chat messages must be dicts, got {messages!r}")
    final = None
    if continue_final_message:
        if not chat:
            raise ValueError("continue_final_message is set but the conversation is empty")
        name = continue_final_message if isinstance(continue_final_message, str) else "content"
        final = chat[-1].get(name)
        if final is None:
            raise ValueError(f"continue_final_message is set but the last message has no {name!r}")
        fields = [name]
        if name in _REASONING_FIELDS:  # copied under several names: tag each copy
            fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final]
        if not any(f in source for f in fields):
            raise ValueError(f"continue_final_message is set to {name!r}, which the chat template "
                             "never reads")
        if isinstance(final, (list, tuple)):  # content blocks: continue the last text block
            blocks = [b for b in final if isinstance(b, dict) and "text" in b]
            if not blocks:
                raise ValueError("continue_final_message is set but the last message has no text")
            final = blocks[-1]["text"]
            blocks[-1]["text"] = final + _CONTINUE_TAG
        else:
            for f in fields:
                chat[-1][f] = chat[-1][f] + _CONTINUE_TAG
    text = template.render(messages=chat, tools=_plain(tools), documents=_plain(documents),
                           add_generation_prompt=add_generation_prompt, **_plain(context))
    if final is not None:
        tag = _CONTINUE_TAG.strip()
        if final.strip() not in text or tag not in text:
            raise ValueError("continue_final_message is set but the chat template dropped (part "
                             "of) the last message, so it cannot be continued")
        at = text.rindex(tag)
        # the template kept the spacing after the tag, or trimmed the message's trailing space
        text = text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()
    return text


def _drop_none(message: Any) -> Any:
    return {k: v for k, v in message.items() if v is not None} if isinstance(message, dict) else message


def _alias_reasoning(message: Any) -> Any:
    if not isinstance(message, dict):
        return message
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _plain(value: Any) -> Any:
    """A fresh copy made of JSON-like types (dataclasses and pydantic models become dicts), so
    templates see no objects with methods and edits never reach the caller's data."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    # subclasses (str enums, numpy floats) carry extra methods: keep the base value only
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    if callable(getattr(value, "item", None)):  # numpy scalars
        return _plain(value.item())
    return f"<{type(value).__name__}>"
