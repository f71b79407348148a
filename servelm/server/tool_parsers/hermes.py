"""Hermes / Qwen2.5 / Qwen3 tool calls (vLLM's ``hermes``):

    some text<tool_call>
    {"name": "f", "arguments": {"x": 1}}
    </tool_call>

any number of times. Text outside the tags is content. A call is committed once its name and
the start of its arguments object are written (base.call_span): its arguments then stream as
generated, and run to the object's closing brace, or to the closing tag or the output's end if
it never closes (cut by max_tokens). A call not committed so whose body is not such an object
stays content, tags included. At the end of the output a call whose closing tag is missing is
still a call if its body is complete (models sometimes stop right after the JSON).
"""
from __future__ import annotations

from typing import Optional

from servelm.server.tool_parsers.base import (Item, OpenCall, ToolCall, ToolParser,
                                              call_from_object, call_span, content_before,
                                              loads, partial_marker_len, skip_ws)

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):

    def _scan(self, text: str, pos: int, finished: bool) -> tuple[list[Item], int]:
        items: list[Item] = []
        while pos < len(text):
            start, pos = content_before(items, text, pos, START, finished)  # "<tool" waits
            if start < 0:
                return items, pos
            body_start = start + len(START)
            close = text.find(END, body_start)
            body_end = len(text) if close < 0 else close
            body = text[:body_end]  # the call's text ends at its closing tag
            j = skip_ws(body, body_start)
            span = call_span(body, j, ("arguments",)) if body.startswith("{", j) else None
            if close < 0 and not finished:  # the call is still being generated
                if span is not None and span.committed:  # (a partial closing tag held back)
                    held = len(text) - partial_marker_len(text, j, END)
                    items.append(OpenCall(span.name, span.arguments(text, held)))
                return items, pos
            stop = len(text) if close < 0 else close + len(END)
            if span is not None and span.committed:
                call = ToolCall(span.name, span.arguments(text, body_end))
            else:
                call = _parse_body(text[body_start:body_end])
            items.append(call if call is not None else text[start:stop])
            pos = stop
        return items, pos


def _parse_body(body: str) -> Optional[ToolCall]:
    try:
        return call_from_object(loads(body))
    except ValueError:
        return None
