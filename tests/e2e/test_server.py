"""`servelm serve` end to end through the official openai client: completions and chat,
streaming and not, n > 1, logprobs, stop strings, seeds, usage, prefix-cache accounting,
64 concurrent streams with client cut-offs (then nothing left running or held in the KV
cache), /tokenize, /metrics, the --config YAML layering, and `servelm chat`.

One tiny random Llama (with a real byte-level BPE tokenizer) serves most tests; one smoke test
runs the embedded SmolLM2-135M-Instruct."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter

import openai
import pytest

from tests.e2e.server_utils import ServerProcess, httpx, make_tiny_model

MAX_MODEL_LEN = 256
PROMPT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny-server-model")))


@pytest.fixture(scope="module")
def server(model_dir):
    srv = ServerProcess([model_dir, "--device", "cpu", "--max-model-len", str(MAX_MODEL_LEN),
                         "--kv-cache-memory", str(8 << 20), "--served-model-name", "tiny",
                         "tiny-alias"])
    yield srv
    log = srv.close()
    assert "Traceback" not in log and "never retrieved" not in log, log


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0,
                         timeout=60)


def greedy(**kw):
    return dict(model="tiny", temperature=0, extra_body={"ignore_eos": True}, **kw)


def scrape(server) -> dict[str, float]:
    """/metrics as {'name{labels}' or 'name': value} (labels other than model_name kept)."""
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = {k: v for k, v in s.labels.items() if k != "model_name"}
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"
                            if labels else "")
            out[key] = s.value
    return out


# ---- basics ------------------------------------------------------------------------------------
def test_models_health_version(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny-alias"]
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert httpx.get(server.base_url + "/version").json()["version"]


def test_completion_shape_and_usage(client):
    r = client.completions.create(prompt=PROMPT, max_tokens=8, **greedy())
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == "tiny"
    assert r.created > 0
    (c,) = r.choices
    assert c.index == 0 and c.finish_reason == "length" and isinstance(c.text, str)
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    assert r.usage.prompt_tokens_details.cached_tokens >= 0
    # the alias is served too
    assert client.completions.create(prompt=PROMPT, max_tokens=1,
                                     **{**greedy(), "model": "tiny-alias"})


def test_completion_prompt_forms(server, client):
    ids = httpx.post(server.base_url + "/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    by_text = client.completions.create(prompt=PROMPT, max_tokens=6, **greedy())
    by_ids = client.completions.create(prompt=ids, max_tokens=6, **greedy())
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)
    r = client.completions.create(prompt=[ids, ids[:5]], max_tokens=4, **greedy())
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == client.completions.create(prompt=ids, max_tokens=4,
                                                          **greedy()).choices[0].text
    r = client.completions.create(prompt=["Hello world", "Once upon a time"], n=2, max_tokens=3,
                                  model="tiny", seed=5, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 12
    echo = client.completions.create(prompt="Hello world", echo=True, max_tokens=3, **greedy())
    assert echo.choices[0].text.startswith("Hello world")


def test_completion_logprobs(client):
    r = client.completions.create(prompt=PROMPT, max_tokens=6, logprobs=3, **greedy())
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert val <= 0 and len(top) >= 3 - 1  # distinct ids can decode to the same string
        assert abs(max(top.values()) - val) < 1e-5  # greedy: the chosen token is the best
    assert lp.text_offset == sorted(lp.text_offset)
    echo = client.completions.create(prompt=PROMPT, max_tokens=2, logprobs=1, echo=True, **greedy())
    lp = echo.choices[0].logprobs
    assert lp.token_logprobs[0] is None and all(x is not None for x in lp.token_logprobs[1:])
    assert len(lp.tokens) == echo.usage.prompt_tokens + 2


def test_chat_shape_and_logprobs(client):
    r = client.chat.completions.create(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_completion_tokens=6, logprobs=True, top_logprobs=2, **greedy())
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    (c,) = r.choices
    assert c.message.role == "assistant" and c.finish_reason == "length"
    assert len(c.logprobs.content) == 6 == r.usage.completion_tokens
    for item in c.logprobs.content:
        assert len(item.top_logprobs) == 2 and item.logprob <= 0
    # content given as text parts is the same conversation
    parts = client.chat.completions.create(
        messages=[{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                  {"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
        max_completion_tokens=6, **greedy())
    assert parts.choices[0].message.content == c.message.content


# ---- streaming ---------------------------------------------------------------------------------
def test_streaming_equals_non_streaming(client):
    full = client.completions.create(prompt=PROMPT, max_tokens=12, **greedy())
    chunks = list(client.completions.create(prompt=PROMPT, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, **greedy()))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    msgs = [{"role": "user", "content": "Tell me a story"}]
    full = client.chat.completions.create(messages=msgs, max_tokens=12, **greedy())
    chunks = list(client.chat.completions.create(messages=msgs, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True},
                                                 **greedy()))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) \
        == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens > 0
    # without include_usage no usage chunk
    chunks = list(client.chat.completions.create(messages=msgs, max_tokens=3, stream=True,
                                                 **greedy()))
    assert all(c.choices for c in chunks)


def test_stream_n_and_multi_prompt(client):
    chunks = list(client.completions.create(prompt=["Hello world", "Once upon"], n=2, max_tokens=5,
                                            stream=True, seed=1, model="tiny",
                                            extra_body={"ignore_eos": True}))
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1, 2, 3}


# ---- sampling ----------------------------------------------------------------------------------
def _stop_candidate(text: str) -> str:
    """A 2-character substring of ``text`` first occurring after its start (no U+FFFD)."""
    for k in range(2, len(text) - 2):
        s = text[k:k + 2]
        if "\ufffd" not in s and s.strip() and text.find(s) == k:
            return s
    pytest.skip("generated text has no usable stop string")


def test_stop_strings(client):
    base = client.completions.create(prompt=PROMPT, max_tokens=40, **greedy()).choices[0].text
    stop = _stop_candidate(base)
    r = client.completions.create(prompt=PROMPT, max_tokens=40, stop=stop, **greedy())
    (c,) = r.choices
    assert c.text == base[:base.find(stop)] and c.finish_reason == "stop"
    assert c.model_extra.get("stop_reason") == stop
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        prompt=PROMPT, max_tokens=40, stop=[stop, "\x00never"], stream=True, **greedy()))
    assert streamed == c.text  # the held-back start of a stop string is never sent
    incl = client.completions.create(
        prompt=PROMPT, max_tokens=40, model="tiny", temperature=0, stop=stop,
        extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert incl.choices[0].text == base[:base.find(stop) + len(stop)]
    # n > 1 with a stop string: every sample ends at its own first stop (or the length)
    r = client.completions.create(prompt=PROMPT, max_tokens=30, n=3, seed=3, stop=[" "],
                                  model="tiny", extra_body={"ignore_eos": True})
    for c in r.choices:
        assert " " not in c.text and c.finish_reason in ("stop", "length")


def test_seed_reproducible(client):
    kw = dict(prompt=PROMPT, max_tokens=16, temperature=1.0, model="tiny",
              extra_body={"ignore_eos": True})
    a = client.completions.create(seed=1234, **kw).choices[0].text
    b = client.completions.create(seed=1234, **kw).choices[0].text
    assert a == b
    others = {client.completions.create(seed=s, **kw).choices[0].text for s in (1, 2, 3)}
    assert others - {a}
    # streaming with a seed gives the same text as the non-streaming call
    assert "".join(c.choices[0].text for c in client.completions.create(
        seed=1234, stream=True, **kw)) == a


def test_chat_n_and_sampling_fields(client):
    r = client.chat.completions.create(
        messages=[{"role": "user", "content": "Hi"}], n=3, seed=7, max_completion_tokens=5,
        temperature=0.8, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5, model="tiny",
        extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1, "ignore_eos": True,
                    "min_tokens": 5, "stop_token_ids": [2]})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 15
    assert len({c.message.content for c in r.choices}) > 1


# ---- logit_bias ----------------------------------------------------------------------------------
# The tokens are read from logprobs (each token decoded alone, as the server shows it there):
# a lone byte of a multi-byte character has no text of its own in the output.
@pytest.fixture(scope="module")
def token_strs(model_dir) -> list[str]:
    """Each token id decoded alone, as logprobs show it."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    return [tok.decode([i]) for i in range(len(tok))]


def _ids_of(token_strs: list[str], s: str) -> dict[str, float]:
    """A -100 bias on every token that shows as ``s`` (then none of them can come first)."""
    ids = [i for i, t in enumerate(token_strs) if t == s]
    assert 1 <= len(ids) <= 300, (s, ids)
    return {str(i): -100 for i in ids}


def _forced(token_strs: list[str], avoid: str) -> tuple[int, str]:
    """A token other than ``avoid`` with printable text no other token has (a BPE merge)."""
    counts = Counter(token_strs)
    for i in range(len(token_strs) - 1, -1, -1):  # merges come last in a BPE vocabulary
        s = token_strs[i]
        if len(s.strip()) >= 2 and s.isascii() and s.isprintable() and counts[s] == 1 \
                and s != avoid and s not in ("<s>", "</s>", "<pad>"):
            return i, s
    pytest.fail("no token to force")


def test_logit_bias_completions(server, client, token_strs):
    ids = httpx.post(server.base_url + "/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    for prompt in (PROMPT, ids):
        base = client.completions.create(prompt=prompt, max_tokens=4, logprobs=0, **greedy())
        first = base.choices[0].logprobs.tokens[0]
        # -100 on the greedy first token: another token comes first
        r = client.completions.create(prompt=prompt, max_tokens=1, logprobs=0,
                                      **greedy(logit_bias=_ids_of(token_strs, first)))
        assert r.choices[0].logprobs.tokens[0] != first
        # +100 on another token: every token is that one
        u, s = _forced(token_strs, avoid=first)
        r = client.completions.create(prompt=prompt, max_tokens=4, logprobs=0,
                                      **greedy(logit_bias={str(u): 100}))
        (c,) = r.choices
        assert c.logprobs.tokens == [s] * 4 and c.text == s * 4 and c.finish_reason == "length"
        # -100 on a token that is not the greedy one changes nothing first
        r = client.completions.create(prompt=prompt, max_tokens=1, logprobs=0,
                                      **greedy(logit_bias={str(u): -100}))
        assert r.choices[0].logprobs.tokens[0] == first
    # sampled (n > 1, seeded) and several prompts: the bias holds for every sample
    r = client.completions.create(prompt=[ids, ids[:3]], n=2, max_tokens=3, temperature=1.0,
                                  seed=11, model="tiny", logit_bias={str(u): 100},
                                  extra_body={"ignore_eos": True})
    assert [c.text for c in r.choices] == [s * 3] * 4


def test_logit_bias_is_per_request(server, token_strs):
    """Biased and unbiased requests batched together: each gets only its own bias."""
    async def run() -> tuple[list[str], list[str], str, str]:
        aclient = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused",
                                     max_retries=0, timeout=60)
        try:
            base = await aclient.completions.create(prompt=PROMPT, max_tokens=4, **greedy())
            u, s = _forced(token_strs, avoid="")
            plain = [aclient.completions.create(prompt=PROMPT, max_tokens=4, **greedy())
                     for _ in range(4)]
            forced = [aclient.completions.create(prompt=PROMPT, max_tokens=4,
                                                 **greedy(logit_bias={str(u): 100}))
                      for _ in range(4)]
            rs = await asyncio.gather(*(x for pair in zip(plain, forced) for x in pair))
            texts = [r.choices[0].text for r in rs]
            return texts[0::2], texts[1::2], base.choices[0].text, s
        finally:
            await aclient.close()

    plain, forced, base, s = asyncio.run(run())
    assert base != s * 4 and plain == [base] * 4 and forced == [s * 4] * 4


def test_logit_bias_chat(client, token_strs):
    msgs = [{"role": "user", "content": "Hello"}]
    base = client.chat.completions.create(messages=msgs, max_completion_tokens=1, logprobs=True,
                                          **greedy())
    first = base.choices[0].logprobs.content[0].token
    r = client.chat.completions.create(messages=msgs, max_completion_tokens=1, logprobs=True,
                                       **greedy(logit_bias=_ids_of(token_strs, first)))
    assert r.choices[0].logprobs.content[0].token != first
    u, s = _forced(token_strs, avoid=first)
    r = client.chat.completions.create(messages=msgs, max_completion_tokens=3, logprobs=True,
                                       **greedy(logit_bias={str(u): 100.0}))
    (c,) = r.choices
    assert [x.token for x in c.logprobs.content] == [s] * 3 and c.message.content == s * 3
    # streamed, with a float bias: the same tokens
    chunks = client.chat.completions.create(messages=msgs, max_completion_tokens=3, stream=True,
                                            **greedy(logit_bias={str(u): 99.5}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == s * 3


def test_prefix_cache_reported(client):
    long_prompt = PROMPT * 4  # several full KV blocks
    client.completions.create(prompt=long_prompt, max_tokens=1, **greedy())
    r = client.completions.create(prompt=long_prompt, max_tokens=1, **greedy())
    assert r.usage.prompt_tokens_details.cached_tokens >= 16


def test_tokenize_detokenize(server):
    url = server.base_url
    t = httpx.post(url + "/tokenize",
                   json={"prompt": "Hello world!", "return_token_strs": True}).json()
    assert t["count"] == len(t["tokens"]) > 0 and t["max_model_len"] == MAX_MODEL_LEN
    assert len(t["token_strs"]) == t["count"]
    back = httpx.post(url + "/detokenize", json={"tokens": t["tokens"]}).json()
    assert back["prompt"] == "Hello world!"
    chat = httpx.post(url + "/tokenize",
                      json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > 0


# ---- load and cancellation ---------------------------------------------------------------------
def test_concurrent_streams_with_cutoffs_free_everything(server):
    async def run() -> list:
        aclient = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused",
                                     max_retries=0, timeout=120)

        async def one(i: int):
            cut = i % 4 == 0  # a quarter of the clients walk away mid-stream
            stream = await aclient.completions.create(
                prompt=f"{PROMPT} {i}", max_tokens=200 if cut else 32, stream=True, model="tiny",
                temperature=1.0, seed=i, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True})
            n = 0
            async for chunk in stream:
                n += 1
                if cut and n == 2:
                    await stream.close()
                    return None
                if not chunk.choices:
                    return chunk.usage.completion_tokens
            return -1

        async def impatient(i: int) -> None:  # a non-streaming client that gives up
            # after its request reached the engine (0.1 s was sometimes too short for that on
            # a loaded 2-core machine: 68 prompts queue for one tokenizer thread) and long
            # before its 200 tokens are done
            with pytest.raises(openai.APITimeoutError):
                await aclient.with_options(timeout=0.5).completions.create(
                    prompt=f"{PROMPT} {i}", max_tokens=200, model="tiny",
                    extra_body={"ignore_eos": True})

        try:
            results = await asyncio.gather(*(one(i) for i in range(64)),
                                           *(impatient(i) for i in range(4)))
            return results[:64]
        finally:
            await aclient.close()

    before = scrape(server).get("servelm:request_success_total{finished_reason=abort}", 0)
    results = asyncio.run(run())
    assert [r for i, r in enumerate(results) if i % 4] == [32] * 48
    deadline = time.monotonic() + 15
    while True:
        m = scrape(server)
        idle = (m["servelm:num_requests_running"] == 0 and m["servelm:num_requests_waiting"] == 0
                and m["servelm:kv_cache_usage_perc"] == 0)
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert idle, m
    assert m["servelm:request_success_total{finished_reason=abort}"] - before >= 16 + 4


def test_metrics_names(server, client):
    client.completions.create(prompt=PROMPT, max_tokens=3, **greedy())
    m = scrape(server)
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "prompt_tokens_total", "generation_tokens_total", "num_preemptions_total",
                 "prefix_cache_queries_total", "prefix_cache_hits_total",
                 "time_to_first_token_seconds_count", "inter_token_latency_seconds_count",
                 "e2e_request_latency_seconds_count"):
        assert f"servelm:{name}" in m, name
    assert m["servelm:request_success_total{finished_reason=length}"] >= 1
    assert m["servelm:generation_tokens_total"] >= 3 and m["servelm:prompt_tokens_total"] > 0
    assert m["servelm:time_to_first_token_seconds_count"] >= 1


# ---- CLI ---------------------------------------------------------------------------------------
def test_serve_config_yaml_layering(tmp_path):
    from servelm.cli import build_parser
    from servelm.server.cli import resolve_serve_args
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("max-model-len: 128\nport: 9001\nmax_num_seqs: 4\napi-key: k\n")
    args = build_parser().parse_args(["serve", "m", "--config", str(cfg), "--port", "9002"])
    ns = resolve_serve_args(args)
    assert (ns.model, ns.max_model_len, ns.port, ns.max_num_seqs, ns.api_key) == \
        ("m", 128, 9002, 4, "k")
    assert ns.host == "127.0.0.1" and ns.enable_prefix_caching is True
    cfg.write_text("no-such-flag: 1\n")
    with pytest.raises(ValueError, match="unknown key"):
        resolve_serve_args(build_parser().parse_args(["serve", "--config", str(cfg)]))


def _chat_cli(args: list[str], stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "servelm.cli", "chat", *args], input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_chat_cli_with_url(server):
    p = _chat_cli(["--url", server.base_url, "--max-tokens", "4", "--temperature", "0"],
                  "Hello\n/clear\nAgain\n")  # EOF after the last line exits cleanly
    assert p.returncode == 0, p.stderr
    assert len([ln for ln in p.stdout.splitlines()]) == 2
    assert "conversation cleared" in p.stderr


def test_chat_cli_in_process(model_dir):
    p = _chat_cli([model_dir, "--device", "cpu", "--max-model-len", "128", "--kv-cache-memory",
                   str(1 << 22), "--max-tokens", "4"], "Hello\nMore\n/exit\nnot read\n")
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.splitlines()) == 2


# ---- the real default model --------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_server():
    try:
        from servelm.loader import default_model_path
        default_model_path()
    except ValueError as e:
        pytest.skip(str(e))
    srv = ServerProcess(["--device", "cpu", "--max-model-len", "512", "--kv-cache-memory",
                         str(64 << 20)], startup_timeout_s=300)
    yield srv
    srv.close()


def test_smollm2_smoke(smollm2_server):
    c = openai.OpenAI(base_url=smollm2_server.base_url + "/v1", api_key="x", max_retries=0,
                      timeout=120)
    (model,) = [m.id for m in c.models.list().data]
    assert model == "SmolLM2-135M-Instruct"
    r = c.chat.completions.create(model=model, messages=[
        {"role": "user", "content": "What is the capital of France? Answer in one word."}],
        max_completion_tokens=8, temperature=0)
    assert "paris" in r.choices[0].message.content.lower()
    text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8,
        temperature=0, stream=True))
    assert text.strip()
