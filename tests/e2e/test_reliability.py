"""A soak of a real `servelm serve` (tiny model, CPU): 500 requests of mixed kinds, about 20%
of them cut off by their clients (streams closed early, non-streaming clients that time out),
32 at a time. Every request that is not cut gets exactly what it asked for; afterwards no
request runs or waits, the KV cache is empty, and the resident memory of the API process and
of the engine core is within 10% of what it was after warm-up (600 requests). (SIGKILL of the core under load
and SIGTERM with requests in flight: tests/e2e/test_server_errors.py.)"""
from __future__ import annotations

import asyncio
import time

import pytest

from tests.e2e.server_utils import ServerProcess, make_tiny_model, rss_mb

openai = pytest.importorskip("openai")

N_REQUESTS = 500
CONCURRENCY = 32


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = make_tiny_model(str(tmp_path_factory.mktemp("tiny-soak")))
    srv = ServerProcess([d, "--device", "cpu", "--max-model-len", "256",
                         "--kv-cache-memory", str(8 << 20), "--served-model-name", "tiny"])
    yield srv
    log = srv.close()
    assert "Traceback" not in log and "never retrieved" not in log, log


async def _soak(base_url: str, n: int, seed: int) -> tuple[int, int, list]:
    """(requests cut by their client, requests completed, failures)."""
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0,
                                timeout=120)
    gate = asyncio.Semaphore(CONCURRENCY)
    failures: list = []
    cut = done = 0

    async def one(i: int) -> None:
        nonlocal cut, done
        kind = (i * 7 + seed) % 10
        async with gate:
            try:
                if kind < 2:  # a stream its client closes after two chunks
                    s = await client.completions.create(
                        model="tiny", prompt=f"Hello {i}", max_tokens=64, stream=True,
                        extra_body={"ignore_eos": True})
                    k = 0
                    async for _ in s:
                        k += 1
                        if k == 2:
                            await s.close()
                            break
                    cut += 1
                    return
                if kind == 2:  # a client that gives up before its answer
                    try:
                        await client.with_options(timeout=0.05).completions.create(
                            model="tiny", prompt=f"Hi {i}", max_tokens=200,
                            extra_body={"ignore_eos": True})
                    except openai.APITimeoutError:
                        pass
                    cut += 1
                    return
                if kind < 6:  # streamed completions to the end, with usage
                    s = await client.completions.create(
                        model="tiny", prompt=f"Once upon {i}", max_tokens=12, stream=True,
                        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
                    usage = None
                    async for chunk in s:
                        if not chunk.choices:
                            usage = chunk.usage
                    assert usage is not None and usage.completion_tokens == 12
                elif kind < 8:  # chat
                    r = await client.chat.completions.create(
                        model="tiny", messages=[{"role": "user", "content": f"Hey {i}"}],
                        max_tokens=8, extra_body={"ignore_eos": True})
                    assert r.usage.completion_tokens == 8
                else:  # n = 2 with logprobs
                    r = await client.completions.create(
                        model="tiny", prompt=f"The quick {i}", max_tokens=6, n=2, logprobs=1,
                        extra_body={"ignore_eos": True})
                    assert len(r.choices) == 2 and r.usage.completion_tokens == 12
                done += 1
            except Exception as e:  # noqa: BLE001 - every failure is reported
                failures.append((i, kind, repr(e)[:200]))

    try:
        await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        await client.close()
    return cut, done, failures


def _idle(server) -> dict:
    from tests.e2e.test_server import scrape
    deadline = time.monotonic() + 20
    while True:
        m = scrape(server)
        if (m["servelm:num_requests_running"] == 0 and m["servelm:num_requests_waiting"] == 0
                and m["servelm:kv_cache_usage_perc"] == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def test_soak_with_cutoffs_leaves_nothing_behind(server):
    # warm-up: allocators and oneDNN's kernel cache (one kernel per GEMM shape, bounded in the
    # core process) fill up over the first few hundred requests of varied batch sizes
    for seed in (1, 2):
        asyncio.run(_soak(server.base_url, 300, seed=seed))
    _idle(server)
    api_pid, core_pid = server.proc.pid, server.core_pid()
    rss0 = (rss_mb(api_pid), rss_mb(core_pid))
    cut, done, failures = asyncio.run(_soak(server.base_url, N_REQUESTS, seed=0))
    assert not failures, failures[:5]
    assert cut >= 0.15 * N_REQUESTS and cut + done == N_REQUESTS
    m = _idle(server)
    assert m["servelm:num_requests_running"] == 0 and m["servelm:num_requests_waiting"] == 0
    assert m["servelm:kv_cache_usage_perc"] == 0
    rss1 = (rss_mb(api_pid), rss_mb(core_pid))
    for name, before, after in zip(("API", "engine core"), rss0, rss1):
        assert after <= before * 1.10, f"{name} RSS grew from {before:.0f} to {after:.0f} MB"
