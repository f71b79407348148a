"""Sampling and stopping settings of one request, validated once at the boundary."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

from servelm.structured_output.params import StructuredOutputsParams

_GREEDY_EPS = 1e-5


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0  # every step: the whole output so far
    FINAL_ONLY = 2  # only when finished (offline generate: no per-step output objects)


@dataclass
class SamplingParams:
    """Field names and meanings follow vLLM's SamplingParams (and so OpenAI's API)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    max_tokens: Optional[int] = 16  # None: up to the context limit
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    # token id -> bias added to its logit before sampling (OpenAI's logit_bias)
    logit_bias: Optional[dict[int, float]] = None
    logprobs: Optional[int] = None  # number of top logprobs per output token (0: sampled only)
    prompt_logprobs: Optional[int] = None
    skip_special_tokens: bool = True
    detokenize: bool = True
    # constrain the output to a JSON schema, JSON, a regex, a choice or a grammar (vLLM's
    # StructuredOutputsParams; a dict with its keys is converted)
    structured_outputs: Optional[StructuredOutputsParams] = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # KV eviction (an engine started with kv_eviction): this request's budget of tokens of KV,
    # instead of the engine's kv_eviction_budget
    kv_eviction_budget: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias is not None:
            self.logit_bias = _logit_bias(self.logit_bias)
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if not isinstance(self.structured_outputs, (StructuredOutputsParams, type(None))):
            raise ValueError("structured_outputs must be a StructuredOutputsParams (or a dict of "
                             f"its fields), got {type(self.structured_outputs).__name__}.")
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _check(self, ok: bool, name: str, allowed: str) -> None:
        if not ok:
            raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}.")

    def _validate(self) -> None:
        c = self._check
        c(_is_int(self.n) and 1 <= self.n, "n", "an integer >= 1")
        c(self.kv_eviction_budget is None or (_is_int(self.kv_eviction_budget)
                                              and self.kv_eviction_budget >= 1),
          "kv_eviction_budget", "an integer >= 1 or None")
        # bounded so that every accepted value keeps the sampler's arithmetic finite in fp32
        # (logits / temperature, logits / repetition_penalty)
        c(_is_num(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE, "temperature",
          f"a number in [0, {MAX_TEMPERATURE:g}]")
        c(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]")
        c(_is_int(self.top_k) and self.top_k >= 0, "top_k", "0 or -1 (disabled) or an integer >= 1")
        c(_is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "in [0, 1]")
        c(_is_num(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
          "presence_penalty", "in [-2, 2]")
        c(_is_num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
          "frequency_penalty", "in [-2, 2]")
        c(_is_num(self.repetition_penalty) and 0.01 <= self.repetition_penalty <= 2,
          "repetition_penalty", "in [0.01, 2]")
        c(self.seed is None or (_is_int(self.seed) and -2**63 <= self.seed < 2**64),
          "seed", "None or a 64-bit integer")
        c(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
          "max_tokens", "None or an integer >= 1")
        c(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens "
                             f"({self.max_tokens}).")
        c(all(isinstance(s, str) and s for s in self.stop), "stop", "a list of non-empty strings")
        c(all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
          "stop_token_ids", "a list of token ids >= 0")
        c(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs),
          "logprobs", "None or an integer >= 0")
        c(self.prompt_logprobs is None
          or (_is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs),
          "prompt_logprobs", "None or an integer >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def needs_penalties(self) -> bool:
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)

    def child(self, index: int) -> "SamplingParams":
        """Params of the index-th of n parallel samples: n=1, a distinct derived seed."""
        from dataclasses import replace
        seed = None if self.seed is None else (self.seed + index) % 2**64
        return replace(self, n=1, seed=seed)


MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's limit
MAX_TEMPERATURE = 1e5  # past this the distribution is uniform in fp32 anyway


def _logit_bias(bias: object) -> dict[int, float]:
    """Validated copy of a logit_bias map: int (or integer-string) keys >= 0, finite values in
    [-100, 100], at most 300 entries. Ids are checked against the vocabulary at the engine."""
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must be a map from token id to bias, got {type(bias).__name__}.")
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise ValueError(f"logit_bias must have at most {MAX_LOGIT_BIAS_ENTRIES} entries, got "
                         f"{len(bias)}.")
    out: dict[int, float] = {}
    for k, v in bias.items():
        tid = k
        if isinstance(k, str) and k.strip().isascii() and k.strip().isdigit() and len(k) <= 40:
            tid = int(k)
        if not _is_int(tid) or tid < 0:
            raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {k!r}.")
        if not _is_num(v) or not -100 <= v <= 100:
            raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {v!r} for "
                             f"token {k!r}.")
        out[tid] = float(v)
    return out


def _is_num(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
