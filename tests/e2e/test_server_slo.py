"""`servelm serve --scheduling-policy slo`: a request whose time-to-first-token objective can no
longer be met is shed with HTTP 503, a Retry-After header and error code slo_unattainable (a
stream too, before it starts); requests whose objectives are reachable are served; the server
defaults apply to requests that set none."""
from __future__ import annotations

import json

import pytest

from tests.e2e.server_utils import ServerProcess, httpx, make_tiny_model

COMPLETION = {"model": "tiny", "prompt": "Hello world", "max_tokens": 4}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    model_dir = make_tiny_model(str(tmp_path_factory.mktemp("tiny-slo-model")))
    srv = ServerProcess([model_dir, "--device", "cpu", "--max-model-len", "256",
                         "--kv-cache-memory", str(8 << 20), "--served-model-name", "tiny",
                         "--scheduling-policy", "slo", "--default-ttft-slo-ms", "60000",
                         "--default-tpot-slo-ms", "10000"])
    with httpx.Client(base_url=srv.base_url, timeout=60) as c:
        # a few dozen steps teach the scheduler what a step costs on this machine
        r = c.post("/v1/completions", json={**COMPLETION, "max_tokens": 24, "ignore_eos": True})
        assert r.status_code == 200, r.text
        yield c
    log = srv.close()
    assert "Traceback" not in log, log


def _assert_shed(r) -> None:
    assert r.status_code == 503, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["code"] == "slo_unattainable" and err["type"] == "service_unavailable"
    assert int(r.headers["Retry-After"]) >= 1


@pytest.mark.parametrize("path,body", [("/v1/completions", COMPLETION),
                                       ("/v1/chat/completions", CHAT)])
@pytest.mark.parametrize("stream", [False, True])
def test_unattainable_ttft_is_shed_with_503(api, path, body, stream):
    # a microsecond to the first token: no step is that fast
    _assert_shed(api.post(path, json={**body, "stream": stream, "ttft_slo_ms": 0.001}))


@pytest.mark.parametrize("stream", [False, True])
def test_reachable_objectives_are_served(api, stream):
    r = api.post("/v1/completions", json={**COMPLETION, "stream": stream, "ttft_slo_ms": 30000,
                                          "tpot_slo_ms": 5000})
    assert r.status_code == 200, r.text
    if stream:
        chunks = [json.loads(line[6:]) for line in r.text.splitlines()
                  if line.startswith("data: {")]
        assert chunks and chunks[-1]["choices"][0]["finish_reason"] == "length"
    else:
        assert r.json()["choices"][0]["finish_reason"] == "length"


def test_several_prompts_one_shed_fails_the_request(api):
    r = api.post("/v1/completions", json={**COMPLETION, "prompt": ["a b", "c d"],
                                          "ttft_slo_ms": 0.001})
    _assert_shed(r)
    # the server goes on serving
    assert api.post("/v1/completions", json=COMPLETION).status_code == 200
