"""Start-up kernel compilation and lazy decode graphs, on the CPU.

The kernel warm-up pipeline runs here for an H100 target (sm_90) without a GPU: a dry run of a
one-layer shadow model records Triton specializations through Triton's own compile hook (the
JIT's device binder replaced by one for the explicit target), worker processes compile them into
an empty cache, and afterwards every job is a cache hit under the key the JIT itself computes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from servelm.worker import cuda_graphs  # noqa: E402
from servelm.worker.cuda_graphs import DecodeGraphs, eager_graph_keys, graph_keys  # noqa: E402
from servelm.worker.kernel_warmup import configure_compile_cache, default_cache_dir  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PIPELINE = r"""
import json, os, sys, time, hashlib
import torch
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.compiler.compiler import get_cache_invalidating_env_vars, get_cache_key
from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature

TARGET = GPUTarget("cuda", 90, 32)
direct_keys = {}

def cpu_run(self, *args, grid, warmup, **kwargs):
    # JITFunction.run up to _do_compile, with a binder for TARGET instead of the active device
    kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    backend = make_backend(TARGET)
    binder = create_function_from_signature(self.signature, self.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    key = compute_cache_key({}, specialization, options)
    options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound_args,
                                                            specialization, options)
    src = ASTSource(self, signature, constexprs, attrs)  # what _do_compile hands to compile()
    k = get_cache_key(src, backend, options, env_vars=get_cache_invalidating_env_vars())
    spec = json.loads(self._call_hook(lambda **kw: kw["compile"]["specialization_data"], key,
                                      signature, 0, constexprs, options, [attrs], warmup))
    direct_keys[json.dumps(spec, sort_keys=True)] = hashlib.sha256(k.encode()).hexdigest()
    assert self._call_hook(knobs.runtime.jit_cache_hook, key, signature, 0, constexprs, options,
                           [attrs], warmup)

JITFunction.run = cpu_run

from servelm.attention import get_attention_backend
from servelm.loader.arch_config import ArchConfig
from servelm.models.registry import build_model
from servelm.worker import kernel_warmup as kw
from servelm.worker.cuda_graphs import graph_keys
from servelm.worker.kernel_jobs import DryRunShapes, record_kernel_jobs, shadow_model

cfg = ArchConfig(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=64,
                 intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=256, max_position_embeddings=2048)
backend = get_attention_backend("triton", "cuda", 2048)

def build(c):
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        return build_model(c, backend, True, None)
    finally:
        torch.set_default_dtype(prev)

dev = torch.device("cpu")
model = shadow_model(build, cfg, dev)
from servelm.lora import LoRAConfig
from servelm.lora.manager import LoRAManager, with_lora_kernels
# multi-LoRA: the adapters' kernels are recorded (and compile) with the model's
with_lora_kernels(model, LoRAManager(LoRAConfig(4, 16, 4), model, cfg, torch.float16, dev,
                                     4096, True))
storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
# as the runner's first start: the workers start before the jobs are recorded, and wait
early = kw.WarmupWorkers(2)
shapes = DryRunShapes(2, 32, torch.float16, 16, 2048, 128, (64, 40), tuple(graph_keys(4, 2048)), 4)
jobs = record_kernel_jobs(model, shapes, dev)
before = [kw.is_cached(j, TARGET) for j in jobs]
roundtrip_ok = all(
    direct_keys[json.dumps(json.loads(j[2]), sort_keys=True)] == _k
    for j in jobs
    for _k in [__import__("hashlib").sha256(get_cache_key(*kw._source(j, TARGET)[:3],
               env_vars=get_cache_invalidating_env_vars()).encode()).hexdigest()])
waiting = all(p.poll() is None for p in early.procs)
warm = kw.KernelWarmup(jobs, TARGET, 2, time.perf_counter(), 0, 0.0, workers=early)
report = warm.wait()
deadline = time.time() + 300
while any(p.poll() is None for p in warm.procs) and time.time() < deadline:
    time.sleep(0.05)
statuses = [warm.status(i) for i in range(len(jobs))]
errors = [open(os.path.join(warm.dir, f"{i}.failed")).read()[-1500:]
          for i, s in enumerate(statuses) if s == "failed"]
warm.stop()
print("RESULT " + json.dumps({
    "layers": len(model.layers), "storages": len(storages),
    "jobs": [[j[0], j[1], j[3]] for j in jobs], "before": before, "roundtrip_ok": roundtrip_ok,
    "waiting": waiting,
    "required_done": report.done, "required": report.required, "statuses": statuses,
    "errors": errors, "after": [kw.is_cached(j, TARGET) for j in jobs]}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Triton compiles on Linux")
def test_recorded_kernels_compile_in_workers_into_the_cache(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "triton"),
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", PIPELINE], capture_output=True, text=True,
                       timeout=900, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads([x for x in p.stdout.splitlines() if x.startswith("RESULT ")][-1][7:])
    assert r["layers"] == 1 and r["storages"] == 1  # one layer, all parameters in one buffer
    assert r["waiting"], "a worker started before its jobs existed did not wait for them"
    kernels = {(m.rsplit(".", 1)[-1], n) for m, n, _ in r["jobs"]}
    for module in ("rmsnorm", "prefill_attention", "decode_attention", "lora"):
        assert any(m == module for m, _ in kernels), (module, kernels)
    assert len({tuple(j) for j in r["jobs"]}) <= len(r["jobs"])
    assert r["jobs"][0][2] and not r["jobs"][-1][2]  # required first, optional last
    assert not any(r["before"]), "the cache was empty"
    assert r["roundtrip_ok"], "the workers' cache key differs from the JIT's"
    # (done counts every job compiled by then: optional ones may have finished too)
    assert r["required_done"] >= r["required"] > 0
    assert r["statuses"] == ["done"] * len(r["jobs"]), r["errors"][:1]
    assert all(r["after"]), "every compiled job is a cache hit now"


def test_dry_run_steps_execute_in_bounds():
    """The dry-run inputs stay inside the one-block KV cache: kernels that do launch during a
    recording (compiled earlier in the process) run them for real. Here every kernel runs,
    under the interpreter on the CPU."""
    from tests.unit.kernel_env import INTERPRET
    if not INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1 (the CPU interpreter)")
    from servelm.attention import get_attention_backend
    from servelm.loader.arch_config import ArchConfig
    from servelm.models.registry import build_model
    from servelm.worker.kernel_jobs import DryRunShapes, dry_run_steps, shadow_model

    cfg = ArchConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=64,
                     max_position_embeddings=256)
    backend = get_attention_backend("triton", "cuda", 256)
    model = shadow_model(lambda c: build_model(c, backend, True, None), cfg, torch.device("cpu"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
        for m in model.modules():
            if hasattr(m, "cos_sin_cache"):
                m.cos_sin_cache.normal_()
    shapes = DryRunShapes(1, 16, torch.float32, 16, 256, 16, (20, 7),
                          ((2, 256), (1, 256)), 2)
    names = []
    with torch.inference_mode():
        for name, _, run in dry_run_steps(model, shapes, torch.device("cpu")):
            run()
            names.append(name)
    assert names[:3] == ["memory profile", "first prompt", "decode graph 2x256"]


def test_graph_keys_and_the_eager_subset():
    keys = graph_keys(512, 8192)
    assert keys == sorted(keys, reverse=True) and keys[0] == (512, 8192)
    assert (1, cuda_graphs.SHORT_CONTEXT) in keys and (64, cuda_graphs.SHORT_CONTEXT) not in keys
    eager = eager_graph_keys(512, 8192)
    assert eager[0] == (512, 8192)
    assert set(eager[1:]) == {k for k in keys if k[0] <= cuda_graphs.EAGER_CAPTURE_MAX_BS}
    assert graph_keys(4, 512) == [(4, 512), (2, 512), (1, 512)]  # one bucket: short == max


class _FakeGraph:
    def __init__(self, log, key):
        self.log, self.key = log, key

    def replay(self):
        self.log.append(("replay", self.key))


def test_decode_graphs_capture_a_size_on_first_use(monkeypatch):
    """Start-up captures the largest and the small sizes; a step of another size captures its
    graph first (padding rows reset, so no stale slot is written), then replays it."""
    log = []

    def fake_capture(self, key, meta):
        bs = key[0]
        log.append(("capture", key, self.slot_mapping[:bs].tolist(), self.seq_lens[:bs].tolist()))
        self.outputs[key] = (torch.zeros(bs, 3), torch.arange(bs))
        self.graphs[key] = _FakeGraph(log, key)

    monkeypatch.setattr(DecodeGraphs, "_capture_graph", fake_capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    g = DecodeGraphs(lambda *a: None, 32, 8, torch.device("cpu"), 2048)
    g.capture()
    assert set(g.graphs) == set(eager_graph_keys(32, 2048))
    g.slot_mapping[:24] = 7  # a previous replay's real rows
    g.seq_lens[:24] = 5
    meta = g._meta(20, 100)
    meta = type(meta)(slot_mapping=torch.arange(20), query_start_loc=meta.query_start_loc[:21],
                      seq_lens=torch.full((20,), 3, dtype=torch.int32),
                      block_tables=torch.zeros(20, 2, dtype=torch.int32), max_query_len=1,
                      max_seq_len=100)
    log.clear()
    logits, greedy = g.run(torch.zeros(20, dtype=torch.int64), torch.zeros(20, dtype=torch.int64),
                           meta)
    key = (24, cuda_graphs.SHORT_CONTEXT)
    assert log[0] == ("capture", key, [-1] * 24, [0] * 24) and log[1] == ("replay", key)
    assert logits.shape == (20, 3) and greedy.tolist() == list(range(20))
    assert g.num_lazy_captures == 1 and key in g.graphs
    log.clear()
    g.run(torch.zeros(20, dtype=torch.int64), torch.zeros(20, dtype=torch.int64), meta)
    assert log == [("replay", key)]  # captured once
    # idle time captures the rest, one per call, smallest batch first
    log.clear()
    calls = 0
    while g.capture_next():
        calls += 1
    assert set(g.graphs) == set(g.keys) and calls == len(log) - 1
    assert [e[1][0] for e in log] == sorted(e[1][0] for e in log)
    assert not g.capture_next()


def test_compile_cache_defaults_to_a_persistent_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert configure_compile_cache() == os.path.join(str(tmp_path), "servelm", "triton")
    assert default_cache_dir() == os.environ["TRITON_CACHE_DIR"]
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    assert configure_compile_cache() == str(tmp_path / "mine")  # an explicit one is kept


def test_job_list_kept_per_configuration(tmp_path):
    from servelm.worker.kernel_jobs import job_list_path, load_job_list, save_job_list
    a = job_list_path(str(tmp_path), "shapes-a", "bf16")
    assert a == job_list_path(str(tmp_path), "shapes-a", "bf16")
    assert a != job_list_path(str(tmp_path), "shapes-b", "bf16")
    assert load_job_list(a) is None
    jobs = [("servelm.kernels.gemv", "_gemv_kernel", '{"x": 1}', True),
            ("servelm.kernels.rmsnorm", "_rms_norm_kernel", '{"y": 2}', False)]
    save_job_list(a, jobs)
    assert load_job_list(a) == jobs
    with open(a, "w") as f:
        f.write("not json")
    assert load_job_list(a) is None  # a damaged list: recorded again
