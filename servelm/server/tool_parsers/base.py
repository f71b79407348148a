"""The tool-call parser contract: whole-output extraction and cumulative-text streaming.

A parser turns a model's raw output into OpenAI tool calls plus the remaining content. Each
format only describes how its text splits into items (content text, a finished call, or a call
still under way) in `_scan`; this base turns those items into both the non-streamed result and
the streamed deltas, so the two can never disagree: the streamed content concatenates to the
non-streamed content, and each call's streamed name and argument fragments join to the
non-streamed call, in the order the non-streamed list has them.
"""
from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Optional, Union


@dataclass(frozen=True)
class ToolCall:
    """One parsed call."""
    name: str
    arguments: str  # JSON text of the arguments object (json.dumps(..., ensure_ascii=False))


@dataclass(frozen=True)
class ExtractedToolCalls:
    tool_calls: list[ToolCall]
    content: Optional[str]  # text outside the calls, stripped; None if nothing but whitespace


@dataclass
class ToolCallDelta:
    """One streamed fragment, OpenAI's ``delta.tool_calls[i]`` shape (the caller adds the id)."""
    index: int
    name: Optional[str] = None  # only in the call's first delta
    arguments: str = ""         # a fragment of the arguments JSON text


@dataclass
class DeltaMessage:
    content: Optional[str] = None
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass(frozen=True)
class OpenCall:
    """A call under way: ``_scan`` yields it last, leaving its position at the call's start (the
    next scan reads the call again). Its name, and its arguments' text so far: a prefix of the
    finished call's arguments."""
    name: str
    arguments: str


# what `_scan` yields: a piece of content text, a finished call, or (last) a call under way
Item = Union[str, ToolCall, OpenCall]


class ToolParser(ABC):
    """Per request (streaming keeps state here). Subclasses implement `_scan` only.

    A call object is committed once its name has been written and its arguments object has
    begun (formats that can tell, see `call_span`): from then on it is a call in both results,
    its name streamed at once and its arguments' text as it is generated (OpenAI's tool-call
    deltas), so a name already sent never has to be taken back. Its arguments are the text of
    the arguments object as the model wrote it, to its closing brace, or, cut short (max_tokens)
    or never closed, to where the call's text ends. A call object not committed so is a call only
    once complete and valid (sent whole), else content.
    """

    # False for formats whose markers are special tokens that detokenizing must keep
    # (vLLM's Mistral parser sets request.skip_special_tokens = False for the same reason)
    skip_special_tokens: bool = True

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer
        self._pos = 0             # text[:_pos] has been turned into items already
        self._num_calls = 0       # index of the next streamed call
        self._content_started = False  # a non-whitespace content character was sent
        self._pending_ws = ""     # trailing content whitespace, sent only if more content follows
        self._open: Optional[str] = None  # the call under way: its arguments' text sent so far
        self._done = False

    @abstractmethod
    def _scan(self, text: str, pos: int, finished: bool) -> tuple[list[Item], int]:
        """The items that ``text[pos:]`` certainly starts with, and the position after them.

        Must be prefix-consistent: whatever text is appended later, the items returned now are
        also what a scan of the longer text yields there (content may be split differently).
        So it stops before anything that may still change meaning: a possible start of a
        marker, a call not yet closed. With ``finished`` it must consume all of ``text``.
        May keep state on ``self`` (it is called with increasing ``pos`` on one instance).
        """

    def extract_tool_calls(self, text: str) -> ExtractedToolCalls:
        """The calls and the content of a whole output. Leaves this parser's streaming state alone."""
        items, _ = type(self)(self.tokenizer)._scan(text, 0, True)
        calls = [it for it in items if isinstance(it, ToolCall)]
        content = "".join(it for it in items if isinstance(it, str)).strip()
        return ExtractedToolCalls(tool_calls=calls, content=content or None)

    def extract_streaming(self, text_so_far: str, finished: bool) -> DeltaMessage:
        """What is new since the previous call, given the whole text generated so far."""
        delta = DeltaMessage()
        if self._done:
            return delta
        items, self._pos = self._scan(text_so_far, self._pos, finished)
        content = []
        for it in items:
            if isinstance(it, (OpenCall, ToolCall)):  # the name once, then what args added
                sent = self._open
                if sent is None:
                    delta.tool_calls.append(ToolCallDelta(self._num_calls, it.name,
                                                          it.arguments))
                elif len(it.arguments) > len(sent):
                    delta.tool_calls.append(ToolCallDelta(self._num_calls, None,
                                                          it.arguments[len(sent):]))
                self._open = it.arguments if isinstance(it, OpenCall) else None
                self._num_calls += isinstance(it, ToolCall)
            else:
                content.append(self._visible_content(it))
        if finished:
            self._done = True  # the held-back trailing whitespace is dropped, as strip() does
        delta.content = "".join(content) or None
        return delta

    def _visible_content(self, piece: str) -> str:
        """The part of ``piece`` to send now so that all sent content equals the stripped whole."""
        s = self._pending_ws + piece
        if not self._content_started:
            s = s.lstrip()
        out = s.rstrip()
        self._pending_ws = s[len(out):]
        self._content_started = self._content_started or bool(out)
        return out


# ----- helpers the formats share -----

class NeedMoreText(Exception):
    """Raised by a format's helpers when the text ends before what it reads is decided (a
    marker, name or object still growing); `_scan` then stops there and waits."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# NaN / Infinity are not JSON: arguments holding them would not survive a JSON client
JSON_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def loads(text: str) -> Any:
    """json.loads, strict about NaN/Infinity; raises ValueError."""
    obj, end = JSON_DECODER.raw_decode(text, skip_ws(text, 0))
    if skip_ws(text, end) != len(text):
        raise ValueError("extra data after JSON")
    return obj


def decode_at(text: str, pos: int) -> Optional[tuple[Any, int]]:
    """The JSON value starting at ``text[pos]`` and the position after it; None if it does not
    decode (yet): the text may end inside it, or it is invalid."""
    try:
        return JSON_DECODER.raw_decode(text, pos)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return None


def skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos



def make_call(name: Any, arguments: Any) -> Optional[ToolCall]:
    """A ToolCall if ``name`` is a non-empty string and ``arguments`` an object (or JSON text of
    one, as some models write it; missing means no arguments); else None."""
    if not isinstance(name, str) or not name.strip():
        return None
    if arguments is None:
        arguments = {}
    try:
        if isinstance(arguments, str):
            arguments = loads(arguments)
        if not isinstance(arguments, dict) or not _finite(arguments):
            return None
        return ToolCall(name=name.strip(), arguments=json.dumps(arguments, ensure_ascii=False))
    except (ValueError, RecursionError):
        return None


def call_from_object(obj: Any, argument_keys: tuple[str, ...] = ("arguments",)) -> Optional[ToolCall]:
    """A ToolCall from ``{"name": ..., <first present of argument_keys>: {...}}``; else None."""
    if not isinstance(obj, dict):
        return None
    args = next((obj[k] for k in argument_keys if k in obj), None)
    return make_call(obj.get("name"), args)


def _finite(value: Any) -> bool:
    """No inf/nan anywhere (they would serialize to non-JSON ``Infinity``/``NaN``)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


@dataclass(frozen=True)
class CallSpan:
    """Where the parts of a call object ``{"name": ..., "arguments": {...}}`` lie, as far as the
    text goes (any key order; other keys skipped)."""
    name: Optional[str] = None        # the name, once its string has closed (stripped, non-empty)
    args_start: Optional[int] = None  # the arguments object's "{"
    args_end: Optional[int] = None    # just past its "}", once it has closed validly

    @property
    def committed(self) -> bool:
        """Name written and arguments object begun: a call, whatever follows."""
        return self.name is not None and self.args_start is not None

    def arguments(self, text: str, end: int, closers: str = "}") -> str:
        """The arguments' text: to the object's closing brace, else (never validly closed) to
        ``end`` without trailing whitespace and the call's own closers at its end (at most one
        of each, last first: "}" the call object's, "}]" that and an array's). A text's result
        is always a prefix of what a longer text gives."""
        if self.args_end is not None:
            return text[self.args_start:self.args_end]
        out = text[self.args_start:end].rstrip()
        for c in reversed(closers):
            if out.endswith(c):
                out = out[:-1].rstrip()
        return out


def call_span(text: str, i: int, argument_keys: tuple[str, ...]) -> CallSpan:
    """The CallSpan of the object starting at ``text[i] == "{"``: its top-level keys are read in
    order while they and their values are complete; the first of ``argument_keys`` whose value
    is an object gives the arguments."""
    name = args_start = args_end = None
    pos = i + 1
    while True:
        pos = skip_ws(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos = skip_ws(text, pos + 1)
        key = decode_at(text, pos) if pos < len(text) and text[pos] == '"' else None
        if key is None:
            break  # the end of the text, the object's end, or not JSON: nothing more is known
        pos = skip_ws(text, key[1])
        if pos >= len(text) or text[pos] != ":":
            break
        pos = skip_ws(text, pos + 1)
        if pos >= len(text):
            break
        is_args = key[0] in argument_keys and args_start is None and text[pos] == "{"
        if is_args:
            args_start = pos
        value = decode_at(text, pos)
        if value is None:
            break  # still being written (or never valid)
        if is_args:
            args_end = value[1]
        elif key[0] == "name" and name is None and isinstance(value[0], str) and value[0].strip():
            name = value[0].strip()
        pos = value[1]
    return CallSpan(name, args_start, args_end)


def content_before(items: list, text: str, pos: int, marker: str,
                   finished: bool) -> tuple[int, int]:
    """Appends to ``items`` the content from ``pos`` to the next ``marker`` and returns (the
    marker's start, or -1 if there is none yet; the new position). Without a marker, a tail
    that may still become one is held back unless ``finished``."""
    start = text.find(marker, pos)
    if start < 0:
        end = len(text) if finished else len(text) - partial_marker_len(text, pos, marker)
        if end > pos:
            items.append(text[pos:end])
        return -1, max(end, pos)
    if start > pos:
        items.append(text[pos:start])
    return start, start


def partial_marker_len(text: str, pos: int, marker: str) -> int:
    """Length of the longest suffix of ``text[pos:]`` that is a proper prefix of ``marker``:
    text that must be held back because the next characters may complete the marker."""
    for n in range(min(len(marker) - 1, len(text) - pos), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
