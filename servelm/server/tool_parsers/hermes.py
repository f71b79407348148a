"""Hermes / Qwen2.5 / Qwen3 tool calls (vLLM's ``hermes``):

    some text<tool_call>
    {"name": "f", "arguments": {"x": 1}}
    </tool_call>

any number of times. Text outside the tags is content; a call whose body is not such an object
stays content, tags included. At the end of the output a call whose closing tag is missing is
still a call if its body is complete (models sometimes stop right after the JSON).
"""
from __future__ import annotations

from typing import Optional

from servelm.server.tool_parsers.base import (Item, ToolCall, ToolParser, call_from_object,
                                              content_before, loads)

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
            if close < 0 and not finished:
                return items, pos  # the call is still being generated
            body_end = len(text) if close < 0 else close
            stop = len(text) if close < 0 else close + len(END)
            call = _parse_body(text[body_start:body_end])
            items.append(call if call is not None else text[start:stop])
            pos = stop
        return items, pos


def _parse_body(body: str) -> Optional[ToolCall]:
    try:
        return call_from_object(loads(body))
    except ValueError:
        return None
