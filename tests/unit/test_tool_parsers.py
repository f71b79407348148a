"""Tool-call parsers: whole-output extraction per format, and streaming (cumulative text fed in
pieces) agreeing with it exactly."""
import json
import random
import zlib

import pytest

from servelm.server.tool_parsers import (TOOL_PARSERS, DeltaMessage, ToolCall, ToolParser,
                                         get_tool_parser)


def extract(name, text):
    return get_tool_parser(name)(None).extract_tool_calls(text)


def calls(*pairs):
    return [ToolCall(n, json.dumps(a, ensure_ascii=False)) for n, a in pairs]


def stream(name, text, ends, finish_separately=False):
    """Feed text[:e] for each e in ends (the last with finished=True unless finish_separately,
    then one more finished call with the whole text); check the delta rules; return
    (content, [(name, arguments)])."""
    parser = get_tool_parser(name)(None)
    content, names, args = [], [], []
    steps = [(e, False) for e in ends[:-1]]
    steps += [(len(text), False), (len(text), True)] if finish_separately else [(len(text), True)]
    for end, finished in steps:
        d = parser.extract_streaming(text[:end], finished)
        assert isinstance(d, DeltaMessage)
        if d.content is not None:
            assert d.content != ""
            content.append(d.content)
        for tc in d.tool_calls:
            if tc.index == len(names):  # a new call: its name comes first, once
                assert tc.name, "the first delta of a call carries its name"
                names.append(tc.name)
                args.append(tc.arguments)
            else:
                assert tc.index < len(names) and tc.name is None, "name sent twice / index skipped"
                args[tc.index] += tc.arguments
    assert parser.extract_streaming(text, True) == DeltaMessage()  # nothing after the end
    return "".join(content), list(zip(names, args))


def chunkings(text, seed=0, n_random=3):
    yield list(range(1, len(text) + 1))  # character by character
    rng = random.Random(seed)
    for _ in range(n_random):
        ends, e = [], 0
        while e < len(text):
            e = min(len(text), e + rng.randint(1, 12))
            ends.append(e)
        yield ends or [0]
    yield [len(text)]  # all at once


def assert_stream_matches(name, text, seed=0):
    expected = extract(name, text)
    want = ([(c.name, c.arguments) for c in expected.tool_calls], expected.content or "")
    for ends in chunkings(text, seed):
        for separate in (False, True):
            content, got = stream(name, text, ends, finish_separately=separate)
            assert (got, content) == want, (name, text, ends)
    return expected


# ---------------------------------------------------------------- cases per format
# (text, expected calls, expected content)

UNI = {"city": "Zürich", "note": "日本語 ✓ \"quoted\" \\ back"}

HERMES = {
    "single": ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
               calls(("get_weather", {"city": "Paris"})), None),
    "several": ('<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
                '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>',
                calls(("a", {"x": 1}), ("b", {})), None),
    "content_and_call": ('Let me look that up.\n<tool_call>\n{"name": "f", "arguments": '
                         '{"q": [1, 2.5, null, true]}}\n</tool_call>',
                         calls(("f", {"q": [1, 2.5, None, True]})), "Let me look that up."),
    "plain": ("  Hello! 1 < 2 and <b>bold</b>, <tool_call not a marker.\n",
              [], "Hello! 1 < 2 and <b>bold</b>, <tool_call not a marker."),
    # committed (name and "{" written): a call whose arguments are the text as written, as
    # OpenAI's (which "may not be valid JSON"); the call object's own "}" dropped
    "invalid_json": ('A <tool_call>{"name": "f", "arguments": {oops}}</tool_call> B',
                     [ToolCall("f", "{oops}")], 'A  B'),
    "invalid_then_valid": ('<tool_call>{"arguments": {}}</tool_call><tool_call>{"name": "g", '
                           '"arguments": {"k": "v"}}</tool_call>',
                           calls(("g", {"k": "v"})), '<tool_call>{"arguments": {}}</tool_call>'),
    "unicode": ('<tool_call>\n' + json.dumps({"name": "w", "arguments": UNI}) + '\n</tool_call>',
                [ToolCall("w", json.dumps(UNI))], None),  # the arguments as written
    "unicode_raw": ('<tool_call>{"name": "w", "arguments": ' + json.dumps(UNI, ensure_ascii=False)
                    + '}</tool_call>', calls(("w", UNI)), None),
    "args_as_string": ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>',
                       calls(("f", {"a": 1})), None),
    "args_string_not_object": ('<tool_call>{"name": "f", "arguments": "[1]"}</tool_call>',
                               [], '<tool_call>{"name": "f", "arguments": "[1]"}</tool_call>'),
    "compact_json_as_written": ('<tool_call>{"name":"f","arguments":{"a":1,"b":{"c":[]}}}</tool_call>',
                                [ToolCall("f", '{"a":1,"b":{"c":[]}}')], None),
    "nan_as_written": ('<tool_call>{"name": "f", "arguments": {"a": NaN}}</tool_call>',
                       [ToolCall("f", '{"a": NaN}')], None),
    "unterminated_valid": ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n',
                           calls(("f", {"a": 1})), None),
    "unterminated_truncated": ('ok <tool_call>\n{"name": "f", "argum',
                               [], 'ok <tool_call>\n{"name": "f", "argum'),
    "text_between_and_after": ('A\n<tool_call>{"name": "f", "arguments": {}}</tool_call>\nB\n'
                               '<tool_call>{"name": "g", "arguments": {}}</tool_call>\n',
                               calls(("f", {}), ("g", {})), "A\n\nB"),
    "partial_marker_at_end": ("see <tool_ca", [], "see <tool_ca"),
    "marker_in_string": ('<tool_call>{"name": "f", "arguments": {"s": "<tool_call>"}}</tool_call>',
                         calls(("f", {"s": "<tool_call>"})), None),
}

LLAMA3 = {
    "single": ('{"name": "get_weather", "parameters": {"city": "Paris"}}',
               calls(("get_weather", {"city": "Paris"})), None),
    "python_tag": ('<|python_tag|>{"name": "f", "arguments": {"a": 1}}',
                   calls(("f", {"a": 1})), None),
    "several": ('{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}',
                calls(("a", {"x": 1}), ("b", {})), None),
    "several_newline": ('\n{"name": "a", "parameters": {}}\n{"name": "b", "parameters": {"y": [1]}}\n',
                        calls(("a", {}), ("b", {"y": [1]})), None),
    "content_after_call": ('{"name": "a", "parameters": {}} and then some words',
                           calls(("a", {})), "and then some words"),
    "plain": ("The answer is {42}.", [], "The answer is {42}."),
    "plain_json_answer": ('{"answer": 42}', [], '{"answer": 42}'),
    "invalid_json": ('{"name": "f", "parameters": {a: 1}}', [ToolCall("f", "{a: 1}")], None),
    "invalid_second": ('{"name": "a", "parameters": {}}; {"name": "b", oops',
                       calls(("a", {})), '; {"name": "b", oops'),
    "unicode": (json.dumps({"name": "w", "parameters": UNI}, ensure_ascii=False),
                calls(("w", UNI)), None),
    "args_as_string": ('{"name": "f", "parameters": "{\\"a\\": \\"ü\\"}"}',
                       calls(("f", {"a": "ü"})), None),
    "partial_tag_only": ("<|python", [], "<|python"),
    "tag_then_text": ("<|python_tag|>print(1)", [], "<|python_tag|>print(1)"),
}

MISTRAL = {
    "single": ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]',
               calls(("get_weather", {"city": "Paris"})), None),
    "several": ('[TOOL_CALLS] [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}, '
                '"id": "abcdefghi"}]', calls(("a", {"x": 1}), ("b", {})), None),
    "content_and_call": ('I will check. [TOOL_CALLS][{"name": "f", "arguments": {"q": "x"}}]',
                         calls(("f", {"q": "x"})), "I will check."),
    "plain": ("A [link] and [TOOL] text.", [], "A [link] and [TOOL] text."),
    # the array's first element committed: a call array, read element by element
    "invalid_json": ('x [TOOL_CALLS][{"name": "f", "arguments": {oops}}]', [ToolCall("f", "{oops}")],
                     'x'),
    "invalid_element": ('[TOOL_CALLS][{"name": "f", "arguments": {}}, {"arguments": {}}]',
                        calls(("f", {})), '{"arguments": {}}]'),
    "array_args_as_string": ('[TOOL_CALLS][{"name": "f", "arguments": "{}"}, {"arguments": {}}]', [],
                             '[TOOL_CALLS][{"name": "f", "arguments": "{}"}, {"arguments": {}}]'),
    "unicode": ('[TOOL_CALLS]' + json.dumps([{"name": "w", "arguments": UNI}], ensure_ascii=False),
                calls(("w", UNI)), None),
    "v11": ('[TOOL_CALLS]get_weather{"city": "Paris"}[TOOL_CALLS]get_time{}',
            calls(("get_weather", {"city": "Paris"}), ("get_time", {})), None),
    "v11_args_tag": ('Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Zürich"}',
                     calls(("get_weather", {"city": "Zürich"})), "Sure."),
    "v11_call_id": ('[TOOL_CALLS]f[CALL_ID]a1b2c3d4e[ARGS]{"n": -1.5e3}',
                    [ToolCall("f", '{"n": -1.5e3}')], None),  # as written
    # committed at "f{": never closed validly, its arguments run to the end (its own "}" off)
    "v11_invalid": ('[TOOL_CALLS]f{"a": }', [ToolCall("f", '{"a":')], None),
    "v11_truncated": ('[TOOL_CALLS]get_wea', [], '[TOOL_CALLS]get_wea'),
    "marker_alone": ("hi [TOOL_CALLS]", [], "hi [TOOL_CALLS]"),
}

PYTHONIC = {
    "single": ('[get_weather(city="Paris", days=3)]', calls(("get_weather", {"city": "Paris", "days": 3})),
               None),
    "several": ('[a(x=1, y=[1, 2.5, -3], z={"k": None, "t": True}), b()]',
                calls(("a", {"x": 1, "y": [1, 2.5, -3], "z": {"k": None, "t": True}}), ("b", {})), None),
    "multiline": ('\n[\n  a(x="1"),\n  b(y=(1, 2)),\n]\n', calls(("a", {"x": "1"}), ("b", {"y": [1, 2]})),
                  None),
    "llama4_wrapped": ('<|python_start|>[f(q="x")]<|python_end|>', calls(("f", {"q": "x"})), None),
    "plain": ("Paris is sunny today.", [], "Paris is sunny today."),
    "plain_bracket": ("[1] is a citation, not a call.", [], "[1] is a citation, not a call."),
    "content_around_list": ('Here: [f(a=1)]', [], 'Here: [f(a=1)]'),
    "text_after_list": ('[f(a=1)] done', [], '[f(a=1)] done'),
    "comment_after_list": ('[f(a=1)] # x', [], '[f(a=1)] # x'),
    "markdown_link": ('[docs](https://x.y/z) say [f(a=1)]', [], '[docs](https://x.y/z) say [f(a=1)]'),
    "invalid_syntax": ('[f(a=1, b=]', [], '[f(a=1, b=]'),
    "non_literal": ('[f(a=os.system("rm"))]', [], '[f(a=os.system("rm"))]'),
    "name_value": ('[f(a=x)]', [], '[f(a=x)]'),
    "positional": ('[f(1)]', [], '[f(1)]'),
    "kwargs_splat": ('[f(**d)]', [], '[f(**d)]'),
    "not_calls": ('[1, 2]', [], '[1, 2]'),
    "unicode": ('[w(city="Zürich", note="日本語 ✓ \\"quoted\\" \\\\ back")]', calls(("w", UNI)), None),
    "nested_brackets": ('[f(a=[[1], [2, [3]]], b="]")]', calls(("f", {"a": [[1], [2, [3]]], "b": "]"})),
                        None),
}

CASES = [(p, k, *v) for p, table in (("hermes", HERMES), ("llama3_json", LLAMA3),
                                     ("mistral", MISTRAL), ("pythonic", PYTHONIC))
         for k, v in table.items()]


@pytest.mark.parametrize("parser,case,text,want_calls,want_content", CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_extract_and_stream(parser, case, text, want_calls, want_content):
    got = extract(parser, text)
    assert got.tool_calls == want_calls
    assert got.content == want_content
    assert_stream_matches(parser, text, seed=zlib.crc32(case.encode()))


# ---------------------------------------------------------------- streaming behaviour


def test_content_streams_before_the_output_ends():
    # content is not held back needlessly: it arrives before the marker and the call
    p = get_tool_parser("hermes")(None)
    assert p.extract_streaming("Hello ", False).content == "Hello"  # trailing whitespace held
    assert p.extract_streaming("Hello wor", False).content == " wor"
    text = 'Hello world <tool_call>{"name": "f", "arguments": {}}</tool_call>'
    d = p.extract_streaming(text[:text.index("<tool_call>") + 5], False)
    assert d.content == "ld" and not d.tool_calls  # " <tool" held back
    d = p.extract_streaming(text, False)  # the call streams as soon as it closes
    assert d.content is None and d.tool_calls[0].name == "f" and d.tool_calls[0].arguments == "{}"


def test_llama3_call_streams_as_written():
    p = get_tool_parser("llama3_json")(None)
    first = '{"name": "a", "parameters": {"x": 1}}'
    assert p.extract_streaming('{"name": "a", "param', False) == DeltaMessage()
    d = p.extract_streaming('{"name": "a", "parameters": {"x"', False)  # committed: the name
    assert [(t.index, t.name, t.arguments) for t in d.tool_calls] == [(0, "a", '{"x"')]
    d = p.extract_streaming(first[:-1], False)  # the arguments as they grow
    assert [(t.index, t.name, t.arguments) for t in d.tool_calls] == [(0, None, ": 1}")]
    assert p.extract_streaming(first, False) == DeltaMessage()  # the object's own "}" adds none


def test_hermes_arguments_stream_in_fragments_that_join_to_the_call():
    text = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
            '"days": [1, 2]}}\n</tool_call>')
    p = get_tool_parser("hermes")(None)
    deltas = [t for k in range(1, len(text) + 1)
              for t in p.extract_streaming(text[:k], k == len(text)).tool_calls]
    assert deltas[0].name == "get_weather" and all(t.name is None for t in deltas[1:])
    assert len(deltas) > 10  # fragments, not one whole delta
    assert "".join(t.arguments for t in deltas) == '{"city": "Paris", "days": [1, 2]}'
    # a partial closing tag is never sent as arguments
    p = get_tool_parser("hermes")(None)
    d = p.extract_streaming('<tool_call>{"name": "f", "arguments": {oops</tool', False)
    assert [(t.name, t.arguments) for t in d.tool_calls] == [("f", "{oops")]
    d = p.extract_streaming('<tool_call>{"name": "f", "arguments": {oops}}</tool_call>', True)
    assert [(t.name, t.arguments) for t in d.tool_calls] == [(None, "}")]
    # a call cut by max_tokens keeps what was written, streamed or not
    p = get_tool_parser("hermes")(None)
    cut = '<tool_call>{"name": "f", "arguments": {"q": "abc'
    sent = "".join(t.arguments for k in (45, len(cut))
                   for t in p.extract_streaming(cut[:k], k == len(cut)).tool_calls)
    assert sent == '{"q": "abc' and extract("hermes", cut).tool_calls == [ToolCall("f", sent)]


def test_pythonic_plain_text_streams_at_once_and_calls_at_the_end():
    p = get_tool_parser("pythonic")(None)
    assert p.extract_streaming("Sunny", False).content == "Sunny"
    p = get_tool_parser("pythonic")(None)
    assert p.extract_streaming("[f(a=1)]", False) == DeltaMessage()  # trailing text would undo it
    assert [t.name for t in p.extract_streaming("[f(a=1)]", True).tool_calls] == ["f"]
    p = get_tool_parser("pythonic")(None)
    assert p.extract_streaming("[1", False) == DeltaMessage()
    assert p.extract_streaming("[1] said", False).content == "[1] said"  # closed list, no calls
    p = get_tool_parser("pythonic")(None)
    assert p.extract_streaming("[f(a=1)] and", False).content == "[f(a=1)] and"  # text after it


def test_extract_does_not_disturb_streaming_state():
    p = get_tool_parser("hermes")(None)
    assert p.extract_streaming("Hi <tool", False).content == "Hi"
    assert [t.name for t in p.extract_tool_calls(
        '<tool_call>{"name": "x", "arguments": {}}</tool_call>').tool_calls] == ["x"]
    d = p.extract_streaming('Hi <tool_call>{"name": "f", "arguments": {}}</tool_call>', True)
    assert d.content is None and [(t.index, t.name) for t in d.tool_calls] == [(0, "f")]


# ---------------------------------------------------------------- random outputs, all parsers

FRAGMENTS = {
    "hermes": ["<tool_call>", "</tool_call>", "<tool", "\n", " ", "hi", "<", "ü",
               '{"name": "f", "arguments": {"a": "ü"}}', '{"name": "g", "arguments": {}}', "{", "}",
               '<tool_call>\n{"name": "h", "arguments": {"b": [1, "</"]}}\n</tool_call>',
               '<tool_call>{"name": "k", "arguments": {"d"', ': 2}', "}"],
    "llama3_json": ["<|python_tag|>", '{"name": "f", "parameters": {"a": 1}}', "; ", ";", "\n", " ",
                    '{"name": "g", "arguments": "{}"}', "{", "}", "x", '"', "ü",
                    '{"name": "k", "parameters": {"d"', ": 2}"],
    "mistral": ["[TOOL_CALLS]", "[", "]", " ", "x", '[{"name": "f", "arguments": {"b": [1]}}]',
                'f{"a": 1}', "g[ARGS]{}", "[ARGS]", "{", "ü", "\n",
                '[{"name": "h", "arguments": {"c"', ", ", '{"name": "g", "arguments": {}}', "}]",
                ': "]"}'],
    "pythonic": ["[", "]", "f(a=1)", 'g(b="ü]")', ", ", " ", "\n", "x", "(", ")", "<|python_start|>",
                 "<|python_end|>", '[f(a=[1, {"k": None}]), g()]', "[f(a=1)]"],
}


@pytest.mark.parametrize("parser", sorted(TOOL_PARSERS))
def test_random_outputs_stream_like_they_extract(parser):
    rng = random.Random(parser)
    frags = FRAGMENTS[parser]
    for i in range(150):
        text = "".join(rng.choice(frags) for _ in range(rng.randint(0, 8)))
        assert_stream_matches(parser, text, seed=i)


# ---------------------------------------------------------------- registry


def test_registry():
    assert set(TOOL_PARSERS) == {"hermes", "llama3_json", "mistral", "pythonic"}
    for name in TOOL_PARSERS:
        cls = get_tool_parser(name)
        assert issubclass(cls, ToolParser)
        cls(None)  # constructible without a tokenizer
    with pytest.raises(ValueError, match="hermes"):
        get_tool_parser("nope")
    assert get_tool_parser("mistral").skip_special_tokens is False


def test_required_calls_stream_name_first_then_arguments_as_written():
    """tool_choice 'required': fed the grammar's JSON array a few characters at a time, each
    call's name comes once written, then its arguments' text in pieces that join to the
    parameters as written; calls in order; with parallel_tool_calls false only the first."""
    from servelm.server.tools import RequiredCallsScan, ToolOutput, ToolPlan
    calls = [{"name": "get_weather", "parameters": {"city": 'Pa"ris\\', "n": [1, {"x": 2}]}},
             {"name": "f2", "parameters": {}}, {"name": "g", "parameters": 12.5}]
    for indent in (None, 2):
        text = json.dumps(calls, indent=indent)
        for parallel in (True, False):
            plan = ToolPlan(mode="required", tools=[], parallel=parallel, parameters={})
            out = ToolOutput(plan, tokenizer=None)
            got: dict[int, dict] = {}
            for k in range(0, len(text) + 3, 3):
                _, deltas = out.delta(text[:k], k >= len(text))
                for d in deltas:
                    if "id" in d:  # a call's first delta: its id and name, no arguments
                        assert d["index"] not in got and d["function"]["arguments"] == ""
                        got[d["index"]] = {"name": d["function"]["name"], "args": ""}
                    else:
                        got[d["index"]]["args"] += d["function"]["arguments"]
            want = calls if parallel else calls[:1]
            assert [got[i]["name"] for i in sorted(got)] == [c["name"] for c in want]
            assert [json.loads(got[i]["args"]) for i in sorted(got)] == \
                [c["parameters"] for c in want]
    scan = RequiredCallsScan()
    scan.feed('[{"name": "get_wea')
    assert scan.calls == [{"name": None, "args_start": None, "args_end": None}]
