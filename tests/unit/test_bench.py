"""`servelm bench serve`: datasets, metrics, and the client against a fake streaming server."""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import socket
import threading
from dataclasses import dataclass, field

import numpy as np
import pytest

from servelm.bench.datasets import (
    BenchRequest, build_requests, jsonl_requests, random_requests, sharegpt_like_requests)
from servelm.bench.metrics import (
    GoodputSLO, RequestRecord, compute_summary, format_table, output_throughput_timeline,
    peak_concurrency)
from servelm.bench.serve import (
    ServeBenchConfig, add_serve_args, arrival_offsets, main_serve, run_benchmark)

web = pytest.importorskip("aiohttp.web")


class WordTokenizer:
    """Token i <-> word "w{i}"; ids 0 and 1 are special."""

    all_special_ids = [0, 1]

    def __len__(self) -> int:
        return 50

    def encode(self, text: str) -> list[int]:
        return [int(w[1:]) for w in text.split()]

    def decode(self, token_ids: list[int]) -> str:
        return " ".join(f"w{i}" for i in token_ids)


# ---------------------------------------------------------------- datasets

def test_random_is_seeded_and_sized():
    a = random_requests(20, input_len=32, output_len=8, seed=3, vocab_size=1000)
    assert a == random_requests(20, input_len=32, output_len=8, seed=3, vocab_size=1000)
    assert a != random_requests(20, input_len=32, output_len=8, seed=4, vocab_size=1000)
    for r in a:
        assert isinstance(r.prompt, list) and len(r.prompt) == r.prompt_len == 32
        assert all(0 <= t < 1000 for t in r.prompt) and r.output_len == 8


def test_random_range_ratio_bounds():
    reqs = random_requests(300, input_len=100, output_len=10, range_ratio=0.5, seed=0)
    ins, outs = [r.prompt_len for r in reqs], [r.output_len for r in reqs]
    assert 50 <= min(ins) < 60 and 140 < max(ins) <= 150
    assert 5 <= min(outs) and max(outs) <= 15
    with pytest.raises(ValueError, match="range-ratio"):
        random_requests(1, 10, 10, range_ratio=1.0)


def test_random_with_tokenizer_gives_text_and_skips_special_ids():
    reqs = random_requests(10, input_len=40, output_len=4, seed=0, tokenizer=WordTokenizer())
    tok = WordTokenizer()
    for r in reqs:
        assert isinstance(r.prompt, str) and r.prompt_len == len(tok.encode(r.prompt)) == 40
        assert not {0, 1} & set(tok.encode(r.prompt))


def test_sharegpt_like_means_and_clipping():
    reqs = sharegpt_like_requests(5000, seed=0)
    ins = np.array([r.prompt_len for r in reqs])
    outs = np.array([r.output_len for r in reqs])
    assert abs(ins.mean() - 215) < 0.15 * 215
    assert abs(outs.mean() - 200) < 0.15 * 200
    assert np.median(ins) < ins.mean()  # long-tailed
    assert ins.min() >= 4 and ins.max() <= 1024 and outs.min() >= 4 and outs.max() <= 1024
    assert sharegpt_like_requests(50, seed=1) == sharegpt_like_requests(50, seed=1)
    capped = sharegpt_like_requests(500, seed=0, max_model_len=256)
    assert all(r.prompt_len + r.output_len <= 256 and r.output_len >= 4 for r in capped)


def test_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "w3 w4 w5", "output_len": 7}\n\n'
                    '{"prompt": [5, 6], "output_len": 2}\n'
                    '{"prompt": "hello there", "output_len": 3, "prompt_len": 9}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:1: text prompt without \"prompt_len\""):
        jsonl_requests(path)
    path.write_text('{"prompt": "w3 w4 w5", "output_len": 7}\n'
                    '{"prompt": [5, 6], "output_len": 2}\n')
    reqs = jsonl_requests(path, tokenizer=WordTokenizer())
    assert reqs == [BenchRequest("w3 w4 w5", 3, 7), BenchRequest([5, 6], 2, 2)]
    assert [r.output_len for r in jsonl_requests(path, 5, WordTokenizer())] == [7, 2, 7, 2, 7]
    path.write_text('{"prompt": "x", "output_len": 0}\n')
    with pytest.raises(ValueError, match="output_len"):
        jsonl_requests(path)
    with pytest.raises(ValueError, match="dataset-path"):
        build_requests("jsonl", num_prompts=1, seed=0)
    with pytest.raises(ValueError, match="dataset-name"):
        build_requests("sharegpt", num_prompts=1, seed=0)


# ---------------------------------------------------------------- metrics

def _records() -> list[RequestRecord]:
    return [
        RequestRecord(prompt_len=10, output_tokens=4, send_time=0.0,
                      chunk_times=(0.1, 0.2, 0.4), end_time=0.5),
        RequestRecord(prompt_len=20, output_tokens=1, send_time=1.0,
                      chunk_times=(1.2,), end_time=1.2),
        RequestRecord(prompt_len=30, output_tokens=0, send_time=0.3, chunk_times=(),
                      end_time=0.6, error="HTTP 500: boom"),
    ]


def test_summary_exact_numbers():
    s = compute_summary(_records(), duration=2.0)
    assert (s.completed, s.failed) == (2, 1)
    assert (s.total_input_tokens, s.total_output_tokens) == (30, 5)
    assert s.request_throughput == 1.0 and s.output_throughput == 2.5
    assert s.total_token_throughput == 17.5 and s.request_goodput is None
    approx = pytest.approx
    # TTFT [100, 200] ms; p99 interpolates linearly: 100 + 0.99 * 100
    assert (s.mean_ttft_ms, s.median_ttft_ms, s.p99_ttft_ms) == approx((150, 150, 199))
    # TPOT only for outputs > 1 token: (500 - 100) / 3
    assert (s.mean_tpot_ms, s.median_tpot_ms, s.p99_tpot_ms) == approx((400 / 3,) * 3)
    assert (s.mean_itl_ms, s.median_itl_ms, s.p99_itl_ms) == approx((150, 150, 199))
    assert (s.mean_e2el_ms, s.median_e2el_ms, s.p99_e2el_ms) == approx((350, 350, 497))
    assert s.peak_concurrent_requests == 2  # the failed one overlapped the first
    assert s.peak_output_throughput == approx(4.0)  # 4 tokens in [0, 1 s)


def test_goodput():
    recs = _records()
    g = lambda *items: compute_summary(recs, 2.0, GoodputSLO.parse(items)).request_goodput
    assert g("ttft:150") == 0.5  # only the first (100 ms)
    assert g("tpot:100") == 0.5  # only the second: a 1-token output counts TPOT 0
    assert g("ttft:150", "tpot:100") == 0.0
    assert g("e2el:500", "ttft:200") == 1.0
    for bad in ("ttft", "foo:1", "ttft:x", "tpot:-1"):
        with pytest.raises(ValueError, match="goodput"):
            GoodputSLO.parse([bad])


def test_timeline_and_concurrency_helpers():
    recs = _records()
    # 0.5 s bins: all 4 tokens of the first before 0.5 s, the second's 1 token at 1.2 s
    assert output_throughput_timeline(recs[:2], 0.0, bin_s=0.5) == pytest.approx([8, 0, 2])
    split = [RequestRecord(1, 6, 0.0, (0.2, 0.4, 0.7), 0.8)]  # 2 tokens per chunk
    assert output_throughput_timeline(split, 0.0, bin_s=0.5) == pytest.approx([8, 4])
    back_to_back = [RequestRecord(1, 1, 0.0, (0.5,), 1.0), RequestRecord(1, 1, 1.0, (1.5,), 2.0)]
    assert peak_concurrency(back_to_back) == 1
    assert compute_summary([], 1.0).mean_ttft_ms == 0.0


def test_format_table():
    table = format_table(compute_summary(_records(), 2.0, GoodputSLO(ttft_ms=150)), 4)
    lines = table.splitlines()
    assert lines[0] == "{:=^50}".format(" Serving Benchmark Result ")
    assert lines[-1] == "=" * 50
    for label in ("Successful requests:", "Failed requests:", "Maximum request concurrency:",
                  "Request throughput (req/s):", "Request goodput (req/s):",
                  "Output token throughput (tok/s):", "Mean TTFT (ms):", "P99 TPOT (ms):",
                  "Median ITL (ms):", "Mean E2EL (ms):"):
        assert any(line.startswith(label) for line in lines), label
    assert "Mean TTFT (ms):                          150.00" in table


def test_arrival_offsets():
    assert arrival_offsets(3, math.inf, 0) == [0.0, 0.0, 0.0]
    a = arrival_offsets(2001, 50.0, 0)
    assert a == arrival_offsets(2001, 50.0, 0) and a[0] == 0.0
    assert np.all(np.diff(a) >= 0)
    assert abs(a[-1] / 2000 - 1 / 50) < 0.1 / 50  # mean gap = 1 / rate


# ---------------------------------------------------------------- fake server

@dataclass
class FakeState:
    """What the fake server does, and what it saw (test-local mutable state)."""

    chunk_delay: float = 0.005
    tokens_per_chunk: int = 1
    include_usage: bool = True
    send_done: bool = True
    junk_after_done: bool = False
    in_flight: int = 0
    max_in_flight: int = 0
    payloads: list = field(default_factory=list)
    auth: list = field(default_factory=list)


def _fake_app(state: FakeState):
    async def models(request):
        return web.json_response({"object": "list", "data": [{"id": "fake-model"}]})

    async def completions(request):
        body = await request.json()
        state.payloads.append(body)
        state.auth.append(request.headers.get("Authorization"))
        chat = "messages" in body
        prompt = body["messages"][0]["content"] if chat else body["prompt"]
        if prompt in ("fail-500", "fail-400"):
            status = int(prompt[-3:])
            return web.json_response({"error": {"message": "nope"}}, status=status)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)

        async def send(obj):
            await resp.write(f"data: {json.dumps(obj)}\n\n".encode())

        max_tokens = body.get("max_tokens") or body["max_completion_tokens"]
        for i in range(math.ceil(max_tokens / state.tokens_per_chunk)):
            await asyncio.sleep(state.chunk_delay)
            if prompt == "fail-midstream" and i == 1:
                await send({"error": {"message": "engine died"}})
                break
            choice = {"delta": {"content": "tok "}} if chat else {"text": "tok "}
            await send({"choices": [choice], "usage": None})
        await resp.write(b": keep-alive comment\n\n")
        if state.include_usage and body.get("stream_options", {}).get("include_usage"):
            plen = len(prompt) if isinstance(prompt, list) else len(prompt.split())
            await send({"choices": [], "usage": {"prompt_tokens": plen,
                                                 "completion_tokens": max_tokens}})
        state.in_flight -= 1  # before [DONE]: the client may start the next one right after
        if state.send_done:
            await resp.write(b"data: [DONE]\n\n")
        if state.junk_after_done:
            await send({"choices": [{"text": "junk"}]})
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", completions)
    return app


class FakeServer:
    """The fake app served on 127.0.0.1:<free port> from its own thread and event loop."""

    def __init__(self, state: FakeState):
        self.state = state
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        assert self.ready.wait(10), "fake server did not start"
        self.url = f"http://127.0.0.1:{self.port}"

    def _serve(self):
        asyncio.set_event_loop(self.loop)
        runner = web.AppRunner(_fake_app(self.state))
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
        self.port = runner.addresses[0][1]
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())
        self.loop.close()

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def server():
    srv = FakeServer(FakeState())
    yield srv
    srv.close()


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    return parser.parse_args(["--disable-tqdm", *argv])


def _run(requests, **config):
    return asyncio.run(run_benchmark(requests, ServeBenchConfig(disable_tqdm=True, **config)))


def test_main_serve_end_to_end(server, tmp_path, capsys):
    out = tmp_path / "result.json"
    summary = main_serve(_args(
        "--base-url", server.url, "--num-prompts", "8", "--random-input-len", "16",
        "--random-output-len", "5", "--ignore-eos", "--api-key", "sk-test",
        "--goodput", "ttft:10000", "--save-result", str(out)))
    assert summary["completed"] == 8 and summary["failed"] == 0
    assert summary["total_output_tokens"] == 40 and summary["total_input_tokens"] == 8 * 16
    assert summary["mean_ttft_ms"] > 0 and summary["mean_itl_ms"] > 0
    assert summary["request_goodput"] == pytest.approx(summary["request_throughput"])
    body = server.state.payloads[0]
    assert body["model"] == "fake-model" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True} and body["ignore_eos"] is True
    assert body["max_tokens"] == 5 and body["temperature"] == 0
    assert isinstance(body["prompt"], list) and len(body["prompt"]) == 16
    assert set(server.state.auth) == {"Bearer sk-test"}
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result" in printed and "Successful requests:" in printed
    saved = json.loads(out.read_text())
    assert saved["summary"] == summary and saved["model"] == "fake-model"
    assert saved["output_lens"] == [5] * 8 and len(saved["itls"][0]) == 4
    assert saved["config"]["request_rate"] == "inf" and saved["config"]["num_prompts"] == 8
    assert "sk-test" not in out.read_text()


def test_slo_in_request_sends_the_objectives(server):
    main_serve(_args("--base-url", server.url, "--num-prompts", "2", "--random-input-len", "4",
                     "--random-output-len", "2", "--goodput", "ttft:500", "tpot:50",
                     "--slo-in-request"))
    assert all(b["ttft_slo_ms"] == 500 and b["tpot_slo_ms"] == 50 for b in server.state.payloads)
    with pytest.raises(ValueError, match="--slo-in-request needs --goodput"):
        main_serve(_args("--base-url", server.url, "--slo-in-request"))


def test_plot(server, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "p.png"
    main_serve(_args("--base-url", server.url, "--num-prompts", "4", "--random-input-len", "4",
                     "--random-output-len", "3", "--plot", str(png)))
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_usage_overrides_chunk_count_and_done_is_final(server):
    server.state.tokens_per_chunk = 2
    server.state.junk_after_done = True
    reqs = [BenchRequest([1, 2, 3], 3, 6)] * 2
    run = _run(reqs, base_url=server.url, model="m")
    for r in run.records:
        assert r.success and len(r.chunk_times) == 3  # junk after [DONE] is not read
        assert r.output_tokens == 6 and r.prompt_len == 3
    server.state.include_usage = False  # fall back to counting text chunks
    run = _run(reqs, base_url=server.url, model="m")
    assert [r.output_tokens for r in run.records] == [3, 3]


def test_stream_without_done_fails(server):
    server.state.send_done = False
    run = _run([BenchRequest([1], 1, 2)], base_url=server.url, model="m")
    assert "[DONE]" in run.records[0].error


def test_request_rate_paces_sends(server):
    reqs = [BenchRequest([1], 1, 2)] * 10
    run = _run(reqs, base_url=server.url, model="m", request_rate=25.0, seed=7)
    due = arrival_offsets(10, 25.0, 7)
    sent = [r.send_time - run.start_time for r in run.records]
    for d, s in zip(due, sent):
        assert d - 1e-3 <= s <= d + 0.05
    assert run.duration >= due[-1]


@pytest.mark.parametrize("limit", [2, None])
def test_max_concurrency(server, limit):
    server.state.chunk_delay = 0.02
    run = _run([BenchRequest([1], 1, 3)] * 8, base_url=server.url, model="m",
               max_concurrency=limit)
    assert all(r.success for r in run.records)
    expected = limit or 8
    assert server.state.max_in_flight == expected
    assert peak_concurrency(run.records) == expected


def test_server_errors_count_as_failed(server, tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": p, "output_len": 3, "prompt_len": 1}
            for p in ("fail-500", "ok", "fail-400", "fail-midstream")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = _args("--base-url", server.url, "--dataset-name", "jsonl", "--dataset-path",
                 str(path), "--num-prompts", "4")
    summary = main_serve(args)
    assert (summary["completed"], summary["failed"]) == (1, 3)
    err = capsys.readouterr().err
    assert "HTTP 500" in err and "HTTP 400" in err and "engine died" in err


def test_chat_endpoint(server):
    run = _run([BenchRequest("hello there", 2, 4)], base_url=server.url, model="m",
               endpoint="/v1/chat/completions")
    rec = run.records[0]
    assert rec.success and rec.output_tokens == 4 and len(rec.chunk_times) == 4
    body = server.state.payloads[0]
    assert body["messages"] == [{"role": "user", "content": "hello there"}]
    assert body["max_completion_tokens"] == 4
    with pytest.raises(ValueError, match="text prompts"):
        _run([BenchRequest([1, 2], 2, 4)], base_url=server.url, model="m",
             endpoint="/v1/chat/completions")


def test_unreachable_server():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(ValueError, match="base-url"):
        _run([BenchRequest([1], 1, 1)], base_url=url)  # no --model: GET /v1/models fails
    run = _run([BenchRequest([1], 1, 1)] * 2, base_url=url, model="m")
    assert not any(r.success for r in run.records)
    for bad in (dict(request_rate=0.0), dict(max_concurrency=0), dict(endpoint="/v1/embed"),
                dict(base_url="127.0.0.1:8000")):
        with pytest.raises(ValueError):
            ServeBenchConfig(**bad)
