"""Engine configuration: vLLM-named arguments (EngineArgs) resolved once into frozen configs."""
from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch

_DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16, "fp16": torch.float16}


PREEMPTION_MODES = ("recompute", "swap")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelConfig:
    model: str  # a local HF directory, a .gguf file, or a dummy preset name
    load_format: str  # "safetensors" | "gguf" | "dummy"
    hf_config: Any  # transformers.PretrainedConfig (read-only by convention)
    dtype: torch.dtype
    max_model_len: int
    seed: int
    tokenizer: Optional[str] = None
    eos_token_ids: tuple[int, ...] = ()
    # servelm.quantization.QuantConfig (method, group size, head, checkpoint details); None: dense
    quantization: Any = None

    @property
    def architecture(self) -> str:
        archs = getattr(self.hf_config, "architectures", None) or []
        return archs[0] if archs else self.hf_config.model_type

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.hf_config, "num_key_value_heads", None) or self.hf_config.num_attention_heads

    @property
    def head_dim(self) -> int:
        c = self.hf_config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: Optional[int] = None
    # bytes for the KV cache (CPU default: 2 GiB); on a GPU at most this much of what
    # gpu_memory_utilization leaves
    kv_cache_memory: Optional[int] = None
    swap_space: float = 4.0  # GiB of (pinned) host memory for swapped-out KV blocks
    # "auto": the model's dtype; "fp8": e4m3 bytes with a float32 scale per (token, kv head)
    # stored behind each head row (attention/kv_quant.py), about half the bytes of bf16
    cache_dtype: str = "auto"
    # every layer's sliding window (Mistral's; 0: none, or only some layers have one): blocks
    # before a request's window are released as it advances (core/kv_cache.py)
    sliding_window: int = 0
    # KV eviction (kv_eviction/config.py; None: off): each request keeps a budget of tokens
    kv_eviction: Any = None


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192
    enable_chunked_prefill: bool = True
    # schedule step N+1 while step N runs on the device (its tokens land one step later)
    async_scheduling: bool = False
    # while requests are decoding, a step computes at most this many prompt tokens, so one long
    # prompt cannot stretch the decodes' inter-token latency (None: max_num_batched_tokens)
    max_prefill_tokens_while_decoding: Optional[int] = None
    # the same bound as a step time (ms), through the scheduler's step-cost model: an
    # inter-token-latency target for running requests while prompts arrive
    max_step_ms_while_decoding: Optional[float] = None
    policy: str = "fcfs"  # the waiting queue: a name in servelm.core.request_queue.REQUEST_QUEUES
    # what a preempted request loses: "recompute" frees its KV (recomputed on resuming), "swap"
    # copies its blocks to host memory and back (recompute when swap space is full)
    preemption_mode: str = "recompute"
    # KV slots reserved past each step's tokens: a model-based proposer's draft passes write
    # the KV of up to k positions beyond them (vLLM's num_lookahead_tokens)
    num_lookahead_tokens: int = 0
    # > 0: a request's drafts are the nodes of a token tree this deep (alternatives verified
    # together), not a chain: verified as proposed (up to the budget), not trimmed by their
    # expected yield; accepted tokens are counted by depth
    draft_tree_depth: int = 0
    # pipeline parallelism: up to this many steps in flight through the stages, of disjoint
    # sampling requests (one whose sampled token is in flight waits until it lands)
    pipeline_depth: int = 1
    # multi-LoRA: at most this many distinct adapters run at once (the device slots); 0: off
    max_loras: int = 0
    # multi-step scheduling (vLLM's num_scheduler_steps): while every running request decodes
    # greedily with nothing else to do, one schedule covers up to this many forward passes
    num_scheduler_steps: int = 1


@dataclass(frozen=True)
class ParallelConfig:
    """How the model is spread over devices (vLLM's names)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    # a name in servelm.executor.EXECUTORS: "uni" (this process), "mp" (a process per rank)
    distributed_executor_backend: str = "uni"
    cpu_offload_gb: float = 0.0
    # GPUs: small tensor-parallel all-reduces use NCCL too, not the one-shot peer-memory one
    disable_custom_all_reduce: bool = False

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    device: str
    parallel: ParallelConfig = ParallelConfig()
    attention_backend: str = "auto"
    enforce_eager: bool = False
    max_logprobs: int = 20
    skip_tokenizer_init: bool = False  # token ids in and out only
    speculative: Any = None  # servelm.spec_decode.config.SpeculativeConfig, or None (off)
    early_exit: Any = None  # servelm.early_exit.EarlyExitConfig, or None (off)
    lora: Any = None  # servelm.lora.LoRAConfig (enable_lora), or None (off)
    # servelm.structured_output.StructuredOutputsConfig (None: the defaults)
    structured_outputs: Any = None
    # CPU math threads (cpu/threads.py; 0: as PyTorch is set), and the CPUs the creating
    # process could use: the engine takes the first ``threads`` of them, the API process the rest
    threads: int = 0
    cpus: tuple[int, ...] = ()

    def kv_cache_spec(self, mc: Optional[ModelConfig] = None) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape of one block of one layer's K (or V) cache, its dtype) for model ``mc`` (the
        target by default; a draft model's KV is laid out the same way): [block_size, kv heads,
        head_dim] in the model dtype, or with cache_dtype "fp8" [block_size, kv heads,
        head_dim + 4] uint8 (e4m3 bytes, then the row's float32 scale); "bfloat16" keeps the
        values in bf16 whatever the model dtype (half of an fp32 model's KV bytes)."""
        from servelm.attention.kv_quant import kv_cache_shape, kv_cache_torch_dtype
        mc = mc or self.model
        dtype = kv_cache_torch_dtype(mc.dtype, self.cache.cache_dtype)
        # one rank's KV heads under tensor parallelism (one each when they are replicated)
        kv_heads = mc.num_kv_heads // min(mc.num_kv_heads, self.parallel.tensor_parallel_size)
        _, bs, kvh, d = kv_cache_shape(1, self.cache.block_size, kv_heads, mc.head_dim,
                                       dtype == torch.uint8)
        return (bs, kvh, d), dtype

    def kv_bytes_per_block(self, mc: Optional[ModelConfig] = None) -> int:
        """K and V of one block in every layer of model ``mc`` (the target by default)."""
        shape, dtype = self.kv_cache_spec(mc)
        n = 1
        for d in shape:
            n *= d
        # one pipeline stage's layers (the largest stage's)
        layers = -(-(mc or self.model).num_layers // self.parallel.pipeline_parallel_size)
        return 2 * layers * n * torch.tensor([], dtype=dtype).element_size()

    @property
    def num_swap_blocks(self) -> int:
        """Host blocks for swap preemption (none unless preemption_mode is "swap")."""
        if self.scheduler.preemption_mode != "swap":
            return 0
        return int(self.cache.swap_space * 1024**3 // self.kv_bytes_per_block())


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but torch sees no CUDA device; "
                         "use device='cpu'.")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}.")
    return device


def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def _resolve_dtype(dtype: str | torch.dtype, hf_config: Any, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device == "cpu":
            # bf16 halves the bytes per token and runs ~3x faster where the CPU has native bf16
            # dot products; elsewhere fp32 (bf16 would be emulated, slower than fp32).
            return torch.bfloat16 if _cpu_has_native_bf16() else torch.float32
        cfg = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
        if isinstance(cfg, str):
            cfg = _DTYPES.get(cfg)
        return cfg if cfg in (torch.float16, torch.bfloat16) else torch.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of 'auto', {sorted(set(_DTYPES))}, got {dtype!r}.")
    return _DTYPES[dtype]


KV_CACHE_DTYPES = ("auto", "bfloat16", "fp8", "fp8_e4m3")


def _resolve_kv_cache_dtype(name: str, device: str) -> str:
    """vLLM's kv_cache_dtype names -> "auto" | "bfloat16" | "fp8" (e4m3 with per-row scales)."""
    if name == "fp8_e5m2":
        raise ValueError("kv_cache_dtype='fp8_e5m2' is not supported: use 'fp8' (e4m3 with a "
                         "scale per token and head, as accurate and as small) or 'auto'.")
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)}, got {name!r}.")
    if name in ("auto", "bfloat16"):
        return name
    if device.startswith("cuda") and torch.cuda.get_device_capability(device) < (8, 9):
        cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
        raise ValueError(f"kv_cache_dtype='fp8' needs a GPU with fp8 conversions (compute "
                         f"capability 8.9+: Ada, Hopper); this one is {cap}. Use "
                         "kv_cache_dtype='auto', or device='cpu'.")
    return "fp8"


@dataclass
class EngineArgs:
    """Arguments with vLLM's names; ``create_engine_config`` validates and resolves them."""

    model: Optional[str] = None
    tokenizer: Optional[str] = None
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    load_format: str = "auto"
    block_size: int = 16
    max_model_len: Optional[int] = None
    max_num_seqs: Optional[int] = None  # default: 1024 on GPU (as vLLM on H100), 256 on CPU
    max_num_batched_tokens: Optional[int] = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    async_scheduling: Optional[bool] = None  # default: on with CUDA, off on the CPU
    max_prefill_tokens_while_decoding: Optional[int] = None
    max_step_ms_while_decoding: Optional[float] = None
    num_scheduler_steps: int = 1  # forward passes per schedule of greedy decodes (CPU)
    scheduling_policy: str = "fcfs"
    preemption_mode: str = "recompute"
    swap_space: Optional[float] = None  # GiB for preemption_mode="swap" (default 4)
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: Optional[int] = None
    kv_cache_memory: Optional[int] = None
    attention_backend: str = "auto"
    enforce_eager: bool = False
    max_logprobs: int = 20
    skip_tokenizer_init: bool = False
    quantization: Optional[str] = None  # a name in servelm.quantization.QUANTIZATION_METHODS
    quantization_group_size: Optional[int] = None  # int4/int8 at load (default 128; -1: per row)
    quantize_lm_head: bool = False  # fp8/int8/int4: the head too (a tied head gets a copy)
    # "auto" (the model dtype) | "bfloat16" | "fp8" (e4m3 with scales)
    kv_cache_dtype: str = "auto"
    # KV eviction: none | streaming (attention sinks + recent tokens) | h2o (sinks, recent and
    # heavy hitters), each request keeping kv_eviction_budget tokens (default 512)
    kv_eviction: str = "none"
    kv_eviction_budget: Optional[int] = None
    sink_tokens: Optional[int] = None  # (default 4)
    kv_recent_tokens: Optional[int] = None  # h2o's recent window (default: half the rest)
    # None: "uni" (one process) for one rank, "mp" (a worker process per further rank) for more
    distributed_executor_backend: Optional[str] = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    cpu_offload_gb: float = 0.0
    disable_custom_all_reduce: bool = False  # tensor parallel on GPUs: NCCL for every size
    speculative_config: Any = None  # a dict (or its JSON text) with vLLM's keys; None: off
    # {"threshold", "min_layer", "criterion", "exit_layers"} (or its JSON text); None: off
    early_exit_config: Any = None
    # backend (auto | xgrammar), disable_any_whitespace, compile_timeout_s, max_cached_grammars,
    # mask_process
    structured_outputs_config: Any = None
    threads: Optional[int] = None  # CPU math threads (llama.cpp's name); None: usable CPUs
    # multi-LoRA serving: adapters on the device at once, their largest rank, and how many
    # host memory keeps (default: max_loras)
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: Optional[int] = None

    def create_engine_config(self) -> EngineConfig:
        from servelm.attention import check_attention_backend
        from servelm.executor import check_executor_backend
        from servelm.loader import load_generation_eos_ids, load_hf_config, resolve_model
        from servelm.quantization import check_quantization
        from servelm.cpu.threads import resolve_threads, usable_cpus
        check_attention_backend(self.attention_backend)
        check_quantization(self.quantization)
        resolve_threads(self.threads)  # a bad value fails before anything loads
        from servelm.spec_decode.config import parse_speculative_config
        speculative = parse_speculative_config(self.speculative_config)
        from servelm.structured_output import StructuredOutputsConfig
        structured = StructuredOutputsConfig.parse(self.structured_outputs_config)
        world = self.tensor_parallel_size * self.pipeline_parallel_size
        executor = check_executor_backend(self.distributed_executor_backend
                                          or ("uni" if world == 1 else "mp"))
        if self.load_format not in ("auto", "safetensors", "gguf", "dummy"):
            raise ValueError("load_format must be one of 'auto', 'safetensors', 'gguf', 'dummy'; "
                             f"got {self.load_format!r}.")
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            raise ValueError(f"block_size must be a power of 2 up to 256, got {self.block_size}.")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1], got "
                             f"{self.gpu_memory_utilization}.")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}.")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError("num_gpu_blocks_override must be >= 1.")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {list(PREEMPTION_MODES)}, got "
                             f"{self.preemption_mode!r}.")
        if self.swap_space is not None:
            if self.preemption_mode != "swap":
                raise ValueError(f"swap_space ({self.swap_space} GiB) is only used with "
                                 "preemption_mode='swap' (--preemption-mode swap).")
            if not self.swap_space >= 0:
                raise ValueError(f"swap_space must be >= 0 (GiB), got {self.swap_space}.")
        swap_gib = 4.0 if self.swap_space is None else float(self.swap_space)
        device = _resolve_device(self.device)
        model = self.model if self.load_format == "dummy" else resolve_model(self.model)
        hf_config = load_hf_config(model, self.load_format)
        load_format = self.load_format
        if load_format == "auto":
            load_format = "gguf" if str(model).endswith(".gguf") else "safetensors"
        dtype = _resolve_dtype(self.dtype, hf_config, device)
        parallel = ParallelConfig(self.tensor_parallel_size, self.pipeline_parallel_size,
                                  self.data_parallel_size, executor, self.cpu_offload_gb,
                                  self.disable_custom_all_reduce)
        from servelm.distributed.validate import check_parallel
        check_parallel(parallel, hf_config, device)
        from servelm.quantization import resolve_quant_config
        if self.load_format == "dummy" and self.quantization in ("gguf", "gptq", "awq"):
            raise ValueError(f"load_format='dummy' makes dense random weights: quantization="
                             f"{self.quantization!r} loads a checkpoint as stored; use 'int4', "
                             "'int8' or 'fp8' (quantized as the dummy weights load).")
        quant = resolve_quant_config(self.quantization, hf_config, load_format, device,
                                     self.quantization_group_size, self.quantize_lm_head, dtype,
                                     str(model) if load_format == "gguf" else None)
        if self.cpu_offload_gb and quant is not None:
            raise ValueError(f"cpu_offload_gb with quantization={quant.method!r} is not "
                             "supported yet: offload streams dense weights; use "
                             "quantization='none' (a .gguf: dequantized at load) or no offload.")
        max_pos = getattr(hf_config, "max_position_embeddings", None) or 2048
        from servelm.models.registry import uniform_window, windowed_attention
        window = uniform_window(hf_config)
        if window and (self.max_model_len or max_pos) <= window:
            # the window can never mask a key: the model is built without it
            if dataclasses.is_dataclass(hf_config):
                hf_config = dataclasses.replace(hf_config, sliding_window=None)
            else:
                import copy
                hf_config = copy.copy(hf_config)
                hf_config.sliding_window = None
        elif not windowed_attention(hf_config):
            # other sliding-window configs (Qwen2's use_sliding_window) are exact with full
            # attention up to the window only
            window = getattr(hf_config, "sliding_window", None)
            if window and getattr(hf_config, "use_sliding_window", True):
                max_pos = min(max_pos, window)
        max_model_len = self.max_model_len or max_pos
        if max_model_len > max_pos:
            raise ValueError(f"max_model_len ({max_model_len}) is larger than the model's "
                             f"context ({max_pos}); pass max_model_len <= {max_pos}.")
        if max_model_len < 2:
            raise ValueError("max_model_len must be >= 2.")
        batched = self.max_num_batched_tokens or (8192 if device != "cpu" else 2048)
        if not self.enable_chunked_prefill:
            batched = max(batched, max_model_len)
        if batched < 1:
            raise ValueError("max_num_batched_tokens must be >= 1.")
        eos = tuple(load_generation_eos_ids(model, hf_config, None)
                    if load_format != "dummy" else
                    ([hf_config.eos_token_id] if isinstance(getattr(hf_config, "eos_token_id", None), int)
                     else list(getattr(hf_config, "eos_token_id", None) or [])))
        model_cfg = ModelConfig(model=str(model), load_format=load_format, hf_config=hf_config,
                                dtype=dtype, max_model_len=max_model_len, seed=self.seed,
                                tokenizer=self.tokenizer, eos_token_ids=eos,
                                quantization=quant)
        from servelm.spec_decode.config import finalize_speculative_config
        speculative = finalize_speculative_config(speculative, model_cfg, self.load_format)
        if speculative is not None and self.pipeline_parallel_size > 1:
            raise ValueError("speculative_config with pipeline_parallel_size "
                             f"{self.pipeline_parallel_size} is not supported yet: use "
                             "pipeline_parallel_size=1.")
        if (speculative is not None and speculative.method == "draft_model"
                and uniform_window(hf_config)):
            logger.warning("a draft model over a sliding-window target: the target's blocks "
                           "before its window are released, and a draft model that attends "
                           "further back reads them as zeros (output stays exact; acceptance "
                           "may drop)")
        if speculative is not None and speculative.method == "draft_model" and world > 1:
            raise ValueError("speculative_config method 'draft_model' with tensor_parallel_size "
                             f"{self.tensor_parallel_size} is not supported yet: use 'ngram' or "
                             "'layer_skip', or tensor_parallel_size=1.")
        eviction = self._eviction_config(max_model_len, hf_config, speculative, device)
        kv_dtype = _resolve_kv_cache_dtype(self.kv_cache_dtype, device)
        if kv_dtype == "auto" and device == "cpu" and self.dtype == "auto" \
                and dtype == torch.float32:
            # "auto" chose fp32 math because this CPU has no native bf16 (PyTorch would emulate
            # bf16 matmuls); the cache still stores bf16, as llama.cpp's default f16 cache: half
            # the bytes decode attention reads, twice the tokens per GiB, widened exactly
            kv_dtype = "bfloat16"
        cache = CacheConfig(self.block_size, self.enable_prefix_caching,
                            self.gpu_memory_utilization, self.num_gpu_blocks_override,
                            self.kv_cache_memory, swap_gib, kv_dtype,
                            uniform_window(hf_config), eviction)
        if cache.cache_dtype == "bfloat16" and device != "cpu" and dtype != torch.bfloat16:
            # the Triton kernels read the cache in the activations' dtype
            raise ValueError(f"kv_cache_dtype='bfloat16' with a {str(dtype).removeprefix('torch.')} "
                             "model runs on the CPU only; on a GPU pass dtype='bfloat16' (then "
                             "kv_cache_dtype='auto' is the same).")
        max_seqs = self.max_num_seqs or (256 if device == "cpu" else 1024)
        # on the CPU a step's launch already computes it: overlapping gains nothing there
        async_sched = device != "cpu" if self.async_scheduling is None else bool(self.async_scheduling)
        if self.pipeline_parallel_size > 1:  # steps overlap through the stages instead
            async_sched = False
        cap = self.max_prefill_tokens_while_decoding
        if cap is not None and cap < 1:
            raise ValueError(f"max_prefill_tokens_while_decoding must be >= 1, got {cap}.")
        from servelm.core.request_queue import REQUEST_QUEUES
        from servelm.registry import check_name
        policy = check_name(REQUEST_QUEUES, self.scheduling_policy, "scheduling_policy")
        step_ms = self.max_step_ms_while_decoding
        if step_ms is not None and not step_ms > 0:
            raise ValueError(f"max_step_ms_while_decoding must be > 0, got {step_ms}.")
        sched = SchedulerConfig(max_seqs, batched, max_model_len,
                                self.enable_chunked_prefill, async_sched, cap, step_ms, policy,
                                self.preemption_mode,
                                speculative.num_lookahead_tokens if speculative else 0,
                                len(speculative.tree) if speculative and speculative.tree else 0,
                                self.pipeline_parallel_size)
        lora = self._lora_config(speculative)
        if lora is not None:
            sched = dataclasses.replace(sched, max_loras=lora.max_loras)
        steps = self._num_scheduler_steps(device, speculative, eviction, world, async_sched)
        if steps > 1:
            sched = dataclasses.replace(sched, num_scheduler_steps=steps)
        return EngineConfig(model=model_cfg, cache=cache, scheduler=sched, device=device,
                            parallel=parallel,
                            attention_backend=self.attention_backend,
                            enforce_eager=self.enforce_eager, max_logprobs=self.max_logprobs,
                            skip_tokenizer_init=self.skip_tokenizer_init, speculative=speculative,
                            early_exit=self._early_exit_config(hf_config, speculative, world),
                            lora=lora,
                            structured_outputs=structured,
                            threads=resolve_threads(self.threads), cpus=tuple(usable_cpus()))

    def _num_scheduler_steps(self, device: str, speculative: Any, eviction: Any,
                             world: int, async_sched: bool) -> int:
        n = self.num_scheduler_steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_scheduler_steps must be an integer >= 1, got {n!r}.")
        if n == 1:
            return 1
        what = None
        if device != "cpu":
            what = ("a GPU (the passes repeat the CPU's C decode step; on a GPU asynchronous "
                    "scheduling already overlaps the host's work with the device's)")
        elif self.enforce_eager:
            what = "enforce_eager=True (the passes repeat the C decode step, which it turns off)"
        elif speculative is not None:
            what = "speculative_config"
        elif self.early_exit_config is not None:
            what = "early_exit_config"
        elif eviction is not None:
            what = "kv_eviction"
        elif world > 1:
            what = "tensor or pipeline parallelism"
        elif self.enable_lora:
            what = "enable_lora"
        elif async_sched:
            what = ("async_scheduling=True (the next schedule would be made before the passes' "
                    "tokens land)")
        if what:
            raise ValueError(f"num_scheduler_steps={n} with {what} is not supported; use "
                             "num_scheduler_steps=1.")
        return n

    def _lora_config(self, speculative: Any) -> Any:
        from servelm.lora import LoRAConfig
        if not self.enable_lora:
            given = [f"{n}={getattr(self, n)!r}" for n, d in
                     (("max_loras", 1), ("max_lora_rank", 16), ("max_cpu_loras", None))
                     if getattr(self, n) != d]
            if given:
                raise ValueError(f"{', '.join(given)} without enable_lora=True: pass "
                                 "enable_lora=True (--enable-lora) to serve adapters.")
            return None
        what = None
        if self.early_exit_config is not None:
            what = "early_exit_config"
        elif speculative is not None and speculative.method == "layer_skip":
            what = ("speculative_config method 'layer_skip' (its drafts run the base model's "
                    "own layers; use 'ngram' or 'draft_model')")
        if what:
            raise ValueError(f"enable_lora with {what} is not supported yet.")
        return LoRAConfig.create(self.max_loras, self.max_lora_rank, self.max_cpu_loras)

    def _early_exit_config(self, hf_config: Any, speculative: Any, world: int) -> Any:
        from servelm.early_exit import parse_early_exit_config
        from servelm.early_exit.config import check_early_exit
        ee = parse_early_exit_config(self.early_exit_config)
        if ee is None:
            return None
        what = None
        if speculative is not None:
            what = "speculative_config"
        elif self.pipeline_parallel_size > 1:
            what = "pipeline parallelism (a stage would need the later stages' decision)"
        if what:
            raise ValueError(f"early_exit_config with {what} is not supported yet.")
        check_early_exit(ee, hf_config.num_hidden_layers)
        return ee

    def _eviction_config(self, max_model_len: int, hf_config: Any, speculative: Any,
                         device: str) -> Any:
        from servelm.kv_eviction import make_eviction_config
        from servelm.models.registry import windowed_attention
        ev = make_eviction_config(self.kv_eviction, self.kv_eviction_budget, self.sink_tokens,
                                  self.kv_recent_tokens, self.block_size, max_model_len)
        if ev is None:
            return None
        what = None
        if speculative is not None:
            what = "speculative_config (drafts' positions and KV)"
        elif windowed_attention(hf_config):
            what = "a sliding-window or soft-capped model (its window already bounds the KV)"
        elif _resolve_kv_cache_dtype(self.kv_cache_dtype, device) == "fp8":
            what = "kv_cache_dtype='fp8' (keys are re-rotated as they move)"
        elif ev.needs_scores and self.pipeline_parallel_size > 1:
            what = "pipeline_parallel_size > 1 under h2o (each stage sees its layers' scores)"
        elif not self.enable_chunked_prefill:
            what = "enable_chunked_prefill=False (prompts are computed a budget at a time)"
        if what:
            raise ValueError(f"kv_eviction={self.kv_eviction!r} with {what} is not supported.")
        return ev

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, model_positional: bool = True) -> None:
        from servelm.core.request_queue import REQUEST_QUEUES
        if model_positional:
            parser.add_argument("model", nargs="?", default=None,
                                help="HF directory, .gguf file, or dummy preset (default: the "
                                     "embedded SmolLM2-135M-Instruct)")
        else:
            parser.add_argument("--model", default=None)
        a = parser.add_argument
        a("--tokenizer", default=None)
        a("--dtype", default="auto", choices=["auto"] + sorted(set(_DTYPES)))
        a("--device", default="auto")
        a("--seed", type=int, default=0)
        a("--load-format", default="auto", choices=["auto", "safetensors", "gguf", "dummy"])
        a("--block-size", type=int, default=16)
        a("--max-model-len", type=int, default=None)
        a("--max-num-seqs", type=int, default=None)
        a("--max-num-batched-tokens", type=int, default=None)
        a("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
        a("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
        a("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
          help="schedule the next step while the current one runs (default: on with CUDA)")
        a("--num-scheduler-steps", type=int, default=1,
          help="CPU: while every running request decodes greedily and nothing waits, one "
               "schedule runs up to this many forward passes (each feeding its tokens to the "
               "next), so the engine's per-step host work is paid once for them; tokens then "
               "stream in groups of up to this many")
        a("--scheduling-policy", default="fcfs", choices=list(REQUEST_QUEUES),
          help="fcfs: arrival order; priority: lower request priority first (ties by arrival),"
               " preempting less urgent running requests when slots or blocks run out")
        a("--preemption-mode", default="recompute", choices=list(PREEMPTION_MODES),
          help="recompute: a preempted request's KV is dropped and recomputed; swap: copied to "
               "host memory (--swap-space) and back, recompute when that is full")
        a("--swap-space", type=float, default=None,
          help="GiB of host memory for swapped KV (with --preemption-mode swap; default 4)")
        a("--max-prefill-tokens-while-decoding", type=int, default=None,
          help="prompt tokens per step while requests decode (bounds their inter-token latency;"
               " default: max_num_batched_tokens)")
        a("--max-step-ms-while-decoding", type=float, default=None,
          help="while requests decode, a step takes only the prompt tokens that fit in this "
               "many ms by the step-cost model the scheduler learns (an inter-token latency "
               "target; default: off)")
        a("--gpu-memory-utilization", type=float, default=0.9)
        a("--num-gpu-blocks-override", type=int, default=None)
        a("--kv-cache-memory", type=int, default=None,
          help="KV cache bytes (CPU default 2 GiB; on a GPU a cap on what "
               "--gpu-memory-utilization leaves)")
        from servelm.attention import ATTENTION_BACKENDS
        from servelm.executor import EXECUTORS
        from servelm.quantization import QUANTIZATION_METHODS
        a("--attention-backend", default="auto", choices=["auto", *ATTENTION_BACKENDS],
          help="auto: triton on CUDA, else the torch reference")
        a("--enforce-eager", action="store_true",
          help="no CUDA graphs, and on the CPU no C decode step: every step runs PyTorch ops")
        a("--threads", type=int, default=None,
          help="CPU threads for the math (default: the CPUs this process may use, honouring "
               "its affinity and a cgroup CPU quota); the API process keeps off them where "
               "CPUs are left over")
        a("--max-logprobs", type=int, default=20)
        a("--skip-tokenizer-init", action="store_true")
        a("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
          help="auto: the model dtype; bfloat16: bf16 values whatever the model dtype (half "
               "the KV bytes of an fp32 model on the CPU); fp8 (= fp8_e4m3): e4m3 with a scale "
               "per token and kv head, about half the KV bytes (twice the tokens in the same "
               "memory)")
        from servelm.kv_eviction import KV_EVICTION_POLICIES
        a("--kv-eviction", default="none", choices=list(KV_EVICTION_POLICIES),
          help="KV eviction, each request keeping --kv-eviction-budget tokens so generation "
               "may run past max_model_len: streaming (the first --sink-tokens and the most "
               "recent, StreamingLLM), h2o (sinks, --kv-recent-tokens recent ones and those "
               "with the most attention so far, H2O)")
        a("--kv-eviction-budget", type=int, default=None,
          help="tokens of KV a request keeps under --kv-eviction (default 512)")
        a("--sink-tokens", type=int, default=None,
          help="--kv-eviction: the first tokens always kept (default 4; 0: a naive window)")
        a("--kv-recent-tokens", type=int, default=None,
          help="h2o: the recent tokens always kept (default: half of the budget past the sinks)")
        a("--quantization", "-q", default=None, choices=list(QUANTIZATION_METHODS),
          help="how linear layers store and apply weights: fp8 (W8A8), int8/int4 (weight-only, "
               "quantized at load), gptq/awq (such checkpoints, detected), gguf (a .gguf's "
               "blocks; the default for .gguf on CUDA), none (dense; a .gguf dequantized)")
        a("--quantization-group-size", type=int, default=None,
          help="int4/int8: input columns per scale (default 128; -1: one per row)")
        a("--quantize-lm-head", action="store_true",
          help="fp8/int8/int4: quantize the lm_head too (a tied head gets its own copy)")
        a("--speculative-config", default=None,
          help='speculative decoding, JSON with vLLM\'s keys, e.g. \'{"method": "ngram", '
               '"num_speculative_tokens": 4, "prompt_lookup_max": 4}\', \'{"method": '
               '"draft_model", "model": PATH, "num_speculative_tokens": 4}\' or \'{"method": '
               '"layer_skip", "draft_layers": 8, "num_speculative_tokens": 4}\'')
        a("--early-exit-config", default=None,
          help='early exit at decode steps, JSON: {"threshold": 0.9, "min_layer": 12, '
               '"criterion": "max_prob" (or "margin"), "exit_layers": [..] (optional)}: a token '
               'whose confidence after a candidate layer reaches the threshold takes that '
               "layer's logits; later layers get KV from its exit state")
        a("--structured-outputs-config", default=None,
          help='structured outputs, JSON: {"backend": "xgrammar", "disable_any_whitespace": '
               'false, "compile_timeout_s": 10, "max_cached_grammars": 1024, "mask_process": '
               '"auto"} (mask_process: grammars compiled and token masks filled in a process of '
               'their own, beside the engine\'s host work; auto = on CUDA with the model in the '
               "engine's process)")
        a("--distributed-executor-backend", default=None, choices=list(EXECUTORS),
          help="how model workers run: uni (the engine core's own process; the default for "
               "one rank), mp (a worker process per further rank; the default for more)")
        a("--tensor-parallel-size", "-tp", type=int, default=1,
          help="ranks a model's layers are split over (Megatron-style: heads and MLP columns; "
               "NCCL on GPUs, rank r on cuda:r; gloo on the CPU)")
        a("--pipeline-parallel-size", "-pp", type=int, default=1,
          help="pipeline stages, each a share of the layers on its own ranks; as many steps "
               "of different requests in flight through them")
        a("--data-parallel-size", "-dp", type=int, default=1,
          help="engine replicas behind one API server (servelm serve), each with its own "
               "tensor-parallel ranks; requests go to the replica that served their prompt "
               "prefix unless it is much busier than the least-loaded one")
        a("--cpu-offload-gb", type=float, default=0.0,
          help="GiB of the first layers' weights kept in (pinned) host memory and streamed to "
               "the GPU ahead of use, double-buffered: a model larger than the GPU serves, at "
               "the speed of the host-to-device copies (dense weights; no CUDA graphs)")
        a("--enable-lora", action="store_true",
          help="serve LoRA adapters (PEFT format): --lora-modules at start, or loaded at run "
               "time (/v1/load_lora_adapter); a request picks one by its model name")
        a("--max-loras", type=int, default=1,
          help="adapters on the device at once (and in one batch); others wait in host memory")
        a("--max-lora-rank", type=int, default=16, help="the largest adapter rank accepted")
        a("--max-cpu-loras", type=int, default=None,
          help="adapters kept in host memory (default: --max-loras); the least recently used "
               "are read from disk again when asked for")
        a("--disable-custom-all-reduce", action="store_true",
          help="tensor parallel on GPUs: NCCL for every all-reduce, instead of the one-shot "
               "all-reduce over NVLink peer memory that small (decode) all-reduces use")

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})
