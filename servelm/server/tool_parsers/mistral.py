"""Mistral tool calls (vLLM's ``mistral``), after the ``[TOOL_CALLS]`` special token:

    content[TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]      tokenizers before v11
    content[TOOL_CALLS]f{...}[TOOL_CALLS]g{...}                       v11+
    content[TOOL_CALLS]f[ARGS]{...}  /  f[CALL_ID]abc123XYZ[ARGS]{...}  later tokenizers

``[TOOL_CALLS]`` is a special token, so the output must be detokenized keeping special tokens.
A marker not followed by a valid call stays content (the text after it is scanned on as usual).
In the v11+ forms a call is committed once its name and the "{" of its arguments are written:
its arguments then stream as generated, to the object's closing brace, or, never closed (cut
by max_tokens, or broken), to the output's end (base.CallSpan.arguments). A pre-v11 array whose
first element is committed so (base.call_span) is read element by element, each streaming as it
is written; an element that is not a call, or anything but "," or "]" between elements, ends
the array there and the rest is content. An array whose first element never commits (say, its
arguments written as a string) is calls only if it closes with every element a valid call.
"""
from __future__ import annotations

import re
from typing import Optional

from servelm.server.tool_parsers.base import (CallSpan, Item, NeedMoreText, OpenCall, ToolCall,
                                              ToolParser, call_from_object, call_span,
                                              content_before, decode_at, skip_ws)

BOT = "[TOOL_CALLS]"
ARGS, CALL_ID = "[ARGS]", "[CALL_ID]"
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_CALL_ID = re.compile(r"[A-Za-z0-9]+")


class MistralToolParser(ToolParser):
    skip_special_tokens = False  # [TOOL_CALLS] must survive detokenization

    def __init__(self, tokenizer=None) -> None:
        super().__init__(tokenizer)
        # inside a committed pre-v11 array: "element" or "separator" expected next; None: not
        self._array: Optional[str] = None

    def _scan(self, text: str, pos: int, finished: bool) -> tuple[list[Item], int]:
        items: list[Item] = []
        while pos < len(text):
            if self._array is not None:
                pos, waiting = self._array_step(items, text, pos, finished)
                if waiting:
                    return items, pos
                continue
            start, pos = content_before(items, text, pos, BOT, finished)
            if start < 0:
                return items, pos
            j = skip_ws(text, start + len(BOT))
            first = skip_ws(text, j + 1)
            if (text.startswith("[", j) and text.startswith("{", first)
                    and call_span(text, first, ("arguments",)).committed):
                self._array, pos = "element", j + 1  # a call array: element by element
                continue
            try:
                found = _calls_after(text, start + len(BOT), finished)
            except NeedMoreText:
                return items, pos
            if found is None:  # not a call: the marker is content, what follows is scanned on
                items.append(BOT)
                pos = start + len(BOT)
            elif found[1] is None:  # a call under way: read again from its marker next time
                items.extend(found[0])
                return items, start
            else:
                calls, pos = found
                items.extend(calls)
        return items, pos

    def _array_step(self, items: list[Item], text: str, pos: int,
                    finished: bool) -> tuple[int, bool]:
        """One element or separator of a committed array at ``pos``: (the new position,
        whether to wait for more text)."""
        i = skip_ws(text, pos)
        if i == len(text):
            if finished:
                self._array = None
                return len(text), False
            return pos, True
        if self._array == "separator":
            if text[i] == ",":
                self._array = "element"
                return i + 1, False
            self._array = None  # "]" ends the array; anything else is content from here
            return (i + 1 if text[i] == "]" else i), False
        if text[i] != "{":
            self._array = None
            return i, False
        span = call_span(text, i, ("arguments",))
        decoded = decode_at(text, i)
        if span.committed:
            if decoded is None and not finished:
                items.append(OpenCall(span.name, span.arguments(text, len(text), "}]")))
                return pos, True
            end = len(text) if decoded is None else decoded[1]
            items.append(ToolCall(span.name, span.arguments(text, end, "}]")))
            self._array = "separator"
            return end, False
        if decoded is None:
            if not finished:
                return pos, True
            self._array = None
            return i, False
        call = call_from_object(decoded[0])
        if call is None:
            self._array = None
            return i, False
        items.append(call)
        self._array = "separator"
        return decoded[1], False


def _calls_after(text: str, i: int, finished: bool) -> Optional[tuple[list[Item], Optional[int]]]:
    """The calls right after a marker ending at ``i`` and the position after them ([an
    OpenCall], None: a call under way); None if there are none. NeedMoreText if the text may
    still be completing them."""
    i = skip_ws(text, i)
    if i == len(text):
        return _none_or_wait(finished)
    if text[i] == "[":  # pre-v11: a JSON array of call objects
        decoded = decode_at(text, i)
        if decoded is None:
            return _none_or_wait(finished)
        arr, end = decoded
        calls = [call_from_object(c) for c in arr] if isinstance(arr, list) else [None]
        return (calls, end) if calls and None not in calls else None
    return _named_call(text, i, finished)


def _named_call(text: str, i: int, finished: bool) -> Optional[tuple[list[Item], Optional[int]]]:
    """v11+: ``name[CALL_ID]id[ARGS]{...}``, the two bracketed parts optional."""
    m = _NAME.match(text, i)
    if m is None:
        return None
    name, i = m.group(), m.end()
    if text.startswith(CALL_ID, i):
        m = _CALL_ID.match(text, i + len(CALL_ID))
        i = m.end() if m else i + len(CALL_ID)
    if text.startswith(ARGS, i):
        i += len(ARGS)
    if i == len(text) or _is_proper_prefix(text, i, (CALL_ID, ARGS)):
        return _none_or_wait(finished)  # name, id or tag may still be growing
    if text[i] != "{":
        return None
    decoded = decode_at(text, i)  # committed: the name and the arguments' "{" are written
    span = CallSpan(name, i, None if decoded is None else decoded[1])
    if decoded is None and not finished:
        return [OpenCall(name, span.arguments(text, len(text)))], None
    end = len(text) if decoded is None else decoded[1]
    return [ToolCall(name, span.arguments(text, end))], end


def _is_proper_prefix(text: str, i: int, markers: tuple[str, ...]) -> bool:
    """``text[i:]`` (non-empty) is a proper prefix of one of ``markers``."""
    rest = text[i:]
    return any(len(rest) < len(m) and m.startswith(rest) for m in markers)


def _none_or_wait(finished: bool) -> None:
    """At the end of the output an unfinished call is no call; before it, wait."""
    if not finished:
        raise NeedMoreText
    return None
