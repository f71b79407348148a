"""Llama 3.1 / 3.2 JSON tool calls (vLLM's ``llama3_json``): the output, after optional
whitespace and ``<|python_tag|>``, is one object ``{"name": "f", "parameters": {...}}`` (also
``"arguments"``), or several separated by ``;``.

An output that does not start so is plain content. Otherwise the leading run of call objects
are the calls and whatever follows them (if anything) is content. An object is a call once its
name and the start of its arguments object are written (base.call_span; its arguments then
stream as generated): one that never closes (cut by max_tokens, or broken) takes the rest of the
output. An object not committed so is a call only if complete and valid; else it and the rest
are content. vLLM instead drops everything to content when any later part is off; taking the
leading run lets a call be streamed as it is written.
"""
from __future__ import annotations

from typing import Optional

from servelm.server.tool_parsers.base import (Item, NeedMoreText, OpenCall, ToolCall,
                                              ToolParser, call_from_object, call_span, decode_at,
                                              skip_ws)

PYTHON_TAG = "<|python_tag|>"
ARGUMENT_KEYS = ("parameters", "arguments")


class Llama3JsonToolParser(ToolParser):

    def __init__(self, tokenizer=None) -> None:
        super().__init__(tokenizer)
        self._content_only = False  # decided: the rest of the output is plain content

    def _scan(self, text: str, pos: int, finished: bool) -> tuple[list[Item], int]:
        items: list[Item] = []
        while not self._content_only:
            try:
                start = self._next_object(text, pos, finished)
            except NeedMoreText:
                return items, pos
            decoded = decode_at(text, start) if start is not None else None
            span = call_span(text, start, ARGUMENT_KEYS) if start is not None else None
            if span is not None and span.committed:
                if decoded is None and not finished:  # under way
                    items.append(OpenCall(span.name, span.arguments(text, len(text))))
                    return items, pos
                end = decoded[1] if decoded else len(text)  # (never closed: the rest is its)
                items.append(ToolCall(span.name, span.arguments(text, end)))
                pos = end
                continue
            if decoded is None and start is not None and not finished:
                return items, pos  # the object is still open (or broken: known at the end)
            call = call_from_object(decoded[0], ARGUMENT_KEYS) if decoded else None
            if call is None:  # no object, or not a call: the rest is content
                self._content_only = True
                break
            items.append(call)
            pos = decoded[1]
        if pos < len(text):
            items.append(text[pos:])
        return items, len(text)

    def _next_object(self, text: str, pos: int, finished: bool) -> Optional[int]:
        """Where the next call object starts (its "{"), None if no object follows ``pos``;
        NeedMoreText if the text ends within whitespace, a separator or the python tag."""
        i = skip_ws(text, pos)
        if pos == 0 and text.startswith(PYTHON_TAG, i):
            i = skip_ws(text, i + len(PYTHON_TAG))
        elif pos == 0 and i < len(text) and PYTHON_TAG.startswith(text[i:]):
            i = len(text)  # a possible start of the tag: wait like for whitespace
        elif pos > 0 and text.startswith(";", i):
            i = skip_ws(text, i + 1)
        if i == len(text):
            if finished:
                return None
            raise NeedMoreText
        return i if text[i] == "{" else None
