"""Pythonic tool calls (vLLM's ``pythonic``; Llama 3.2 / Llama 4 style): the whole output is
a Python list of calls with keyword arguments,

    [get_weather(city="Paris", days=3), get_time()]

optionally wrapped in ``<|python_start|>`` ... ``<|python_end|>`` (Llama 4). Argument values
must be literals (str, int, float, bool, None, and lists/tuples/dicts of them); anything else,
positional arguments or text around the list make the whole output plain content.

Since text after the list would turn it into content, streaming sends the calls only when the
output ends. Content streams as soon as the output cannot be a call list: at once for text not
starting with "[", else once the outer list has closed (its "]" is tried when it arrives).
"""
from __future__ import annotations

import ast
import json
import math
from typing import Any, Optional

from servelm.server.tool_parsers.base import Item, NeedMoreText, ToolCall, ToolParser, skip_ws

START, END = "<|python_start|>", "<|python_end|>"


class PythonicToolParser(ToolParser):

    def __init__(self, tokenizer=None) -> None:
        super().__init__(tokenizer)
        self._content_only = False  # decided: the output is not a call list
        self._wrapped = False       # the output opened with <|python_start|>
        self._search_from = 0       # "]" before this were tried as the list's end already
        self._list_end: Optional[int] = None  # just past the "]" closing a valid call list

    def _scan(self, text: str, pos: int, finished: bool) -> tuple[list[Item], int]:
        if not self._content_only:
            if finished:
                calls = parse_call_list(text)
                if calls is not None:
                    return list(calls), len(text)
            elif self._may_be_call_list(text):
                return [], pos  # hold everything until the output ends
            self._content_only = True
        return ([text[pos:]] if pos < len(text) else []), len(text)

    def _may_be_call_list(self, text: str) -> bool:
        """False once no continuation of ``text`` can be a call list."""
        try:
            start = self._list_start(text)
        except NeedMoreText:
            return True
        if start is None:
            return False
        # Try each new "]" as the end of the list: a prefix "[...]" that parses is the whole
        # list (its brackets and strings are closed), so it decides for any continuation.
        j = text.find("]", max(self._search_from, start))
        while self._list_end is None and j >= 0:
            self._search_from = j + 1
            verdict = _parse_prefix(text[start:j + 1])
            if verdict is False:
                return False
            if verdict is True:
                self._list_end = j + 1
            j = text.find("]", j + 1)
        if self._list_end is None:
            return True
        rest = text[self._list_end:].strip()  # only whitespace (and the wrapper's end) may follow
        return not rest or (self._wrapped and END.startswith(rest))

    def _list_start(self, text: str) -> Optional[int]:
        """Index of the list's "[", None if the output does not start with one; NeedMoreText
        while it is only whitespace and (a start of) <|python_start|>."""
        i = skip_ws(text, 0)
        if START.startswith(text[i:]):
            raise NeedMoreText
        if text.startswith(START, i):
            self._wrapped = True
            i = skip_ws(text, i + len(START))
            if i == len(text):
                raise NeedMoreText
        return i if text[i] == "[" else None


def _parse_prefix(src: str) -> Optional[bool]:
    """For ``src`` = "[ ... ]": True if a call list, False if a closed list or expression that
    is not one, None if it does not parse (yet)."""
    try:
        return _calls_of(ast.parse(src, mode="eval").body) is not None
    except SyntaxError:
        return None  # an inner "]": the list is still open (or broken, known at the end)
    except (ValueError, RecursionError, MemoryError):
        return False  # null bytes, absurd nesting: never a call list


def parse_call_list(text: str) -> Optional[list[ToolCall]]:
    """The calls if ``text`` is exactly a (possibly wrapped) list of calls; else None."""
    s = text.strip()
    if s.startswith(START):
        s = s[len(START):]
        if s.rstrip().endswith(END):
            s = s.rstrip()[: -len(END)]
    s = s.strip()
    if not (s.startswith("[") and s.endswith("]")):  # no trailing comment either
        return None
    try:
        tree = ast.parse(s, mode="eval")
        return _calls_of(tree.body)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: null bytes
        return None


def _calls_of(node: ast.AST) -> Optional[list[ToolCall]]:
    if not isinstance(node, ast.List) or not node.elts:
        return None
    calls = []
    for call in node.elts:
        if not isinstance(call, ast.Call) or call.args:
            return None
        name = _dotted_name(call.func)
        args = {}
        for kw in call.keywords:
            if kw.arg is None:  # **kwargs
                return None
            try:
                args[kw.arg] = _literal(kw.value)
            except ValueError:
                return None
        if name is None:
            return None
        calls.append(ToolCall(name=name, arguments=json.dumps(args, ensure_ascii=False)))
    return calls


def _dotted_name(node: ast.AST) -> Optional[str]:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted_name(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _literal(node: ast.AST) -> Any:
    """The JSON value of a literal node; ValueError for anything else."""
    if isinstance(node, ast.Constant):
        v = node.value
        if v is None or isinstance(v, (str, bool, int)):
            return v
        if isinstance(v, float) and math.isfinite(v):
            return v
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _literal(node.operand)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return -v if isinstance(node.op, ast.USub) else v
    elif isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    elif isinstance(node, ast.Dict):
        if all(isinstance(k, ast.Constant) and isinstance(k.value, str) for k in node.keys):
            return {k.value: _literal(v) for k, v in zip(node.keys, node.values)}
    raise ValueError(f"not a literal: {ast.dump(node)[:80]}")
