"""`servelm serve --cascade SMALL LARGE`: one name in /v1/models, every request answered by the
small model or escalated to the large one by the threshold, a header naming which, usage
counting both models' tokens, the escalation counters in /metrics, and a dead core restarted."""
from __future__ import annotations

import json

import pytest

from tests.e2e.server_utils import ServerProcess, httpx, make_tiny_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return (make_tiny_model(str(tmp_path_factory.mktemp("small"))),
            make_tiny_model(str(tmp_path_factory.mktemp("large"))))


@pytest.mark.parametrize("threshold,answered", [(0.0, "small"), (1.01, "large")])
def test_cascade_server(models, threshold, answered):
    small, large = models
    srv = ServerProcess(["--cascade", small, large, "--cascade-threshold", str(threshold),
                         "--device", "cpu", "--max-model-len", "256", "--kv-cache-memory",
                         str(8 << 20)])
    try:
        url = srv.base_url
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["cascade"]
        body = {"model": "cascade", "prompt": "Hello world", "max_tokens": 5,
                "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.headers["x-servelm-cascade-model"] == answered
        out = r.json()
        assert out["model"] == "cascade" and out["choices"][0]["logprobs"] is None
        n_prompt = len(httpx.post(f"{url}/tokenize", json={"prompt": "Hello world"}
                                  ).json()["tokens"])
        times = 2 if answered == "large" else 1  # both models' tokens when escalated
        assert out["usage"]["prompt_tokens"] == times * n_prompt
        assert out["usage"]["completion_tokens"] == times * 5
        # a stream: the header with the first bytes, then the whole answer and [DONE]
        chat = {"model": "cascade", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4, "temperature": 0, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=chat, timeout=60) as s:
            assert s.status_code == 200
            assert s.headers["x-servelm-cascade-model"] == answered
            lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        text = "".join(json.loads(ln[6:])["choices"][0]["delta"].get("content") or ""
                       for ln in lines[:-1] if json.loads(ln[6:])["choices"])
        # the whole answer came through: what the same request gets without streaming
        whole = httpx.post(f"{url}/v1/chat/completions", json={**chat, "stream": False},
                           timeout=60)
        assert whole.headers["x-servelm-cascade-model"] == answered
        assert text == whole.json()["choices"][0]["message"]["content"]
        # n > 1 cannot cascade
        r = httpx.post(f"{url}/v1/completions", json={**body, "n": 2}, timeout=60)
        assert r.status_code == 400 and "n must be 1" in r.text
        metrics = httpx.get(f"{url}/metrics").text
        escalated = 3 if answered == "large" else 0
        assert 'servelm:cascade_requests_total{model_name="cascade"} 3.0' in metrics
        assert (f'servelm:cascade_escalations_total{{model_name="cascade"}} {escalated}.0'
                in metrics)
        assert (f'servelm:cascade_request_latency_seconds_count{{model_name="cascade",'
                f'path="{answered}"}} 3.0' in metrics)
        if answered == "large":
            _kill_a_core_then_serve(srv, body)
    finally:
        srv.close()


def _kill_a_core_then_serve(srv: ServerProcess, body: dict) -> None:
    """SIGKILL of either core: requests in flight fail (503), the dead core is restarted while
    the other keeps its state, and the cascade serves again."""
    import os
    import signal
    import time
    url = srv.base_url
    pids = srv.core_pids()
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)
    deadline, r = time.monotonic() + 120, None
    while time.monotonic() < deadline and (r is None or r.status_code != 200):
        time.sleep(0.5)
        try:
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        except httpx.HTTPError:
            r = None
    assert r is not None and r.status_code == 200, srv.output()[-2000:]
    assert r.headers["x-servelm-cascade-model"] == "large"
    assert pids[1] in srv.core_pids() and pids[0] not in srv.core_pids()



@pytest.mark.parametrize("argv,match", [
    (["--cascade-threshold", "0.3"], "need --cascade"),
    (["--cascade-name", "c"], "need --cascade"),
    (["m", "--cascade", "a", "b"], "give no model argument"),
])
def test_cascade_flags_refused_without_a_cascade(argv, match):
    from servelm.cli import build_parser
    from servelm.server.cli import main_serve
    with pytest.raises(ValueError, match=match):
        main_serve(build_parser().parse_args(["serve", *argv]))
