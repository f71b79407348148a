"""distributed_executor_backend="ray": the ranks beyond the driver are Ray actors in a placement
group (a local Ray instance here): TP=2 greedy output token-identical to transformers, an actor
that dies stops the engine with its rank named, and a `-dp 2` server whose replicas' ranks are
placed by one shared Ray instance serves from both replicas."""
from __future__ import annotations

import time

import pytest

ray = pytest.importorskip("ray")

from tests.conftest import make_engine, random_prompts, run_to_completion  # noqa: E402
from tests.e2e.test_engine_vs_hf import GREEDY, check, hf_greedy  # noqa: E402


def test_ray_tp2_matches_hf_and_a_dead_actor_stops_it(tiny_model_factory):
    from servelm.executor.multiproc import WorkerError
    d, model = tiny_model_factory("llama")
    eng = make_engine(d, tensor_parallel_size=2, distributed_executor_backend="ray")
    try:
        ex = eng.core.executor
        assert type(ex).__name__ == "RayExecutor" and len(ex.actors) == 1
        prompts = random_prompts(4, (3, 17, 40, 9), seed=22)
        check(run_to_completion(eng, prompts, GREEDY), [hf_greedy(model, p) for p in prompts])
        reasons: list = []
        ex.on_failure = reasons.append
        ray.kill(ex.actors[0])
        t0 = time.monotonic()
        while not reasons and time.monotonic() - t0 < 30:
            time.sleep(0.1)
        assert reasons and "rank 1" in reasons[0]
        eng.add_request("after", random_prompts(1, (6,), seed=23)[0], GREEDY)
        with pytest.raises(WorkerError):
            for _ in range(5):
                eng.step()
    finally:
        eng.core.shutdown()
    assert not ray.is_initialized()


def test_server_dp2_on_ray_serves_from_both_replicas(tmp_path):
    from tests.e2e.server_utils import ServerProcess, make_tiny_model
    from tests.e2e.test_data_parallel import assert_both_cores_serve
    d = make_tiny_model(str(tmp_path))
    srv = ServerProcess([d, "--device", "cpu", "--data-parallel-size", "2",
                         "--distributed-executor-backend", "ray", "--max-model-len", "256",
                         "--kv-cache-memory", str(8 << 20), "--served-model-name", "tiny"],
                        env={"RAY_ADDRESS": ""})
    try:
        assert_both_cores_serve(srv)
    finally:
        log = srv.close()
    assert "Started a local Ray instance" in log, log  # one, in the API process


def test_ray_pipeline_stages_match_hf(tiny_model_factory):
    """2 pipeline stages on Ray: the actor holds the first stage, two steps in flight."""
    d, model = tiny_model_factory("qwen2")
    eng = make_engine(d, pipeline_parallel_size=2, distributed_executor_backend="ray")
    try:
        prompts = random_prompts(4, (5, 23, 2, 31), seed=24)
        check(run_to_completion(eng, prompts, GREEDY), [hf_greedy(model, p) for p in prompts])
    finally:
        eng.core.shutdown()
