"""Shared fixtures: tiny random HF checkpoints made on the fly, and engine helpers."""
from __future__ import annotations

import itertools
import os

import pytest
import torch

# ---- Triton kernels on a CPU-only machine: run them under Triton's interpreter -------------
# Triton reads TRITON_INTERPRET when a kernel is defined (@triton.jit), so it must be set before
# anything imports servelm.kernels (conftest.py is imported before the test modules). Only the
# kernel tests (tests/unit/test_kernels*.py) launch kernels on the CPU; the engine's kernel paths
# are CUDA-only, so nothing else changes. Run with TRITON_INTERPRET=0 to skip the kernel tests.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# ---------------------------------------------------------------------------------------------

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _cached_gguf_reads():
    """transformers reads a GGUF's metadata through gguf.GGUFReader twice per load (about 9 s
    each for SmolLM2's 49k-token vocabulary on the 2-core machine) and builds gguf's tensor-name
    map once per tensor (about 10 s per load): both are cached for the session, readers keyed by
    the file's path, size and mtime (a rewritten file is read again). The same objects, read
    once; servelm's own loader does not use them. A read-only reader also slices the file as a
    plain ndarray view of its np.memmap (the same bytes, still mapped from the file): numpy's
    memmap subclass costs two thirds of a read in its per-slice hooks, one slice per token."""
    import functools
    try:
        import gguf
        import numpy as np
    except ImportError:
        yield
        return
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map

    class PlainArrayReader(reader):
        @property
        def data(self):
            return self._data

        @data.setter
        def data(self, value):
            self._data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    readers: dict = {}

    def cached_reader(path, mode="r"):
        if mode != "r":
            return reader(path, mode)
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
        if key not in readers:
            readers[key] = PlainArrayReader(path, mode)
        return readers[key]

    mp = pytest.MonkeyPatch()
    mp.setattr(gguf, "GGUFReader", cached_reader)
    mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(name_map))
    yield
    mp.undo()


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=512,
            initializer_range=0.2, bos_token_id=0, eos_token_id=None, tie_word_embeddings=False)
# eos_token_id=None: HF generate runs to max_new_tokens like ignore_eos (min_new_tokens would
# instead mask the EOS logit, a different distribution)


def _make_config(arch: str):
    import transformers as tf
    if arch == "llama":
        return tf.LlamaConfig(**TINY)
    if arch == "llama4":  # four layers: early exit's candidates after 1, 2 and 3
        return tf.LlamaConfig(**{**TINY, "num_hidden_layers": 4})
    if arch == "llama-tied":
        return tf.LlamaConfig(**{**TINY, "tie_word_embeddings": True})
    if arch == "llama3-rope":  # Llama 3.1+ rope scaling
        return tf.LlamaConfig(**{**TINY, "rope_parameters": {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}})
    if arch == "qwen2":
        return tf.Qwen2Config(**TINY)
    if arch == "qwen3":
        return tf.Qwen3Config(**{**TINY, "head_dim": 32})
    # mixtures of experts: 8 experts (4 under 32 hidden are too few to route unevenly), top 2
    if arch == "mixtral":
        return tf.MixtralConfig(**{**TINY, "num_local_experts": 8, "num_experts_per_tok": 2})
    if arch == "qwen2-moe":  # a gated shared expert; layer 1 dense (mlp_only_layers)
        return tf.Qwen2MoeConfig(**{**TINY, "num_experts": 8, "num_experts_per_tok": 2,
                                    "moe_intermediate_size": 48,
                                    "shared_expert_intermediate_size": 96,
                                    "mlp_only_layers": [1], "norm_topk_prob": False})
    if arch == "qwen3-moe":  # renormalised top-k, sparse every other layer
        return tf.Qwen3MoeConfig(**{**TINY, "head_dim": 32, "num_experts": 8,
                                    "num_experts_per_tok": 3, "moe_intermediate_size": 48,
                                    "decoder_sparse_step": 2, "norm_topk_prob": True})
    # sliding windows shorter than the test prompts (LENGTHS reach 120 tokens)
    if arch == "mistral-window":
        return tf.MistralConfig(**{**TINY, "sliding_window": 24})
    if arch == "gemma2":  # alternating local/global layers, both soft-caps
        return tf.Gemma2Config(**{**TINY, "num_hidden_layers": 4, "head_dim": 16,
                                  "sliding_window": 20, "query_pre_attn_scalar": 16,
                                  "tie_word_embeddings": True, "pad_token_id": 0})
    if arch == "gemma3":  # 5 local layers to 1 global, q/k norms, per-type rope
        return tf.Gemma3TextConfig(**{**TINY, "num_hidden_layers": 6, "head_dim": 16,
                                      "sliding_window": 20, "query_pre_attn_scalar": 16,
                                      "tie_word_embeddings": True, "pad_token_id": 0})
    raise KeyError(arch)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """arch -> (checkpoint dir, HF model in fp32, eval mode)."""
    import transformers as tf
    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            torch.manual_seed(1234)
            cfg = _make_config(arch)
            model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
            d = tmp_path_factory.mktemp(f"tiny-{arch}")
            model.save_pretrained(d)
            cache[arch] = (str(d), model)
        return cache[arch]
    return get


# SERVELM_TEST_DEVICE=cuda runs the engine tests on the GPU (fp32, Triton attention, CUDA
# graphs) against the same CPU fp32 HF references; SERVELM_TEST_ATTENTION picks the backend.
TEST_DEVICE = os.environ.get("SERVELM_TEST_DEVICE", "cpu")
TEST_ATTENTION = os.environ.get("SERVELM_TEST_ATTENTION", "auto")


def make_engine(model_dir: str, **kw):
    from servelm.config import EngineArgs
    from servelm.engine.engine import Engine
    args = dict(model=model_dir, skip_tokenizer_init=True, kv_cache_memory=1 << 24, block_size=4,
                device=TEST_DEVICE, dtype="float32", attention_backend=TEST_ATTENTION,
                gpu_memory_utilization=0.3, max_num_seqs=32)
    if os.environ.get("SERVELM_TEST_ASYNC") in ("0", "1"):  # see the scheduling_mode fixture
        args["async_scheduling"] = os.environ["SERVELM_TEST_ASYNC"] == "1"
    args.update(kw)
    if str(args["device"]).startswith("cuda") and "num_gpu_blocks_override" not in kw:
        args["num_gpu_blocks_override"] = 4096  # tiny models: a small fixed cache per engine
    return Engine.from_engine_args(EngineArgs(**args))


def run_to_completion(engine, prompts, params, ids=None, max_steps=10_000, loras=None):
    """Adds prompts (loras: each one's LoRARequest or None), steps until done; returns
    outputs in order. Bounded: never hangs."""
    ids = ids or [f"r{i}" for i in range(len(prompts))]
    plist = params if isinstance(params, list) else [params] * len(prompts)
    for rid, p, sp, lora in zip(ids, prompts, plist, loras or [None] * len(prompts)):
        engine.add_request(rid, p, sp, **({} if lora is None else {"lora_request": lora}))
    done = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert not engine.has_unfinished_requests(), "engine did not finish in the step bound"
    return [done[i] for i in ids]


def assert_all_blocks_free(engine) -> None:
    sched = engine.core.scheduler
    assert not sched.running and not sched.waiting
    assert sched.kv.pool.num_free_blocks == sched.kv.num_blocks
    assert all(c == 0 for c in sched.kv.pool.ref_cnt)


def shuffled_block_tables(lens, block_size: int, num_blocks: int, g: torch.Generator,
                          width: int = 0) -> torch.Tensor:
    """[len(lens), width or the longest's blocks] int32 block tables: each sequence of lens[i]
    tokens gets its blocks, in order, from one random permutation of ``num_blocks`` (blocks
    of different sequences interleave in the cache); entries past them hold an invalid id."""
    perm = torch.randperm(num_blocks, generator=g)
    need = [-(-n // block_size) for n in lens]
    tables = torch.full((len(lens), max(width, max(need))), 10**6, dtype=torch.int32)
    used = 0
    for i, k in enumerate(need):
        tables[i, :k] = perm[used:used + k].to(torch.int32)
        used += k
    return tables


def random_prompts(n: int, lengths, seed: int = 0, vocab: int = 250):
    g = torch.Generator().manual_seed(seed)
    lens = list(itertools.islice(itertools.cycle(lengths), n))
    return [torch.randint(1, vocab, (L,), generator=g).tolist() for L in lens]


@pytest.fixture(scope="session")
def smollm2_hf():
    """The embedded SmolLM2 GGUF loaded by transformers in fp32, once for the session (tens of
    seconds: it dequantizes every tensor): (gguf path, the model). Tests only read it."""
    from transformers import AutoModelForCausalLM
    from servelm.loader import default_model_path
    path = default_model_path()
    folder, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                 dtype=torch.float32).eval()
    return path, model


@pytest.fixture(params=["sync", "async"])
def scheduling_mode(request, monkeypatch):
    """Runs a test with synchronous and with asynchronous scheduling (make_engine's default):
    a module opts in with ``pytestmark = pytest.mark.usefixtures("scheduling_mode")``."""
    monkeypatch.setenv("SERVELM_TEST_ASYNC", "1" if request.param == "async" else "0")
    return request.param


def tiny_llama_gguf_writer(path, name: str, hidden: int, inter: int, layers: int, heads: int,
                           kv_heads: int):
    """A gguf.GGUFWriter for a tiny Llama with its metadata set (context 256, rope theta 1e4,
    RMS eps 1e-5, BOS 0, EOS 1); the caller adds the tensors and writes the file."""
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    return w
