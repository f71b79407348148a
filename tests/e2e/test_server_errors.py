"""Errors of `servelm serve`: OpenAI's error shape and the right status for bad keys (401),
unknown models and routes (404), invalid values and types, bad JSON, over-long prompts (400),
big bodies (413); no input (lone surrogates, huge numbers, negatives, NaN) ever gets a 5xx or
stops the engine; and when the engine process dies, in-flight requests fail, /health says
503 and nothing hangs."""
from __future__ import annotations

import http.client as http_client
import json
import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.e2e.server_utils import ServerProcess, httpx, make_tiny_model

KEY = "sekret"
MAX_MODEL_LEN = 256
AUTH = {"Authorization": f"Bearer {KEY}"}
COMPLETION = {"model": "tiny", "prompt": "Hello world", "max_tokens": 2}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny-errors-model")))


@pytest.fixture(scope="module")
def server(model_dir):
    srv = ServerProcess([model_dir, "--device", "cpu", "--max-model-len", str(MAX_MODEL_LEN),
                         "--kv-cache-memory", str(8 << 20), "--served-model-name", "tiny",
                         "--api-key", KEY])
    yield srv
    log = srv.close()
    assert "Traceback" not in log and "never retrieved" not in log, log


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=60) as c:
        yield c


def post(api, path: str, body, **kw) -> "httpx.Response":
    """Body as raw JSON text (ASCII escapes, so lone surrogates travel as \\udXXX)."""
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return api.post(path, content=data, headers={"Content-Type": "application/json"}, **kw)


def assert_error(r, status: int, *, contains: str = "") -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert contains in err["message"], err["message"]
    return err


# ---- 401 / 404 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": f"Basic {KEY}"}, {"Authorization": KEY}])
def test_api_key_required_on_v1(server, headers):
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        assert_error(c.get("/v1/models", headers=headers), 401)
        for path, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
            assert_error(c.post(path, json=body, headers=headers), 401)
        assert c.get("/health").status_code == 200  # not behind the key, like vLLM
        # every other route with data is behind it too
        for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1]})):
            assert_error(c.post(path, json=body, headers=headers), 401)
        for path in ("/metrics", "/version", "/tokenizer_info", "/v1/models/tiny"):
            assert_error(c.get(path, headers=headers), 401)
        assert c.get("/docs").status_code == 200  # static pages, no data


def test_non_json_content_type_is_415_and_405_has_allow(api):
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                  None):
        headers = {"Content-Type": ctype} if ctype else {}
        r = api.post("/v1/completions", content=json.dumps(COMPLETION), headers=headers)
        err = assert_error(r, 415, contains="application/json")
        assert err["code"] == "unsupported_media_type"
    r = api.post("/v1/completions", content=json.dumps(COMPLETION),
                 headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text
    r = api.get("/v1/completions")
    assert_error(r, 405)
    assert r.headers["allow"] == "POST"


def test_api_key_openai_client(server):
    bad = openai.OpenAI(base_url=server.base_url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0)
    assert good.completions.create(model="tiny", prompt="Hi", max_tokens=1).choices


def test_unknown_model_and_route(api):
    err = assert_error(post(api, "/v1/completions", {**COMPLETION, "model": "gpt-9"}), 404)
    assert err["param"] == "model"
    assert_error(post(api, "/v1/chat/completions", {**CHAT, "model": "gpt-9"}), 404)
    assert_error(api.get("/v1/nothing-here"), 404)
    assert_error(api.get("/v1/completions"), 405)


# ---- 400 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {**COMPLETION, "temperature": -1}, "temperature"),
    ("/v1/completions", {**COMPLETION, "temperature": "hot"}, "temperature"),
    ("/v1/completions", {**COMPLETION, "top_p": 0}, "top_p"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 2.5}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "n": 0}, "n"),
    ("/v1/completions", {**COMPLETION, "n": 129}, "n"),
    ("/v1/completions", {**COMPLETION, "logprobs": 21}, "logprobs"),
    ("/v1/completions", {**COMPLETION, "seed": "1"}, "seed"),
    ("/v1/completions", {**COMPLETION, "stop": 5}, "stop"),
    ("/v1/completions", {**COMPLETION, "stop_token_ids": [10 ** 30]}, "stop_token_ids"),
    ("/v1/completions", {**COMPLETION, "min_tokens": 3}, "min_tokens"),
    ("/v1/completions", {**COMPLETION, "prompt": []}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [1, -1]}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [10 ** 30]}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": None}, "prompt"),
    ("/v1/completions", {"model": "tiny"}, "prompt"),
    ("/v1/completions", {**COMPLETION, "stream": "yes"}, "stream"),
    ("/v1/chat/completions", {**CHAT, "messages": "Hello"}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"content": "no role"}]}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, "messages"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 99}, "logprobs"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": -3}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "frequency_penalty": 3}, "frequency_penalty"),
    # priority needs --scheduling-policy priority (this server is fcfs); or is not an int
    ("/v1/completions", {**COMPLETION, "priority": 1}, "priority"),
    ("/v1/chat/completions", {**CHAT, "priority": -2}, "priority"),
    ("/v1/completions", {**COMPLETION, "priority": "high"}, "priority"),
    # latency objectives: positive milliseconds (accepted under any policy: they are measured)
    ("/v1/completions", {**COMPLETION, "ttft_slo_ms": -5}, "ttft_slo_ms"),
    ("/v1/chat/completions", {**CHAT, "tpot_slo_ms": 0}, "tpot_slo_ms"),
    ("/v1/completions", {**COMPLETION, "tpot_slo_ms": "fast"}, "tpot_slo_ms"),
])
def test_invalid_values_are_400(api, path, body, param):
    for stream in (False, True):  # a stream that cannot start is a plain JSON error
        err = assert_error(post(api, path, {**body, "stream": stream}
                                if "stream" not in body else body), 400)
        assert err["param"] == param and err["type"] == "invalid_request_error"


@pytest.mark.parametrize("raw", [b"", b"not json", b"{", b"[1, 2]", b'"text"', b"3", b"null",
                                 b'{"prompt": "x", "temperature": NaN}',
                                 b'{"prompt": "x", "temperature": Infinity}',
                                 b"\xff\xfe\x00garbage", b"[" * 100_000 + b"]" * 100_000,
                                 b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}"])
def test_bad_bodies_are_400(api, raw):
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert_error(post(api, path, raw), 400)


def test_context_length_limits(api):
    err = assert_error(post(api, "/v1/completions", {**COMPLETION, "prompt": [5, 6],
                                                      "max_tokens": 300}),
                       400, contains=str(MAX_MODEL_LEN))
    assert "302" in err["message"] and "300" in err["message"]  # prompt 2 + 300 asked
    assert_error(post(api, "/v1/completions", {**COMPLETION, "prompt": [5] * 300}), 400,
                 contains="300")
    err = assert_error(post(api, "/v1/chat/completions", {**CHAT, "max_completion_tokens": 10**9}),
                       400, contains=str(MAX_MODEL_LEN))
    assert str(10**9) in err["message"]


def test_request_count_limits(api):
    assert_error(post(api, "/v1/completions", {**COMPLETION, "prompt": ["hi"] * 1025}), 400,
                 contains="1024")
    r = post(api, "/v1/completions", {**COMPLETION, "prompt": ["hi"] * 3, "max_tokens": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 3


def test_work_and_queue_limits(model_dir):
    """--max-sequences-per-request, --max-stop-sequences, --max-stop-length (400s naming the
    field) and --max-waiting-requests (429 with Retry-After once the queue is full)."""
    srv = ServerProcess([model_dir, "--device", "cpu", "--max-model-len", "512",
                         "--kv-cache-memory", str(8 << 20), "--served-model-name", "tiny",
                         "--max-num-seqs", "1", "--max-waiting-requests", "2",
                         "--max-sequences-per-request", "8", "--max-stop-sequences", "2",
                         "--max-stop-length", "5"])
    try:
        with httpx.Client(base_url=srv.base_url, timeout=60) as c:
            def p(body):
                return c.post("/v1/completions", json={**COMPLETION, **body})
            assert assert_error(p({"prompt": ["a"] * 3, "n": 3}), 400)["param"] == "n"
            assert assert_error(p({"stop": ["a", "b", "c"]}), 400)["param"] == "stop"
            assert assert_error(p({"stop": ["abcdef"]}), 400)["param"] == "stop"
            assert assert_error(p({"prompt": ["a"] * 2, "n": 2}), 400,
                                contains="at most 3 at a time")["param"] == "n"
            assert p({"stop": ["ab", "cd"], "n": 3}).status_code == 200
            # 3 sequences in flight fill 1 running + 2 waiting (one after another: seconds of
            # work), so the next request is a 429
            long = {**COMPLETION, "n": 3, "max_tokens": 500, "ignore_eos": True}
            def post_long():  # its own client: one httpx client would serialize the two
                with httpx.Client(base_url=srv.base_url, timeout=60) as c2:
                    return c2.post("/v1/completions", json=long)
            with ThreadPoolExecutor(1) as pool:
                busy = pool.submit(post_long)
                time.sleep(0.3)  # it is queued first (else a probe could take its room)
                refused = None
                for _ in range(200):  # while the long request runs: a small one is refused
                    r = c.post("/v1/completions", json={**COMPLETION, "max_tokens": 1})
                    if r.status_code == 429:
                        refused = r
                        break
                    time.sleep(0.01)
                assert busy.result().status_code == 200
            assert refused is not None, "no 429 while the queue was full"
            err = assert_error(refused, 429)
            assert err["code"] == "queue_full" and refused.headers["retry-after"] == "1"
            assert p({"max_tokens": 1}).status_code == 200  # the finished request freed it
    finally:
        log = srv.close()
    assert "Traceback" not in log, log


# ---- logit_bias --------------------------------------------------------------------------------
def _vocab_size(model_dir: str) -> int:
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)["vocab_size"]


_ENDPOINTS = (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT))


@pytest.mark.parametrize("bias", [
    {"5": 101}, {"5": -100.5}, {"5": 10 ** 30}, {"5": "abc"}, {"5": "1"}, {"5": True},
    {"5": None}, {"5": [1]}, {"abc": 1}, {"-1": 1}, {"1.5": 1}, {"0x10": 1}, {"": 1},
    {"\u00b2": 1}, {"\ud800": 1},
    {"9" * 5000: 1}, {str(i): 1 for i in range(301)}, [5], "5", 5,
], ids=lambda b: repr(b)[:24])
def test_logit_bias_invalid_is_400(api, bias):
    for path, base in _ENDPOINTS:
        for stream in (False, True):  # refused before a stream starts
            err = assert_error(post(api, path, {**base, "logit_bias": bias, "stream": stream}),
                               400, contains="logit_bias")
            assert err["param"] == "logit_bias" and err["type"] == "invalid_request_error"


def test_logit_bias_non_finite_values_are_400(api):
    for path, base in _ENDPOINTS:
        # Python's JSON reads 1e400 as infinity: refused as a value, naming the field
        for big in ("1e400", "-1e400"):
            body = json.dumps({**base, "logit_bias": {"5": 0}}).replace('{"5": 0}',
                                                                        '{"5": %s}' % big)
            err = assert_error(post(api, path, body), 400, contains="logit_bias")
            assert err["param"] == "logit_bias"
        # NaN is not JSON: the body is refused before any field is read
        body = json.dumps({**base, "logit_bias": {"5": 0}}).replace('{"5": 0}', '{"5": NaN}')
        assert_error(post(api, path, body), 400)


def test_logit_bias_token_ids_checked_against_vocab(api, model_dir):
    vocab = _vocab_size(model_dir)
    for path, base in _ENDPOINTS:
        for key in (str(vocab), str(vocab + 1000), "9" * 20):
            for stream in (False, True):
                r = post(api, path, {**base, "logit_bias": {"5": 1, key: -1}, "stream": stream})
                err = assert_error(r, 400, contains=f"[0, {vocab})")
                assert err["param"] == "logit_bias"
        # the limits themselves pass: the last id, +-100, 300 entries, ints and floats, {}
        for bias in ({str(vocab - 1): 100}, {"0": -100, "1": 5, " 2": 5.5, "3": -0.0},
                     {str(i): 0.5 for i in range(300)}, {}, None):
            r = post(api, path, {**base, "logit_bias": bias})
            assert r.status_code == 200, (bias, r.text)


# ---- 413 ---------------------------------------------------------------------------------------
def test_body_too_large_by_content_length(server):
    conn = http_client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Authorization", f"Bearer {KEY}")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(64 << 20))  # declared, never sent
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413
    assert json.loads(r.read())["error"]["code"] == "request_too_large"
    conn.close()


def test_body_too_large_streamed(api):
    def chunks():  # chunked transfer encoding: no Content-Length to check up front
        yield b'{"prompt": ["a"'  # strings shorter than the prompt bound: read to 32 MiB
        for _ in range(66):
            yield b', "' + b"a" * (1 << 19) + b'"'
        yield b']}'
    assert_error(api.post("/v1/completions", content=chunks(),
                          headers={"Content-Type": "application/json"}), 413)


def test_huge_prompt_refused_before_parsing(api):
    """A 3 MB prompt (more characters than max_model_len tokens can hold) in a body over 1 MiB
    is refused from the raw bytes, before JSON parsing; a big body without such a string (many
    short prompts; escaped quotes) still parses; chat's message content alike."""
    big = "ab " * (1 << 20)
    for path, body in (("/v1/completions", {**COMPLETION, "prompt": big}),
                       ("/v1/chat/completions",
                        {**CHAT, "messages": [{"role": "user", "content": big}]})):
        err = assert_error(post(api, path, body), 400, contains="string of")
        assert "shorten the prompt" in err["message"]
    # over 1 MiB in all, every string short: parsed, then refused by the request-count limit
    many = {**COMPLETION, "prompt": ['he said \"hi\"'] * 70_000}
    assert_error(post(api, "/v1/completions", many), 400, contains="1024")


def test_huge_prompt_refused_while_it_arrives(server, api):
    """A body declared as 10 MB whose prompt string is already longer than any prompt after its
    first 2 MB is refused then: the 400 comes back while the rest is still unsent, and the
    connection serves the next request once the client sends (and the server drops) the rest."""
    declared, head = 10 << 20, b'{"model": "tiny", "prompt": "'
    conn = http_client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/v1/completions")
    for k, v in {**AUTH, "Content-Type": "application/json",
                 "Content-Length": str(declared)}.items():
        conn.putheader(k, v)
    conn.endheaders()
    conn.send(head + b"a" * ((2 << 20) - len(head)))
    r = conn.getresponse()  # before the other 8 MB exist
    assert r.status == 400
    assert "shorten the prompt" in json.loads(r.read())["error"]["message"]
    conn.close()
    r = post(api, "/v1/completions", COMPLETION)  # the server is unharmed
    assert r.status_code == 200


# ---- nothing breaks the engine -----------------------------------------------------------------
_FIELDS = ["n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
           "repetition_penalty", "seed", "max_tokens", "min_tokens", "stop", "stop_token_ids",
           "ignore_eos", "logprobs", "echo", "stream_options", "model", "prompt", "messages",
           "top_logprobs", "max_completion_tokens", "chat_template_kwargs", "user"]
_VALUES = [None, True, -1, 0, 10 ** 30, -(10 ** 30), 1.5, 1e308, -1e308, "x", "\ud800", [], {},
           [10 ** 30], [-1], ["\ud800"], [[]], {"tokenize": True, "x": "\udfff"}]


def test_no_input_gets_5xx_or_stops_the_engine(server, api):
    cases = [(path, {**base, field: value})
             for path, base in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT))
             for field in _FIELDS for value in _VALUES]

    def send(case):
        path, body = case
        r = post(api, path, body)
        assert r.status_code < 500, (path, body, r.text)
        if r.status_code >= 400:
            assert_error(r, r.status_code)
        return r.status_code

    with ThreadPoolExecutor(8) as pool:  # concurrent: the engine batches the valid ones
        statuses = Counter(pool.map(send, cases))
    assert statuses[400] > 100 and statuses[200] > 10, statuses
    for raw in ('{"prompt": "a\\ud800b", "model": "tiny"}', '{"prompt": "\\udfff"}',
                '{"messages": [{"role": "user", "content": "\\ud83d"}]}'):
        for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
            r = post(api, path, raw)
            assert r.status_code in (400,), (path, raw, r.text)
    r = post(api, "/detokenize", {"tokens": [10 ** 30]})
    assert_error(r, 400)
    # the engine is still alive and serving
    assert api.get("/health").status_code == 200
    r = post(api, "/v1/completions", {**COMPLETION, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_streamed_errors_are_valid_sse(api):
    with api.stream("POST", "/v1/completions",
                     json={**COMPLETION, "stream": True, "max_tokens": 3}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]"
    assert all(ln.startswith("data: ") for ln in lines)


# ---- the engine process dies -------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["restart", "exit"])
def test_engine_death_fails_requests_then_restarts_or_exits(model_dir, mode):
    """SIGKILL of the engine core under load: every request in flight fails (503) at once and
    the cause is logged; then --on-engine-failure restart serves again with a new core, and
    exit stops the server with status 1."""
    srv = ServerProcess([model_dir, "--device", "cpu", "--max-model-len", "512",
                         "--kv-cache-memory", str(8 << 20), "--served-model-name", "tiny",
                         "--on-engine-failure", mode])
    try:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0,
                               timeout=30)
        started = threading.Barrier(5)
        errors: list = [None] * 5

        def stream_one(i: int) -> None:
            try:
                s = client.completions.create(model="tiny", prompt=f"Hello {i}", max_tokens=500,
                                              stream=True, extra_body={"ignore_eos": True})
                for k, _ in enumerate(s):
                    if k == 0:
                        started.wait(timeout=30)
                errors[i] = "finished"
            except Exception as e:  # noqa: BLE001 - any error is the expected outcome
                errors[i] = e

        def blocking_one() -> None:
            try:
                client.completions.create(model="tiny", prompt="Hi", max_tokens=500,
                                          extra_body={"ignore_eos": True})
                errors[4] = "finished"
            except Exception as e:  # noqa: BLE001
                errors[4] = e

        threads = [threading.Thread(target=stream_one, args=(i,)) for i in range(4)]
        threads.append(threading.Thread(target=blocking_one))
        for t in threads:
            t.start()
        started.wait(timeout=30)  # every stream has its first chunk
        dead_pid = srv.core_pid()
        os.kill(dead_pid, signal.SIGKILL)
        t0 = time.monotonic()
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads), "a request hung after the engine died"
        assert time.monotonic() - t0 < 15
        assert all(isinstance(e, Exception) for e in errors), errors
        assert isinstance(errors[4], openai.APIStatusError) and errors[4].status_code == 503
        if mode == "exit":
            assert srv.proc.wait(timeout=30) == 1
        else:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if httpx.get(srv.base_url + "/health", timeout=10).status_code == 200:
                    break
                time.sleep(0.2)
            assert srv.core_pid() != dead_pid
            out = client.completions.create(model="tiny", prompt="Hi", max_tokens=2)
            assert out.choices[0].text is not None
            assert httpx.get(srv.base_url + "/metrics", timeout=10).status_code == 200
    finally:
        log = srv.close()
    assert "died (killed by signal 9)" in log, log
    assert ("engine core restarted" in log) == (mode == "restart"), log


def test_sigterm_ends_requests_in_flight_with_openai_errors(model_dir):
    """SIGTERM with long requests running: within --shutdown-timeout each gets an error in
    OpenAI's shape (a JSON 503; a stream's error event, then [DONE]), and the server exits."""
    srv = ServerProcess([model_dir, "--device", "cpu", "--max-model-len", "512",
                         "--kv-cache-memory", str(8 << 20), "--served-model-name", "tiny",
                         "--max-num-seqs", "1", "--shutdown-timeout", "2"])
    try:
        long = {**COMPLETION, "n": 16, "max_tokens": 500, "ignore_eos": True}
        with httpx.Client(base_url=srv.base_url, timeout=60) as c, ThreadPoolExecutor(2) as pool:
            def stream():
                with c.stream("POST", "/v1/completions", json={**long, "stream": True}) as s:
                    return s.status_code, [line for line in s.iter_lines() if line]
            plain = pool.submit(c.post, "/v1/completions", json=long)
            streamed = pool.submit(stream)
            time.sleep(1.0)  # both running (32 sequences one at a time: many seconds of work)
            t0 = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            r = plain.result(timeout=30)
            status, lines = streamed.result(timeout=30)
        assert time.monotonic() - t0 < 6
        err = assert_error(r, 503, contains="shutting down")
        assert err["code"] == "server_shutting_down"
        assert status == 200 and lines[-1] == "data: [DONE]"
        last = json.loads(lines[-2][len("data: "):])
        assert last["error"]["code"] == "server_shutting_down"
        # uvicorn re-raises the signal once shut down: the exit status says "terminated"
        assert srv.proc.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        log = srv.close()
    assert "Traceback" not in log, log
