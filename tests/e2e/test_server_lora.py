"""LoRA adapters through the OpenAI server: --lora-modules at start, a request picks an adapter
by its model name (404 for an unknown one), /v1/models lists them, /v1/load_lora_adapter and
/v1/unload_lora_adapter at run time (a bad adapter is a 400 and the server keeps serving;
unloading lets running requests finish; a name re-loaded with new weights never serves KV
cached under the old ones). Outputs equal transformers with the adapter merged."""
from __future__ import annotations

import json
import threading

import pytest
import torch

from tests.e2e.server_utils import ServerProcess, httpx, make_tiny_model
from tests.e2e.test_engine_vs_hf import hf_greedy
from tests.lora_utils import merged_model, write_adapter

PROMPT = "Hello world! How are you"
MAX_NEW = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import transformers as tf
    d = make_tiny_model(str(tmp_path_factory.mktemp("lora-server-model")))
    tok = tf.AutoTokenizer.from_pretrained(d)
    base = tf.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    root = tmp_path_factory.mktemp("lora-server-adapters")
    paths = {n: write_adapter(str(root / n), base, rank=r, seed=s)
             for n, r, s in (("a1", 8, 1), ("a2", 4, 2), ("a3", 8, 3))}
    paths["big"] = write_adapter(str(root / "big"), base, rank=32, seed=4)
    ids = tok(PROMPT)["input_ids"]

    def expect(name):  # greedy text of the base (None) or an adapter, merged
        m = base if name is None else merged_model(base, paths[name])
        # (a trailing incomplete UTF-8 character is not sent: the server holds it back)
        return tok.decode(hf_greedy(m, ids, MAX_NEW)[0]).rstrip("\ufffd")
    srv = ServerProcess(["--model", d, "--device", "cpu", "--dtype", "float32", "--max-model-len", "256",
                         "--kv-cache-memory", str(8 << 20), "--served-model-name", "tiny",
                         "--enable-lora", "--max-loras", "2", "--max-lora-rank", "16",
                         "--lora-modules", f"a1={paths['a1']}"])
    try:
        with httpx.Client(base_url=srv.base_url, timeout=60) as api:
            yield api, paths, expect
    finally:
        srv.close()


def _complete(api, model, max_tokens=MAX_NEW, prompt=PROMPT):
    return api.post("/v1/completions", json={"model": model, "prompt": prompt,
                                             "max_tokens": max_tokens, "temperature": 0,
                                             "ignore_eos": True})


def test_adapters_by_model_name(setup):
    api, paths, expect = setup
    models = api.get("/v1/models").json()["data"]
    assert [(m["id"], m["parent"]) for m in models] == [("tiny", None), ("a1", "tiny")]
    assert all(paths["a1"] not in str(m) for m in models)  # no paths of this machine
    base, a1 = _complete(api, "tiny"), _complete(api, "a1")
    assert base.status_code == a1.status_code == 200
    assert base.json()["choices"][0]["text"] == expect(None)
    assert a1.json()["choices"][0]["text"] == expect("a1")
    assert a1.json()["model"] == "a1"
    chat = api.post("/v1/chat/completions", json={
        "model": "a1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert chat.status_code == 200
    r = _complete(api, "nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    metrics = api.get("/metrics").text
    assert 'servelm:lora_requests_info{max_lora="2"' in metrics


def test_load_and_unload_at_run_time(setup):
    api, paths, expect = setup
    load = lambda n, p: api.post("/v1/load_lora_adapter",  # noqa: E731
                                 json={"lora_name": n, "lora_path": p})
    unload = lambda n: api.post("/v1/unload_lora_adapter", json={"lora_name": n})  # noqa: E731
    assert _complete(api, "a2").status_code == 404
    r = load("a2", paths["a2"])
    assert r.status_code == 200 and "a2" in r.text
    assert _complete(api, "a2").json()["choices"][0]["text"] == expect("a2")
    assert "a2" in [m["id"] for m in api.get("/v1/models").json()["data"]]
    for name, path, what in (("a2", paths["a3"], "already been loaded"),
                             ("tiny", paths["a3"], "already been loaded"),
                             ("b", paths["big"], "max_lora_rank"),
                             ("c", "/nonexistent/adapter", "does not exist")):
        r = load(name, path)
        assert r.status_code == 400 and what in r.json()["error"]["message"], r.text
    r = api.post("/v1/load_lora_adapter", json={"lora_name": "d"})
    assert r.status_code == 400
    r = load("n" * 257, paths["a3"])  # names are bounded
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name", r.text
    # still serving, the refused names unknown
    assert _complete(api, "a1").json()["choices"][0]["text"] == expect("a1")
    assert _complete(api, "b").status_code == 404
    assert unload("a2").status_code == 200
    assert _complete(api, "a2").status_code == 404
    assert unload("a2").status_code == 404
    # the same name with other weights: a3's output, not KV cached under a2
    assert load("a2", paths["a3"]).status_code == 200
    assert _complete(api, "a2").json()["choices"][0]["text"] == expect("a3")
    assert unload("a2").status_code == 200


def test_unload_while_running_lets_requests_finish(setup):
    """A stream of the adapter is running (its first chunk arrived) when the adapter is
    unloaded: it still finishes with all its tokens; new requests for it are 404s."""
    api, paths, _ = setup
    assert api.post("/v1/load_lora_adapter",
                    json={"lora_name": "run", "lora_path": paths["a2"]}).status_code == 200
    started, result = threading.Event(), {}

    def long_stream():
        tokens = 0
        with api.stream("POST", "/v1/completions", json={
                "model": "run", "prompt": PROMPT, "max_tokens": 150, "temperature": 0,
                "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}) as r:
            result["status"] = r.status_code
            for line in r.iter_lines():
                started.set()
                if line.startswith("data: {"):
                    usage = json.loads(line[6:]).get("usage")
                    tokens = usage["completion_tokens"] if usage else tokens
        result["tokens"] = tokens
        started.set()
    t = threading.Thread(target=long_stream)
    t.start()
    assert started.wait(60)
    assert api.post("/v1/unload_lora_adapter", json={"lora_name": "run"}).status_code == 200
    assert _complete(api, "run").status_code == 404
    t.join(60)
    assert result == {"status": 200, "tokens": 150}
    assert _complete(api, "a1").status_code == 200


def test_concurrent_mixed_adapters_stream_exact(setup):
    """24 concurrent streams over the base and two adapters (n=2 each) batch together; every
    stream's text is its model's greedy output."""
    import asyncio
    api, paths, expect = setup
    assert api.post("/v1/load_lora_adapter",
                    json={"lora_name": "mix", "lora_path": paths["a3"]}).status_code == 200
    want = {m: expect(e) for m, e in (("tiny", None), ("a1", "a1"), ("mix", "a3"))}

    async def run():
        async with httpx.AsyncClient(base_url=str(api.base_url), timeout=60) as c:
            async def one(model):
                text = ["", ""]
                async with c.stream("POST", "/v1/completions", json={
                        "model": model, "prompt": PROMPT, "max_tokens": MAX_NEW, "n": 2,
                        "temperature": 0, "ignore_eos": True, "stream": True}) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            for ch in json.loads(line[6:])["choices"]:
                                text[ch["index"]] += ch["text"]
                return model, text
            return await asyncio.gather(*(one(m) for m in ["tiny", "a1", "mix"] * 8))
    for model, texts in asyncio.run(run()):
        assert texts == [want[model]] * 2, model
    assert api.post("/v1/unload_lora_adapter", json={"lora_name": "mix"}).status_code == 200
