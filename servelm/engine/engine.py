"""In-process engine: input processing (tokenize, validate), EngineCore, OutputProcessor."""
from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any, Optional, Union

from servelm.config import EngineArgs, EngineConfig
from servelm.core.step import SchedulerStats
from servelm.engine.core import EngineCore, EngineRequest
from servelm.engine.output_processor import OutputProcessor
from servelm.outputs import RequestOutput
from servelm.sampling_params import SamplingParams
from servelm.structured_output import StructuredOutputsConfig, StructuredOutputsParams

PromptType = Union[str, list[int], dict]


class InputProcessor:
    """Tokenizes and validates prompts against the model's limits."""

    def __init__(self, config: EngineConfig, tokenizer: Any) -> None:
        self.config = config
        self.tokenizer = tokenizer
        # tokens the whole KV cache holds, once the engine has sized it (a longer prompt could
        # never run: refused at admission)
        self.kv_capacity_tokens: Optional[int] = None
        self._max_token_chars: Optional[int] = None  # longest vocabulary string (on first use)
        self._lora_paths: dict[int, str] = {}  # lora_int_id -> its adapter's path (checked)

    def check_priority(self, priority: object) -> None:
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}.")
        if priority != 0 and self.config.scheduler.policy != "priority":
            raise ValueError(f"priority {priority} needs priority scheduling: start the engine "
                             "with scheduling_policy='priority' (--scheduling-policy priority).")

    @staticmethod
    def check_slo(ttft_slo_ms: object, tpot_slo_ms: object) -> None:
        """Latency objectives are positive numbers of milliseconds (or None). Any policy
        accepts them (they are measured: SLO attainment); the slo policy schedules by them."""
        for name, v in (("ttft_slo_ms", ttft_slo_ms), ("tpot_slo_ms", tpot_slo_ms)):
            if v is None:
                continue
            if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                    or v <= 0):
                raise ValueError(f"{name} must be a positive number of milliseconds, got {v!r}.")

    def max_text_chars(self) -> int:
        """The most characters a text of at most max_model_len tokens can have (see
        _check_text_length)."""
        if self._max_token_chars is None:
            vocab = self.tokenizer.get_vocab()
            self._max_token_chars = max((len(t) for t in vocab), default=1) or 1
        return self.config.model.max_model_len * self._max_token_chars

    def _check_text_length(self, text: str) -> None:
        """Refuse, before encoding, a text that must have more tokens than max_model_len: each
        token covers at most as many characters as its vocabulary string has (byte-level and
        byte-fallback strings spell every byte at least once), so a text longer than
        max_model_len times the longest string cannot fit. A 10 MB prompt is then refused in
        microseconds instead of after seconds of tokenizing."""
        limit = self.max_text_chars()
        if len(text) > limit:
            raise ValueError(f"the prompt has {len(text)} characters: more than max_model_len "
                             f"({self.config.model.max_model_len}) tokens of this tokenizer "
                             f"can hold (at most {limit}); shorten the prompt.")

    def check_structured_outputs(self, so: StructuredOutputsParams) -> StructuredOutputsParams:
        """The request's constraint with the engine's defaults filled in, after the backend's
        cheap checks (syntax, unsupported keywords): ValueError (HTTP 400) at once, before
        anything reaches the engine core, which compiles it."""
        if self.config.skip_tokenizer_init:
            raise ValueError("structured outputs need the tokenizer: start the engine without "
                             "skip_tokenizer_init.")
        from servelm.structured_output.backend import backend_class
        cfg = self.config.structured_outputs or StructuredOutputsConfig()
        so = so.with_defaults(cfg)
        backend_class(cfg.backend).validate(so)
        return so

    def process(self, prompt: PromptType, params: SamplingParams,
                add_special_tokens: bool = True, tokenizer: Any = None,
                ) -> tuple[Optional[str], list[int], SamplingParams]:
        """``tokenizer``: a copy of this one to encode with (a second tokenizing thread's)."""
        text: Optional[str] = None
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                text, ids = prompt["prompt"], None
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'.")
        elif isinstance(prompt, str):
            text, ids = prompt, None
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
        else:
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}.")
        if ids is None:
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompt token ids, or a "
                                 "tokenizer=... path.")
            self._check_text_length(text)
            ids = (tokenizer or self.tokenizer).encode(text,
                                                       add_special_tokens=add_special_tokens)
        mc = self.config.model
        if not ids:
            raise ValueError("the prompt is empty: it must have at least one token.")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < mc.vocab_size for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {mc.vocab_size}).")
        max_len = mc.max_model_len
        if len(ids) >= max_len:
            raise ValueError(f"the prompt has {len(ids)} tokens, but max_model_len is {max_len}: "
                             "shorten the prompt (it must leave room for one output token).")
        cap = self.kv_capacity_tokens
        if cap is not None and len(ids) + 1 > cap:
            raise ValueError(f"the prompt has {len(ids)} tokens, but the whole KV cache holds "
                             f"{cap}: it could never run. Shorten the prompt, or give the KV "
                             "cache more memory (gpu_memory_utilization, kv_cache_memory).")
        if any(t >= mc.vocab_size for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids in [0, {mc.vocab_size}).")
        if params.logit_bias and max(params.logit_bias) >= mc.vocab_size:
            raise ValueError(f"logit_bias keys must be token ids in [0, {mc.vocab_size}), got "
                             f"{max(params.logit_bias)}.")
        lp = max(params.logprobs or 0, params.prompt_logprobs or 0)
        if lp > self.config.max_logprobs:
            raise ValueError(f"logprobs ({lp}) must be <= max_logprobs ({self.config.max_logprobs}).")
        if params.kv_eviction_budget is not None:
            self.check_kv_budget(params.kv_eviction_budget)
        if params.structured_outputs is not None:
            params = replace(params, structured_outputs=self.check_structured_outputs(
                params.structured_outputs))
        if params.max_tokens is None:
            params = replace(params, max_tokens=max_len - len(ids))
        if params.top_k > mc.vocab_size:  # same distribution; keeps the sampler's tensors small
            params = replace(params, top_k=0)
        return text, ids, params

    def check_lora(self, lora: Any) -> None:
        """A request's adapter: the engine serves adapters, and this one reads and fits the
        base model (checked once per lora_int_id; an id keeps its path)."""
        if lora is None:
            return
        from servelm.lora import LoRARequest
        if self.config.lora is None:
            raise ValueError("lora_request needs an engine started with enable_lora=True "
                             "(--enable-lora).")
        if not isinstance(lora, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest, got {type(lora).__name__}.")
        known = self._lora_paths.get(lora.lora_int_id)
        if known is not None and known != lora.lora_path:
            raise ValueError(f"lora_int_id {lora.lora_int_id} already names the adapter at "
                             f"{known!r}: other weights need another lora_int_id.")
        if known is None:
            from servelm.lora.peft import check_adapter
            check_adapter(lora.lora_path, self.config.model.hf_config,
                          self.config.lora.max_lora_rank)
            self._lora_paths[lora.lora_int_id] = lora.lora_path

    def check_kv_budget(self, budget: int) -> None:
        """A request's own KV eviction budget: the engine must evict, and the budget must hold
        its sinks and a block, and fit max_model_len with a block to spare."""
        ev, bs = self.config.cache.kv_eviction, self.config.cache.block_size
        if ev is None:
            raise ValueError("kv_eviction_budget needs an engine started with kv_eviction "
                             "('streaming' or 'h2o').")
        lo, hi = max(bs, ev.sink_tokens + 1), self.config.model.max_model_len - bs
        if not lo <= budget <= hi:
            raise ValueError(f"kv_eviction_budget must be in [{lo}, {hi}] (the sinks and a "
                             f"block; max_model_len less a block), got {budget}.")


class Engine:
    def __init__(self, config: EngineConfig, tokenizer: Any = None) -> None:
        from servelm.loader import load_tokenizer
        self.config = config
        mc = config.model
        if tokenizer is None and not config.skip_tokenizer_init:
            tokenizer = load_tokenizer(mc.model, mc.tokenizer, mc.load_format)
        self.tokenizer = tokenizer
        self.core = EngineCore(config, tokenizer)
        self.inputs = InputProcessor(config, tokenizer)
        self.inputs.kv_capacity_tokens = self.core.scheduler.kv.num_blocks * config.cache.block_size
        self.outputs = OutputProcessor(tokenizer)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "Engine":
        return cls(args.create_engine_config())

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    arrival_time: Optional[float] = None, priority: int = 0,
                    add_special_tokens: bool = True, ttft_slo_ms: Optional[float] = None,
                    tpot_slo_ms: Optional[float] = None, lora_request: Any = None) -> None:
        arrival = time.time() if arrival_time is None else arrival_time
        self.inputs.check_priority(priority)
        self.inputs.check_slo(ttft_slo_ms, tpot_slo_ms)
        self.inputs.check_lora(lora_request)
        text, ids, params = self.inputs.process(prompt, params, add_special_tokens)
        child_ids = self.outputs.add_request(request_id, text, ids, params, arrival)
        for i, cid in enumerate(child_ids):
            self.core.add_request(EngineRequest(
                cid, ids, params.child(i) if params.n > 1 else params, arrival,
                parent_id=request_id if params.n > 1 else None, priority=priority,
                ttft_slo_ms=ttft_slo_ms, tpot_slo_ms=tpot_slo_ms, lora_request=lora_request))

    def abort_request(self, request_ids: list[str] | str) -> None:
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            self.core.abort_requests(self.outputs.abort_request(rid))

    def step(self) -> list[RequestOutput]:
        outs, stopped = self.outputs.process(self.core.step())
        if stopped:
            self.core.stop_requests(stopped)
        errors = self.core.take_request_errors()
        if errors:  # requests that cannot run (a grammar that did not compile)
            for rid, _ in errors:
                self.abort_request(self.outputs.child_to_parent.get(rid, rid))
            raise ValueError(f"request {errors[0][0]}: {errors[0][1]}")
        return outs

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def stats(self) -> SchedulerStats:
        return self.core.stats()

    def telemetry(self, since_step: int = -1) -> dict:
        """Recent steps and request timelines (see core/telemetry.py), as the dashboard gets
        them from a server."""
        return self.core.telemetry(since_step)
