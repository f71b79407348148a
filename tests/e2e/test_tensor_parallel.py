"""Tensor and pipeline parallelism on the CPU: 2 or 4 ranks (this process's driver and worker
processes, joined by gloo). Greedy output is token-identical to transformers (and the logprobs close) with heads,
MLP columns and the vocabulary split, KV heads split or replicated, under chunked prefill,
preemption and prefix hits; seeded sampling draws rank 0's tokens; a worker that dies stops the
engine with its error instead of a hang; sizes that do not fit are refused with what would."""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from servelm import SamplingParams
from tests.conftest import assert_all_blocks_free, make_engine, random_prompts, run_to_completion
from tests.e2e.test_engine_vs_hf import GREEDY, LENGTHS, check, hf_refs

TP = 2


@pytest.fixture
def engines():
    """make(model_dir, **engine kwargs); every engine made is shut down after the test (its
    worker processes with it)."""
    made = []

    def make(d, **kw):
        eng = make_engine(d, **kw)
        made.append(eng)
        return eng
    yield make
    for eng in made:
        eng.core.shutdown()



@pytest.mark.parametrize("arch", ["llama", "llama-tied", "qwen3"])
def test_tp2_greedy_matches_hf(tiny_model_factory, engines, arch):
    """q/k/v/gate/up split by rows, o/down by columns (all-reduced), the embedding and the
    lm_head (tied: the embedding's shard) split by vocabulary, the logits gathered."""
    d, model = tiny_model_factory(arch)
    prompts = random_prompts(6, LENGTHS, seed=11)
    eng = engines(d, tensor_parallel_size=TP, max_num_batched_tokens=40)  # chunked prompts
    ex = eng.core.executor
    assert type(ex).__name__ == "MultiprocExecutor" and len(ex.workers) == TP - 1
    assert ex.runner.model.embed_tokens.weight.shape[0] == 256 // TP
    outs = run_to_completion(eng, prompts, GREEDY)
    check(outs, hf_refs(model, prompts))
    assert_all_blocks_free(eng)


def test_tp2_replicated_kv_heads(tmp_path, engines):
    """One KV head, two ranks: each rank holds that head (its KV cache has one head) and half
    of the query heads."""
    import transformers as tf

    from tests.conftest import TINY
    torch.manual_seed(7)
    cfg = tf.LlamaConfig(**{**TINY, "num_key_value_heads": 1})
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.save_pretrained(tmp_path)
    prompts = random_prompts(4, (5, 17, 33, 2), seed=12)
    eng = engines(str(tmp_path), tensor_parallel_size=TP)
    runner = eng.core.executor.runner
    assert runner.kv_caches[0][0].shape[2] == 1
    assert runner.model.layers[0].self_attn.num_heads == 2
    check(run_to_completion(eng, prompts, GREEDY), hf_refs(model, prompts))


def test_tp2_preemption_and_prefix_hits(tiny_model_factory, engines):
    """Qwen2 (q/k/v biases split with their rows): requests take turns in a cache too small
    for all (preempted and recomputed), and later ones find the shared prefix cached."""
    d, model = tiny_model_factory("qwen2")
    shared = random_prompts(1, (24,), seed=13)[0]
    prompts = [shared + t for t in random_prompts(6, (1, 9, 30, 2, 17, 40), seed=14)]
    eng = engines(d, tensor_parallel_size=TP, num_gpu_blocks_override=40, max_num_seqs=4)
    outs = run_to_completion(eng, prompts, GREEDY)
    st = eng.stats()
    assert st.num_preemptions > 0 and st.prefix_cache_hits > 0
    check(outs, hf_refs(model, prompts))
    assert_all_blocks_free(eng)


def test_tp2_seeded_sampling_matches_one_process(tiny_model_factory, engines):
    """n=2 seeded samples at temperature 1: rank 0 draws, the worker takes its tokens, and the
    draws are those of the same engine in one process."""
    d, _ = tiny_model_factory("llama")
    prompts = random_prompts(3, (4, 20, 9), seed=15)
    sp = SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=16, ignore_eos=True)
    one = run_to_completion(engines(d), prompts, sp)
    two = run_to_completion(engines(d, tensor_parallel_size=TP), prompts, sp)
    assert [[c.token_ids for c in o.outputs] for o in two] == \
        [[c.token_ids for c in o.outputs] for o in one]
    assert all(o.outputs[0].token_ids != o.outputs[1].token_ids for o in two)


def test_killed_worker_stops_the_engine(tiny_model_factory, engines):
    """A worker killed between steps: the next step raises naming the rank (no hang), the
    executor's monitor reports it, and shutdown leaves no worker process behind."""
    from servelm.executor.multiproc import WorkerError
    d, _ = tiny_model_factory("llama")
    eng = engines(d, tensor_parallel_size=TP)
    ex = eng.core.executor
    reasons = []
    ex.on_failure = reasons.append
    run_to_completion(eng, random_prompts(2, (5, 9), seed=16), GREEDY)
    pid = ex.workers[0].proc.pid
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    while not reasons and time.monotonic() - t0 < 10:
        time.sleep(0.1)
    assert reasons and "rank 1" in reasons[0]
    eng.add_request("after", random_prompts(1, (6,), seed=17)[0], GREEDY)
    with pytest.raises(WorkerError, match="rank 1"):
        for _ in range(5):
            eng.step()
    assert time.monotonic() - t0 < 30
    eng.core.shutdown()
    assert ex.workers[0].proc.poll() is not None


def test_parallel_sizes_that_do_not_fit_are_refused(tiny_model_factory):
    from servelm.config import EngineArgs
    d, _ = tiny_model_factory("llama")  # 4 heads, 2 KV heads, MLP 128, vocab 256
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 .*fit: \[1, 2, 4\]"):
        EngineArgs(model=d, device="cpu", tensor_parallel_size=3).create_engine_config()
    with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1"):
        EngineArgs(model=d, device="cpu", tensor_parallel_size=0).create_engine_config()
    with pytest.raises(ValueError, match="pipeline_parallel_size=3 is more than the model's 2 "
                                         "layers"):
        EngineArgs(model=d, device="cpu", pipeline_parallel_size=3).create_engine_config()
    with pytest.raises(ValueError, match="speculative_config with pipeline_parallel_size 2"):
        EngineArgs(model=d, device="cpu", pipeline_parallel_size=2, speculative_config={
            "method": "ngram", "num_speculative_tokens": 2}).create_engine_config()
    with pytest.raises(ValueError, match="'uni' runs one process"):
        EngineArgs(model=d, device="cpu", tensor_parallel_size=2,
                   distributed_executor_backend="uni").create_engine_config()
    cfg = EngineArgs(model=d, device="cpu", tensor_parallel_size=4).create_engine_config()
    assert cfg.parallel.distributed_executor_backend == "mp"
    # 2 KV heads over 4 ranks: one each, replicated in pairs
    assert cfg.kv_cache_spec()[0][1] == 1


def _workers_of(core_pid: int) -> list[int]:
    from tests.e2e.server_utils import child_pids
    return child_pids(core_pid, b"servelm.executor.mp_worker")


def test_server_tp2_worker_death_fails_requests_then_restarts(tmp_path):
    """`servelm serve -tp 2`: a worker SIGKILLed under a stream fails that request (no hang);
    the core goes with it and --on-engine-failure restart brings up a new core and new
    workers that serve; closing the server leaves no worker process."""
    import httpx
    import openai

    from tests.e2e.server_utils import ServerProcess, make_tiny_model
    d = make_tiny_model(str(tmp_path))
    srv = ServerProcess([d, "--device", "cpu", "--tensor-parallel-size", "2", "--max-model-len",
                         "512", "--kv-cache-memory", str(8 << 20), "--served-model-name", "tiny"])
    workers: list[int] = []
    try:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0,
                               timeout=30)
        out = client.completions.create(model="tiny", prompt="Hello", max_tokens=4)
        assert out.usage.completion_tokens == 4
        core = srv.core_pid()
        workers = _workers_of(core)
        assert len(workers) == 1
        stream = client.completions.create(model="tiny", prompt="Hi", max_tokens=400,
                                           stream=True, extra_body={"ignore_eos": True})
        t0 = time.monotonic()
        with pytest.raises(Exception):  # the stream's error event or a dropped connection
            for k, _ in enumerate(stream):
                if k == 2:
                    os.kill(workers[0], signal.SIGKILL)
        assert time.monotonic() - t0 < 30
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(srv.base_url + "/health", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        new_core = srv.core_pid()
        assert new_core != core
        workers = _workers_of(new_core)
        assert len(workers) == 1
        out = client.completions.create(model="tiny", prompt="Hello", max_tokens=4)
        assert out.usage.completion_tokens == 4
    finally:
        log = srv.close()
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{w}") for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{w}") for w in workers), log
    assert "worker rank 1" in log, log


@pytest.mark.parametrize("method", ["gguf", "int8"])
def test_tp2_quantized_layers_generate_as_one_process(tmp_path, tiny_model_factory, engines,
                                                      method):
    """Each rank's LinearMethod loads its shard (GGUF blocks kept quantized, with a Q8_0 row-
    parallel o_proj and a Q4_1 down_proj split on block boundaries; int8 quantized at load in
    the full tensor's groups): greedy tokens as the same method in one process."""
    if method == "gguf":
        pytest.importorskip("gguf")
        from tests.e2e.test_gguf_quantized import _write
        path = str(tmp_path / "tiny-q.gguf")
        _write(path)
        kw = {}
    else:
        path, _ = tiny_model_factory("llama")
        kw = {"quantization_group_size": 32}  # o_proj's 64 inputs: one group per rank's half
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = random_prompts(3, (5, 19, 8), seed=18)
    one = run_to_completion(engines(path, quantization=method, **kw), prompts, sp)
    eng = engines(path, quantization=method, tensor_parallel_size=TP, **kw)
    two = run_to_completion(eng, prompts, sp)
    assert [o.outputs[0].token_ids for o in two] == [o.outputs[0].token_ids for o in one]
    o_proj = eng.core.executor.runner.model.layers[0].self_attn.o_proj
    assert o_proj.input_size_per_rank == o_proj.input_size // TP


@pytest.mark.parametrize("arch,tp", [("llama-tied", 1), ("qwen3", 2)])
def test_pipeline_stages_match_hf(tiny_model_factory, engines, arch, tp):
    """2 pipeline stages (x 2 tensor-parallel ranks for qwen3: 4 processes): the last stage
    (rank 0) holds the norm and the head (a tied head: its copy of the embedding), the first
    the embedding; hidden states and residuals go stage to stage, two steps of disjoint
    requests in flight; preemption and prefix hits as one process."""
    d, model = tiny_model_factory(arch)
    shared = random_prompts(1, (20,), seed=19)[0]
    prompts = [shared + t for t in random_prompts(5, (3, 30, 1, 12, 41), seed=20)]
    eng = engines(d, tensor_parallel_size=tp, pipeline_parallel_size=2,
                  num_gpu_blocks_override=36, max_num_seqs=3, max_num_batched_tokens=24)
    runner = eng.core.executor.runner
    assert runner.last_stage and runner.model.norm is not None
    assert isinstance(runner.model.embed_tokens, torch.nn.Identity)
    assert runner.model.lm_head is not None and len(runner.kv_caches) == 1
    ex, before = eng.core.executor, []
    launch = ex.execute

    def execute(sched, non_block=False):  # steps already in flight when one is launched
        before.append(len(eng.core._pipeline))
        return launch(sched, non_block)
    ex.execute = execute
    outs = run_to_completion(eng, prompts, GREEDY)
    assert max(before) == 1  # two steps in flight through the two stages
    st = eng.stats()
    assert st.num_preemptions > 0 and st.prefix_cache_hits > 0
    check(outs, hf_refs(model, prompts))
    assert_all_blocks_free(eng)


def test_uneven_stages_and_sampling(tmp_path, engines):
    """3 layers over 2 stages (2 + 1); seeded sampling as one process (the first stage takes
    the last one's tokens)."""
    import transformers as tf

    from tests.conftest import TINY
    from servelm.distributed import ParallelGroup
    from servelm.models.llama import stage_layers
    assert [stage_layers(3, ParallelGroup(r, 2)) for r in range(2)] == [(0, 2), (2, 3)]
    assert [stage_layers(7, ParallelGroup(r, 3)) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    torch.manual_seed(8)
    cfg = tf.LlamaConfig(**{**TINY, "num_hidden_layers": 3})
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.save_pretrained(tmp_path)
    prompts = random_prompts(3, (6, 25, 11), seed=21)
    staged = engines(str(tmp_path), pipeline_parallel_size=2)
    check(run_to_completion(staged, prompts, GREEDY), hf_refs(model, prompts))
    # the same two stages (one start of their worker), on other prompts (no prefix hits)
    prompts = random_prompts(3, (6, 25, 11), seed=22)
    sp = SamplingParams(n=2, temperature=1.0, seed=9, max_tokens=12, ignore_eos=True)
    one = run_to_completion(engines(str(tmp_path)), prompts, sp)
    two = run_to_completion(staged, prompts, sp, ids=["s0", "s1", "s2"])
    assert [[c.token_ids for c in o.outputs] for o in two] == \
        [[c.token_ids for c in o.outputs] for o in one]


def test_a_taken_store_port_is_a_clear_error():
    import socket

    from servelm.distributed.init import make_store
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(RuntimeError, match="could not serve the process-group store at "
                                               r"127\.0\.0\.1:\d+ .*in use"):
            make_store("127.0.0.1", s.getsockname()[1], 2, 0)
