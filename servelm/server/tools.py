"""Tool calling for /v1/chat/completions: checking ``tools`` / ``tool_choice``, what the chat
template sees, and turning the model's text into OpenAI ``tool_calls`` (whole or streamed).

tool_choice, as OpenAI and vLLM:
- ``none``: tools are shown to the template, the answer is plain text.
- ``auto`` (needs ``--enable-auto-tool-choice`` and ``--tool-call-parser``): the model decides;
  the parser finds calls in its text.
- ``required``: a grammar forces a JSON array of ``{"name", "parameters"}`` calls (one at
  most with ``parallel_tool_calls: false``), each name one of the tools and its parameters
  that tool's schema.
- a named function: a grammar forces that function's parameters object.
Without tool_choice, tools mean ``auto`` where the server allows it, else ``none``.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from servelm.server.protocol import ChatCompletionRequest, bad_request
from servelm.server.tool_parsers import ToolCall, ToolCallDelta, ToolParser, get_tool_parser
from servelm.structured_output import StructuredOutputsParams
from servelm.structured_output.schema_check import check_json_schema

MAX_TOOLS = 128  # OpenAI's limit
MAX_TOOLS_CHARS = 256 * 1024  # the tools' JSON, all together
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_NO_ARGS = {"type": "object", "properties": {}}

_FORMATS = {  # how a template without tool support is told to call, per parser
    "hermes": 'To call a tool, answer with <tool_call>\n{"name": <tool name>, "arguments": '
              '<arguments object>}\n</tool_call> (one such block per call).',
    "llama3_json": 'To call a tool, answer with only a JSON object {"name": <tool name>, '
                   '"parameters": <arguments object>}.',
    "mistral": 'To call tools, answer with [TOOL_CALLS][{"name": <tool name>, "arguments": '
               '<arguments object>}, ...].',
    "pythonic": "To call tools, answer with only a Python list of calls with keyword "
                "arguments, e.g. [get_weather(city=\"Paris\")].",
}


@dataclass
class ToolPlan:
    mode: str  # none | auto | required | named
    tools: list[dict]  # OpenAI's tool objects, for the chat template
    named: Optional[str] = None
    parser: Optional[str] = None  # --tool-call-parser (auto)
    parallel: bool = True
    structured: Optional[StructuredOutputsParams] = None  # required / named: the grammar
    parameters: dict[str, Any] = field(default_factory=dict)  # tool name -> its schema


def plan_tools(req: ChatCompletionRequest, auto_enabled: bool,
               parser: Optional[str]) -> Optional[ToolPlan]:
    """The request's tool calling, checked (400s), or None without tools."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs tools.", "tool_choice")
        return None
    if len(req.tools) > MAX_TOOLS:
        raise bad_request(f"at most {MAX_TOOLS} tools per request, got {len(req.tools)}.",
                          "tools")
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    if len(json.dumps(tools)) > MAX_TOOLS_CHARS:
        raise bad_request(f"the tools' definitions exceed {MAX_TOOLS_CHARS} characters of "
                          "JSON.", "tools")
    params: dict[str, Any] = {}
    for i, t in enumerate(req.tools):
        name = t.function.name
        if not _NAME.fullmatch(name):
            raise bad_request(f"tools[{i}].function.name must be 1-64 letters, digits, '_', "
                              f"'-' or '.', got {name!r}.", "tools")
        if name in params:
            raise bad_request(f"tools[{i}]: the function name {name!r} is used twice.", "tools")
        schema = t.function.parameters if t.function.parameters is not None else _NO_ARGS
        params[name] = schema
    if choice is None:
        choice = "auto" if auto_enabled else "none"
    plan = ToolPlan(mode="none", tools=tools, parallel=req.parallel_tool_calls is not False,
                    parameters=params)
    if choice == "none":
        return plan
    if choice == "auto":
        if not (auto_enabled and parser):
            raise bad_request('"auto" tool choice needs the server started with '
                              "--enable-auto-tool-choice and --tool-call-parser.", "tool_choice")
        strict = [t.function.name for t in req.tools if t.function.strict]
        if strict:  # a parser reads what the model wrote; only a grammar guarantees a schema
            raise bad_request(f"strict function schemas ({strict}) are enforced with tool_choice "
                              "'required' or a named function; with 'auto' send strict false "
                              "or leave it out.", "tools")
        plan.mode, plan.parser = "auto", parser
        return plan
    if choice == "required":
        plan.mode = "required"
        items = [{"type": "object", "properties": {"name": {"const": n}, "parameters": s},
                  "required": ["name", "parameters"]} for n, s in params.items()]
        schema: dict = {"type": "array", "minItems": 1,
                        "items": items[0] if len(items) == 1 else {"anyOf": items}}
        if not plan.parallel:
            schema["maxItems"] = 1
    else:
        name = choice.function.name
        if name not in params:
            raise bad_request(f"tool_choice names {name!r}, which is not among the tools "
                              f"{list(params)}.", "tool_choice")
        plan.mode, plan.named, schema = "named", name, params[name]
    try:
        check_json_schema(schema)
    except ValueError as e:
        raise bad_request(f"a tool's parameters: {e}", "tools") from None
    plan.structured = StructuredOutputsParams(json=schema)
    return plan


def template_supports_tools(tokenizer: Any) -> bool:
    source = getattr(tokenizer, "chat_template", None)
    return isinstance(source, str) and "tools" in source


def tool_system_prompt(plan: ToolPlan) -> str:
    """Tool descriptions for a template that has no place for them."""
    lines = ["You can call these tools (JSON schemas of their functions):"]
    lines += [json.dumps(t.get("function", t), ensure_ascii=False) for t in plan.tools]
    if plan.mode == "auto":
        lines.append(_FORMATS.get(plan.parser, _FORMATS["hermes"]))
        lines.append("Answer normally when no tool is needed.")
    elif plan.mode == "required":
        lines.append('Answer with a JSON array of calls [{"name": <tool name>, "parameters": '
                     "<arguments object>}].")
    elif plan.mode == "named":
        lines.append(f"Call {plan.named}: answer with its arguments as a JSON object.")
    return "\n".join(lines)


def template_inputs(messages: list[dict], plan: Optional[ToolPlan],
                    supports_tools: bool) -> tuple[list[dict], Optional[list[dict]]]:
    """(messages, tools) for apply_chat_template. Assistant tool_calls' arguments become
    objects (templates render them with tojson); a template without tool support gets the
    tools in the system message instead."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if isinstance(calls, list):
            m = {**m, "tool_calls": [_call_for_template(c) for c in calls]}
        out.append(m)
    if plan is None:
        return out, None
    if supports_tools:
        return out, plan.tools
    prompt = tool_system_prompt(plan)
    if out and out[0].get("role") == "system":
        out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{prompt}".strip()}
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out, None


def _call_for_template(call: Any) -> Any:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        args = json.loads(fn["arguments"])
    except json.JSONDecodeError:
        return call
    return {**call, "function": {**fn, "arguments": args}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _forced_calls(plan: ToolPlan, text: str) -> Optional[list[ToolCall]]:
    """required / named: the grammar's JSON as calls. Cut short by max_tokens, a named call
    is None (not JSON yet) and a required array keeps its complete calls."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        if plan.mode == "named":
            return None
        value = _complete_items(text)
    if plan.mode == "named":
        return [ToolCall(plan.named, json.dumps(value, ensure_ascii=False))]
    return [ToolCall(c["name"], json.dumps(c.get("parameters", {}), ensure_ascii=False))
            for c in value if isinstance(c, dict) and "name" in c]


def _complete_items(text: str) -> list[Any]:
    """The complete elements at the start of a JSON array cut short."""
    dec, items = json.JSONDecoder(), []
    i = text.find("[") + 1
    while 0 < i < len(text):
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        try:
            item, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            break
        items.append(item)
    return items


class RequiredCallsScan:
    """The calls of a ``required`` tool choice's output as it grows: the grammar writes a JSON
    array of {"name": ..., "parameters": ...} objects, name first. Reads each new piece once
    (the text only grows) and knows, per call, its name once that string is closed and where
    its parameters' text starts and (once closed) ends, so the arguments stream as they are
    generated."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []  # {"name", "args_start", "args_end"}
        self._pos = 0
        self._depth = 0
        self._in_str = self._esc = False
        self._str_start = 0
        self._key: Optional[str] = None  # the element's key whose value comes next
        self._after_colon = False

    def feed(self, text: str) -> None:
        for i in range(self._pos, len(text)):
            c = text[i]
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif c == "\\":
                    self._esc = True
                elif c == '"':
                    self._in_str = False
                    self._string_closed(text, i)
                continue
            if c in " \t\r\n":
                continue
            if self._depth == 2 and self._after_colon:  # the value of an element's key
                self._after_colon = False
                if self._key == "parameters":
                    self.calls[-1]["args_start"] = i
            if c == '"':
                self._in_str, self._str_start = True, i
            elif c in "[{":
                self._depth += 1
                if self._depth == 2 and c == "{":
                    self.calls.append({"name": None, "args_start": None, "args_end": None})
                    self._key = None
            elif c in "]}":
                if self._depth == 3 and self.calls and self._key == "parameters":
                    self.calls[-1]["args_end"] = i + 1  # an object or array value closed
                elif self._depth == 2:
                    self._end_scalar(text, i)
                self._depth -= 1
                if self._depth == 1:
                    self._key = None
            elif c == ":" and self._depth == 2:
                self._after_colon = True
            elif c == "," and self._depth == 2:
                self._end_scalar(text, i)
                self._key = None
        self._pos = len(text)

    def _end_scalar(self, text: str, i: int) -> None:
        """A number, true, false or null value of parameters ends before ``i``."""
        call = self.calls[-1] if self.calls else None
        if call is not None and self._key == "parameters" and call["args_end"] is None \
                and call["args_start"] is not None:
            while i > 0 and text[i - 1] in " \t\r\n":
                i -= 1
            call["args_end"] = i

    def _string_closed(self, text: str, i: int) -> None:
        if self._depth != 2 or not self.calls:
            return
        raw = text[self._str_start:i + 1]
        if self._key is None:  # a key
            self._key = json.loads(raw)
        elif self._key == "name" and self.calls[-1]["name"] is None:
            self.calls[-1]["name"] = json.loads(raw)
        elif self._key == "parameters":  # a string value (not what schemas give)
            self.calls[-1]["args_end"] = i + 1


class ToolOutput:
    """One choice's text -> content and tool calls, whole (``final``) or streamed (``delta``)."""

    def __init__(self, plan: ToolPlan, tokenizer: Any) -> None:
        self.plan = plan
        self.parser: Optional[ToolParser] = (get_tool_parser(plan.parser)(tokenizer)
                                             if plan.mode == "auto" else None)
        self.ids: list[str] = []  # call ids by index, shared by the stream and the final form
        self._named_started = False
        self._sent = 0  # characters of a named call's arguments streamed
        self._required = RequiredCallsScan() if plan.mode == "required" else None
        self._required_sent: list[int] = []  # per required call: argument characters sent

    def _id(self, i: int) -> str:
        while len(self.ids) <= i:
            self.ids.append(new_call_id())
        return self.ids[i]

    def final(self, text: str) -> tuple[Optional[str], list[dict]]:
        """(content, tool_calls in OpenAI's message shape)."""
        if self.plan.mode == "none":
            return text, []
        if self.parser is not None:
            ex = self.parser.extract_tool_calls(text)
            calls, content = ex.tool_calls, ex.content
        else:
            calls = _forced_calls(self.plan, text)
            content = None
            if calls is None:  # a named call cut by max_tokens: its partial arguments text
                calls = [ToolCall(self.plan.named, text)]
        if not self.plan.parallel:
            calls = calls[:1]
        return content, [{"id": self._id(i), "type": "function",
                          "function": {"name": c.name, "arguments": c.arguments}}
                         for i, c in enumerate(calls)]

    def delta(self, text: str, finished: bool) -> tuple[Optional[str], list[dict]]:
        """(new content, tool-call deltas in OpenAI's chunk shape) since the last call; text
        is the choice's whole text so far."""
        mode = self.plan.mode
        if mode == "none":
            raise RuntimeError("no tool calls to stream")
        if mode == "named":  # the arguments stream as they are generated
            out = []
            if not self._named_started:
                self._named_started = True
                out.append(_chunk(ToolCallDelta(0, self.plan.named, ""), self._id(0)))
            if len(text) > self._sent:
                out.append(_chunk(ToolCallDelta(0, None, text[self._sent:]), None))
                self._sent = len(text)
            return None, out
        if mode == "required":  # each call's name once written, then its arguments' text
            scan = self._required
            scan.feed(text)
            out = []
            for i, call in enumerate(scan.calls[:None if self.plan.parallel else 1]):
                if call["name"] is None:
                    break
                if i == len(self._required_sent):
                    self._required_sent.append(0)
                    out.append(_chunk(ToolCallDelta(i, call["name"], ""), self._id(i)))
                start = call["args_start"]
                if start is None:
                    continue
                end = call["args_end"] if call["args_end"] is not None else len(text)
                if end - start > self._required_sent[i]:
                    out.append(_chunk(ToolCallDelta(
                        i, None, text[start + self._required_sent[i]:end]), None))
                    self._required_sent[i] = end - start
            return None, out
        dm = self.parser.extract_streaming(text, finished)
        out = []
        for d in dm.tool_calls:
            if not self.plan.parallel and d.index > 0:
                continue
            if d.name is not None:  # name first, then the arguments
                out.append(_chunk(ToolCallDelta(d.index, d.name, ""), self._id(d.index)))
                if d.arguments:
                    out.append(_chunk(ToolCallDelta(d.index, None, d.arguments), None))
            else:
                out.append(_chunk(d, None))
        return dm.content, out

    @property
    def called(self) -> bool:
        return bool(self.ids)


def _chunk(d: ToolCallDelta, call_id: Optional[str]) -> dict:
    out: dict[str, Any] = {"index": d.index}
    if call_id is not None:
        out.update(id=call_id, type="function")
    fn: dict[str, Any] = {"arguments": d.arguments}
    if d.name is not None:
        fn["name"] = d.name
    out["function"] = fn
    return out
