"""Data parallelism: two engine cores (replicas) behind one API-side client and one server.
Concurrent requests spread over both (each replica is a plain engine: its outputs are the
engine tests' business); prompts sharing a prefix go to the replica that cached it; a replica that dies fails only its own requests, the other keeps serving, and a restart
brings it back; `servelm serve -dp 2` serves from both cores with summed metrics."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from servelm import SamplingParams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.e2e.server_utils import make_tiny_model
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny-dp")))


def _config(model_dir: str):
    from servelm.config import EngineArgs
    return EngineArgs(model=model_dir, device="cpu", data_parallel_size=2, max_model_len=256,
                      kv_cache_memory=8 << 20, block_size=4).create_engine_config()


async def _collect(client, rid: str, prompt, params) -> tuple[list[int], int]:
    """(token ids, the replica that served it)"""
    replica, out = None, None
    async for out in client.generate(rid, prompt, params):
        if replica is None:
            replica = client.replica_of(rid)
    return list(out.outputs[0].token_ids), replica


def test_requests_spread_stick_to_prefixes_and_survive_a_replica(model_dir):
    from servelm.engine.async_client import EngineDeadError
    from servelm.engine.dp_client import DataParallelClient

    async def run() -> None:
        client = await DataParallelClient.start(_config(model_dir))
        try:
            assert len(set(client.core_pid)) == 2 and client.is_healthy
            sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
            prompts = [{"prompt_token_ids": [5 + i, 40, 41 + i, 7, 9, 11 + 2 * i]}
                       for i in range(6)]
            res = await asyncio.gather(*(_collect(client, f"spread{i}", p, sp)
                                         for i, p in enumerate(prompts)))
            replicas = [r for _, r in res]
            assert sorted(set(replicas)) == [0, 1] and min(replicas.count(0),
                                                            replicas.count(1)) >= 2
            # one shared 16-token prefix, one request at a time: all on the first one's replica
            shared = list(range(20, 36))
            homes = [(await _collect(client, f"pfx{i}", {"prompt_token_ids": shared + [60 + i]},
                                     sp))[1] for i in range(4)]
            assert len(set(homes)) == 1
            stats = await client.get_stats()
            assert stats.prefix_cache_hits > 0 and stats.num_running == 0
            # replica `homes[0]` dies under a long request; the other one's request finishes
            long_sp = SamplingParams(temperature=0, max_tokens=230, ignore_eos=True)
            doomed = asyncio.ensure_future(_collect(client, "doomed", {
                "prompt_token_ids": shared + [99]}, long_sp))
            survivor = asyncio.ensure_future(_collect(client, "survivor", {
                "prompt_token_ids": [3, 1, 4, 1, 5, 9, 2, 6]}, long_sp))
            while client.replica_of("doomed") is None:  # routed (at once: the task started)
                await asyncio.sleep(0)
            victim = client.replica_of("doomed")
            assert victim == homes[0]
            os.kill(client.replicas[victim].core_pid, signal.SIGKILL)
            with pytest.raises(EngineDeadError):
                await asyncio.wait_for(doomed, 30)
            toks, where = await asyncio.wait_for(survivor, 30)
            assert len(toks) == 230 and where == 1 - victim
            deadline = time.monotonic() + 10
            while client.is_healthy and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not client.is_healthy
            client.check_health()  # one replica still takes requests
            toks, where = await _collect(client, "during", prompts[1], sp)
            assert where == 1 - victim and len(toks) == 6
            await client.restart(None)
            assert client.is_healthy and len(set(client.core_pid)) == 2
            later = await asyncio.gather(*(_collect(client, f"after{i}", p, sp)
                                           for i, p in enumerate(prompts[:4])))
            assert sorted({r for _, r in later}) == [0, 1]  # the new replica takes requests
        finally:
            await client.shutdown()

    asyncio.run(run())


def assert_both_cores_serve(srv) -> list[int]:
    """8 concurrent completions on a 2-replica server: both engine cores compute (an idle one
    polls once a second); returns the cores' pids."""
    import openai

    from tests.e2e.server_utils import cpu_seconds
    cores = srv.core_pids()
    assert len(cores) == 2, cores
    before = [cpu_seconds(c) for c in cores]
    client = openai.AsyncOpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0,
                                timeout=60)

    async def run() -> list:
        return await asyncio.gather(*(client.completions.create(
            model="tiny", prompt=f"Request number {i} says", max_tokens=96,
            extra_body={"ignore_eos": True}) for i in range(8)))

    assert all(o.usage.completion_tokens == 96 for o in asyncio.run(run()))
    used = [cpu_seconds(c) - b for c, b in zip(cores, before)]
    assert min(used) > 0.05, used
    return cores


def test_server_dp2_serves_from_both_cores(model_dir):
    import httpx
    import openai

    from tests.e2e.server_utils import ServerProcess, child_pids
    srv = ServerProcess([model_dir, "--device", "cpu", "--data-parallel-size", "2",
                         "--max-model-len", "256", "--kv-cache-memory", str(8 << 20),
                         "--served-model-name", "tiny"])
    try:
        cores = assert_both_cores_serve(srv)
        metrics = httpx.get(srv.base_url + "/metrics", timeout=10).text
        line = next(x for x in metrics.splitlines()
                    if x.startswith("servelm:generation_tokens_total"))
        assert float(line.split()[-1]) >= 8 * 96
        assert httpx.get(srv.base_url + "/health", timeout=10).status_code == 200
        # one core dies: the other serves meanwhile; the recovery restarts that replica only
        os.kill(cores[0], signal.SIGKILL)
        sync = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0,
                             timeout=60)
        t0 = time.monotonic()
        while httpx.get(srv.base_url + "/health", timeout=10).status_code == 200:
            assert time.monotonic() - t0 < 10
            time.sleep(0.05)
        out = sync.completions.create(model="tiny", prompt="Still there?", max_tokens=4)
        assert out.usage.completion_tokens == 4
        while httpx.get(srv.base_url + "/health", timeout=10).status_code != 200:
            assert time.monotonic() - t0 < 60
            time.sleep(0.2)
        alive = child_pids(srv.proc.pid)
        assert cores[1] in alive and cores[0] not in alive
    finally:
        log = srv.close()
    assert "data-parallel replica" in log and "engine core restarted" in log, log
