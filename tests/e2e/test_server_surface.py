"""The OpenAI/vLLM surface clients rely on besides generation, against one `servelm serve`:
prompt scoring (echo with max_tokens 0), model cards (/v1/models, /v1/models/{id}) without
server paths, /tokenizer_info (and lm-eval's remote tokenizer on it), request bodies in
/openapi.json and the self-contained /docs page, the --chat-template, --generation-config,
--model and tool flags, and request fields servelm does not implement being 400s. Plus unit
tests of the pure parts (field rules, settings files, the CLI's parsing)."""
from __future__ import annotations

import json
import os

import openai
import pytest

from tests.e2e.server_utils import ServerProcess, httpx, make_tiny_model

MAX_MODEL_LEN = 256
PROMPT = "The quick brown fox jumps over the lazy dog."
TEMPLATE = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")
CAP = 5  # max_new_tokens of the served generation config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny-surface-model")))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("surface-settings")
    (d / "generation_config.json").write_text(json.dumps({"temperature": 0,
                                                          "max_new_tokens": CAP}))
    (d / "template.jinja").write_text(TEMPLATE)
    srv = ServerProcess(["--model", model_dir, "--device", "cpu", "--max-model-len",
                         str(MAX_MODEL_LEN), "--kv-cache-memory", str(8 << 20),
                         "--served-model-name", "tiny", "tiny-alias",
                         "--chat-template", str(d / "template.jinja"),
                         "--generation-config", str(d), "--enable-auto-tool-choice",
                         "--tool-call-parser", "hermes", "--trust-remote-code",
                         "--disable-log-requests"])
    yield srv
    log = srv.close()
    assert "Traceback" not in log and "never retrieved" not in log, log


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0,
                         timeout=60)


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        yield c


def assert_error(r, status: int, param=None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    return err


# ---- prompt scoring ------------------------------------------------------------------------
def test_echo_with_max_tokens_zero_scores_the_prompt(client, api):
    r = client.completions.create(model="tiny", prompt=PROMPT, echo=True, max_tokens=0,
                                  logprobs=1)
    (c,) = r.choices
    assert c.text == PROMPT and c.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and r.usage.total_tokens == r.usage.prompt_tokens
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == r.usage.prompt_tokens
    assert "".join(lp.tokens) == PROMPT and lp.token_logprobs[0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp.token_logprobs[1:])
    # the same numbers as echo with one generated token (lm-eval's own request), minus it
    one = client.completions.create(model="tiny", prompt=PROMPT, echo=True, max_tokens=1,
                                    logprobs=1).choices[0].logprobs
    assert len(one.token_logprobs) == len(lp.token_logprobs) + 1
    assert one.token_logprobs[:-1] == pytest.approx(lp.token_logprobs, abs=1e-4)
    # without echo, max_tokens 0 asks for nothing
    assert_error(api.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 0}), 400,
                 "max_tokens")


def test_echo_with_max_tokens_zero_token_prompts_streamed(api):
    ids = [api.post("/tokenize", json={"prompt": p}).json()["tokens"] for p in ("Hello", PROMPT)]
    body = {"prompt": ids, "echo": True, "max_tokens": 0, "logprobs": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with api.stream("POST", "/v1/completions", json=body) as r:
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    got = {ch["index"]: ch for c in chunks for ch in c["choices"]}
    assert [len(got[i]["logprobs"]["tokens"]) for i in (0, 1)] == [len(x) for x in ids]
    assert got[1]["text"] == PROMPT and all(ch["finish_reason"] == "length"
                                            for ch in got.values())
    assert chunks[-1]["usage"]["completion_tokens"] == 0


# ---- model cards, tokenizer info ---------------------------------------------------------------
def test_model_cards(client, api, model_dir):
    cards = api.get("/v1/models").json()["data"]
    assert [c["id"] for c in cards] == ["tiny", "tiny-alias"]
    for c in cards:
        assert c["root"] == "tiny" and c["max_model_len"] == MAX_MODEL_LEN
    assert model_dir not in api.get("/v1/models").text  # no path of this machine
    m = client.models.retrieve("tiny-alias")
    assert m.id == "tiny-alias" and m.owned_by == "servelm"
    assert api.get("/v1/models/tiny").json() == cards[0]
    err = assert_error(api.get("/v1/models/gpt-9"), 404, "model")
    assert err["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")


def test_tokenizer_info(api, model_dir):
    r = api.get("/tokenizer_info")
    info = r.json()
    assert info["tokenizer_class"] and info["chat_template"] == TEMPLATE  # --chat-template's
    assert (info["bos_token"], info["eos_token"], info["pad_token"]) == ("<s>", "</s>", "<pad>")
    assert info["model_max_length"] == MAX_MODEL_LEN
    assert "name_or_path" not in info and model_dir not in r.text


def test_lm_eval_remote_tokenizer(server):
    utils = pytest.importorskip("lm_eval.utils")
    base = server.base_url + "/v1/completions"  # what lm-eval's local-completions is given
    assert utils.check_remote_tokenizer_support(base)
    tok = utils.RemoteTokenizer(base)
    ids = tok.encode(PROMPT)
    assert tok.decode(ids) == PROMPT and tok.eos_token == "</s>" and tok.eos_token_id == 1


# ---- serve flags -----------------------------------------------------------------------------
def test_chat_template_flag(api):
    msgs = [{"role": "user", "content": "hi"}]
    via_chat = api.post("/tokenize", json={"messages": msgs}).json()["tokens"]
    text = "[user] hi\n[assistant] "
    assert via_chat == api.post("/tokenize", json={"prompt": text,
                                                   "add_special_tokens": False}).json()["tokens"]
    r = api.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 1}).json()
    assert r["usage"]["prompt_tokens"] == len(via_chat)


def test_generation_config_defaults(client):
    # temperature 0 from the file: two unseeded requests agree; max_new_tokens caps the output
    a, b = (client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}],
        extra_body={"ignore_eos": True}) for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.completion_tokens == CAP and a.choices[0].finish_reason == "length"
    c = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=50,
                                  extra_body={"ignore_eos": True})
    assert c.usage.completion_tokens == CAP


# ---- OpenAPI and /docs -----------------------------------------------------------------------
def test_openapi_has_request_bodies(api):
    spec = api.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    posts = {p: ops["post"] for p, ops in spec["paths"].items() if "post" in ops}
    assert {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"} <= set(posts)
    for path, op in posts.items():
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.split("/")[-1] in schemas, path
    assert "prompt" in schemas["CompletionRequest"]["properties"]
    assert "messages" in schemas["ChatCompletionRequest"]["required"]
    assert "/v1/models/{model_id}" in spec["paths"]
    refs = {m.split("/")[-1] for m in _refs(spec)}
    assert refs <= set(schemas), refs - set(schemas)  # every $ref resolves
    assert "422" not in json.dumps(spec["paths"])  # validation errors are 400s here
    # every status the server can answer is documented (schemathesis finds none undocumented)
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            want = {"401", "404", "503"} | ({"400", "413", "415", "429"} if method == "post"
                                            else set())
            assert want <= set(op["responses"]), (path, method)
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "content" not in spec["paths"]["/health"]["get"]["responses"]["200"]


def _refs(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _refs(v)


def test_docs_page_is_self_contained(api):
    r = api.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text.lower()
    assert "/openapi.json" in html and "<script src" not in html and "<link" not in html
    assert "http://" not in html and "https://" not in html  # nothing fetched from elsewhere
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert api.get("/redoc").status_code == 404


# ---- no silent ignoring ----------------------------------------------------------------------
COMPLETION = {"model": "tiny", "prompt": "Hello", "max_tokens": 1}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1}


@pytest.mark.parametrize("path,field,value", [
    ("/v1/completions", "suffix", "tail"),
    ("/v1/chat/completions", "functions", [{"name": "f", "parameters": {}}]),
    ("/v1/chat/completions", "function_call", "auto"),
    ("/v1/chat/completions", "audio", {"voice": "alloy", "format": "wav"}),
    ("/v1/chat/completions", "modalities", ["text", "audio"]),
    ("/v1/chat/completions", "prediction", {"type": "content", "content": "x"}),
    ("/v1/chat/completions", "web_search_options", {}),
    ("/v1/chat/completions", "echo", True),
    ("/v1/chat/completions", "chat_template", "{{ messages }}"),
    ("/v1/completions", "truncate_prompt_tokens", 4),
    ("/v1/completions", "bad_words", ["fox"]),
    ("/v1/completions", "cache_salt", "s"),
    ("/v1/completions", "return_token_ids", True),
])
def test_unimplemented_fields_are_400(api, path, field, value):
    body = {**(COMPLETION if path == "/v1/completions" else CHAT), field: value}
    err = assert_error(api.post(path, json=body), 400, field)
    assert "not supported" in err["message"]


def test_prompt_logprobs(api):
    """vLLM's prompt_logprobs: per prompt token (the first: None) its own logprob and the N
    most likely, as echo with logprobs scores them; in a completions stream's first chunk of
    each choice; beside the choices in chat (a chat stream: 400)."""
    prompt = "The quick brown fox"
    ids = api.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    body = {**COMPLETION, "prompt": prompt, "max_tokens": 2, "prompt_logprobs": 2, "n": 2,
            "temperature": 1.0, "seed": 1}
    r = api.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    echo = api.post("/v1/completions", json={**COMPLETION, "prompt": prompt, "echo": True,
                                             "logprobs": 4, "max_tokens": 0}).json()
    scores = echo["choices"][0]["logprobs"]["token_logprobs"]
    for c in r.json()["choices"]:
        plp = c["prompt_logprobs"]
        assert len(plp) == len(ids) and plp[0] is None
        for j in range(1, len(ids)):
            pos = plp[j]
            assert str(ids[j]) in pos and len(pos) <= 3
            assert abs(pos[str(ids[j])]["logprob"] - scores[j]) < 1e-4
            assert {1, 2} <= {v["rank"] for v in pos.values()}
            assert all(isinstance(v["decoded_token"], str) for v in pos.values())
    with api.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
        chunks = [json.loads(ln[6:]) for ln in s.iter_lines()
                  if ln.startswith("data: ") and ln != "data: [DONE]"]
    firsts = {}
    for ch in chunks:
        for c in ch["choices"]:
            firsts.setdefault(c["index"], c)
            if c is not firsts[c["index"]]:
                assert "prompt_logprobs" not in c
    assert sorted(firsts) == [0, 1]
    assert all(c["prompt_logprobs"] == r.json()["choices"][0]["prompt_logprobs"]
               for c in firsts.values())
    chat = {**CHAT, "prompt_logprobs": 0}
    out = api.post("/v1/chat/completions", json=chat).json()
    assert out["prompt_logprobs"][0] is None and len(out["prompt_logprobs"]) > 3
    assert all(len(p) == 1 for p in out["prompt_logprobs"][1:])  # the prompt's token alone
    assert_error(api.post("/v1/chat/completions", json={**chat, "stream": True}), 400,
                 "prompt_logprobs")
    assert_error(api.post("/v1/completions", json={**body, "prompt_logprobs": -1}), 400,
                 "prompt_logprobs")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_continuous_usage_stats(api, path):
    """Every chunk carries the usage so far (completion tokens never decreasing, the last
    chunk's the final count); without include_usage it is a 400 naming the field."""
    base = {**(CHAT if path == "/v1/chat/completions" else COMPLETION), "stream": True,
            "max_tokens": 6, "ignore_eos": True}
    body = {**base, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with api.stream("POST", path, json=body) as r:
        chunks = [json.loads(ln[6:]) for ln in r.iter_lines()
                  if ln.startswith("data: ") and ln != "data: [DONE]"]
    assert r.status_code == 200
    used = [c["usage"] for c in chunks]
    assert all(u is not None for u in used), chunks
    counts = [u["completion_tokens"] for u in used]
    assert counts == sorted(counts) and 1 <= counts[-1] <= 6
    assert counts[-2] == counts[-1]  # the finishing chunk already counts every token
    assert len({u["prompt_tokens"] for u in used}) == 1
    assert all(u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] for u in used)
    assert chunks[-1]["choices"] == []  # the include_usage chunk
    err = assert_error(api.post(path, json={**base, "stream_options": {
        "continuous_usage_stats": True}}), 400, "stream_options.continuous_usage_stats")
    assert "include_usage" in err["message"]


def test_harmless_fields_are_accepted(client):
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=1,
        user="u1", metadata={"k": "v"}, store=False, service_tier="auto",
        reasoning_effort="low", modalities=["text"],
        extra_body={"safety_identifier": "s", "prompt_cache_key": "p", "functions": [],
                    "request_id": "mine", "include_reasoning": True})
    assert r.choices[0].finish_reason == "length"
    c = client.completions.create(model="tiny", prompt="Hello", max_tokens=1, suffix="",
                                  user="u1")
    assert c.choices[0].finish_reason == "length"


# ---- unit tests of the pure parts ----------------------------------------------------------------
def test_field_rules_skip_what_others_implement():
    from servelm.server.protocol import ChatCompletionRequest, CompletionRequest
    from servelm.server.request_fields import RULES, refuse_unsupported
    implemented = ["response_format", "structured_outputs", "guided_json", "guided_regex",
                   "guided_choice", "guided_grammar", "guided_decoding_backend",
                   "guided_whitespace_pattern", "tools", "tool_choice", "parallel_tool_calls",
                   "use_beam_search", "length_penalty", "early_stopping", "best_of"]
    assert not {r.name for r in RULES} & set(implemented)
    for model in (CompletionRequest, ChatCompletionRequest):
        refuse_unsupported(model, {k: {"x": 1} for k in implemented})  # never refused here
    # a rule steps aside once the model declares its field
    declared = type("R", (CompletionRequest,), {"__annotations__": {"suffix": str}})
    refuse_unsupported(declared, {"suffix": "tail"})


def test_load_chat_template(tmp_path):
    from servelm.server.serve_settings import load_chat_template
    f = tmp_path / "t.jinja"
    f.write_text(TEMPLATE)
    assert load_chat_template(str(f)) == TEMPLATE
    assert load_chat_template("{{ messages[0].content }}\\n") == "{{ messages[0].content }}\n"
    assert load_chat_template(None) is None
    with pytest.raises(ValueError, match="looks like a file path"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="not a valid Jinja"):
        load_chat_template("{% for m in messages %}")


def test_load_generation_defaults(tmp_path):
    from servelm.server.serve_settings import load_generation_defaults, with_defaults
    from servelm.server.protocol import ChatCompletionRequest
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.9, "max_new_tokens": 64, "do_sample": True,
         "eos_token_id": 2}))
    got = dict(load_generation_defaults("auto", str(tmp_path)))
    assert got == {"temperature": 0.6, "top_p": 0.9, "max_tokens": 64}
    assert load_generation_defaults("vllm", str(tmp_path)) == ()
    assert load_generation_defaults("auto", str(tmp_path / "model.gguf")) == ()
    assert dict(load_generation_defaults(str(tmp_path), "elsewhere")) == got
    with pytest.raises(ValueError, match="no generation_config.json"):
        load_generation_defaults(str(tmp_path / "nowhere"), str(tmp_path))
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 7}))
    with pytest.raises(ValueError, match="top_p"):
        load_generation_defaults("auto", str(tmp_path))
    req = ChatCompletionRequest.model_validate({"messages": [], "top_p": 0.5})
    filled, max_tokens = with_defaults(req, None, tuple(got.items()))
    assert (filled.temperature, filled.top_p, max_tokens) == (0.6, 0.5, 64)
    assert with_defaults(req, 100, tuple(got.items()))[1] == 64  # a server-wide cap
    assert with_defaults(req, 10, tuple(got.items()))[1] == 10


def test_serve_model_flag_and_tool_flags(capsys):
    from servelm.cli import build_parser, main
    from servelm.server.cli import resolve_serve_args
    parse = build_parser().parse_args
    assert resolve_serve_args(parse(["serve", "--model", "m"])).model == "m"
    assert resolve_serve_args(parse(["serve", "m", "--model", "m"])).model == "m"
    with pytest.raises(ValueError, match="given twice"):
        resolve_serve_args(parse(["serve", "a", "--model", "b"]))
    ns = resolve_serve_args(parse(["serve", "m"]))
    assert (ns.generation_config, ns.trust_remote_code, ns.enable_auto_tool_choice,
            ns.tool_call_parser, ns.chat_template) == ("auto", False, False, None, None)
    assert not hasattr(ns, "model_flag")
    # a startup error before any model is loaded
    assert main(["serve", "--model", "nowhere", "--enable-auto-tool-choice"]) == 2
    assert "--tool-call-parser" in capsys.readouterr().err


def test_unknown_flag_uses_the_subcommand_usage(capsys):
    from servelm.cli import build_parser
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["serve", "m", "--max-modl-len", "5"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: servelm serve" in err and "--max-modl-len" in err
    assert "did you mean --max-model-len?" in err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "m", "--tool-call-parser", "nope"])
    assert "invalid choice" in capsys.readouterr().err


def test_no_lm_eval_server_path_leak(model_dir):
    from servelm.server.surface import tokenizer_info

    class Tok:
        init_kwargs = {"name_or_path": model_dir, "vocab_file": "/x/vocab.json",
                       "tokenizer_file": "/x/tokenizer.json", "model_max_length": 10 ** 30,
                       "added_tokens_decoder": {7: type("AddedToken", (), {"content": "<x>"})()}}
        eos_token, bos_token, chat_template = "</s>", None, "T"

    info = tokenizer_info(Tok(), 128)
    assert os.sep + "x" not in json.dumps(info) and model_dir not in json.dumps(info)
    assert info["model_max_length"] == 128 and info["added_tokens_decoder"] == {"7": "<x>"}
    assert (info["eos_token"], info["bos_token"], info["chat_template"]) == ("</s>", None, "T")
    assert info["tokenizer_class"] == "Tok"


def test_fields_doc_lists_every_field():
    """docs/openai_fields.md names every field the request models declare and marks every
    refused one 400 (a field someone adds to protocol.py needs its row)."""
    import re

    from servelm.server.protocol import ChatCompletionRequest, CompletionRequest
    from servelm.server.request_fields import RULES
    doc = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs",
                            "openai_fields.md")).read()
    rows = {}
    for line in doc.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            for name in re.findall(r"`([^`]+)`", cells[0]):
                rows[name] = cells[3]
    ours = {"ttft_slo_ms", "tpot_slo_ms"}  # servelm's own, named below the tables
    declared = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)
    assert declared - ours <= set(rows), declared - ours - set(rows)
    for rule in RULES:
        assert rows.get(rule.name) == "400", rule.name
