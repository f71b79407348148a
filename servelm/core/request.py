"""The scheduler's view of one sequence being generated."""
from __future__ import annotations

import enum
from typing import Any, Optional

from servelm.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    SWAPPED = 3  # preempted with its KV copied to host memory (preemption_mode="swap")
    # Everything above this line is unfinished.
    FINISHED_STOPPED = 10  # EOS, stop token id or stop string
    FINISHED_LENGTH = 11  # max_tokens or max_model_len reached
    FINISHED_ABORTED = 12  # cancelled by the client
    FINISHED_IGNORED = 13  # can never fit in the KV cache: finishes as "length", with a reason
    FINISHED_SHED = 14  # the slo policy found its deadline unattainable: HTTP 503

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> Optional[str]:
        return {10: "stop", 11: "length", 12: "abort", 13: "length",
                14: "slo_unattainable"}.get(int(self))


class Request:
    """Token ids, progress and KV blocks of one sequence (one of n samples of a prompt).

    Invariant: tokens [0, num_computed_tokens) have their KV in the blocks ``block_ids``.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_time: float, eos_token_ids: tuple[int, ...] = (),
                 parent_id: Optional[str] = None, priority: int = 0,
                 ttft_slo_ms: Optional[float] = None, tpot_slo_ms: Optional[float] = None,
                 lora_request: Any = None) -> None:
        self.request_id = request_id
        self.parent_id = parent_id  # the user's request id when n > 1 fans out
        self.params = params
        self.arrival_time = arrival_time
        self.priority = priority
        # latency objectives (milliseconds): time to first token, mean time per output token
        self.ttft_slo_ms = ttft_slo_ms
        self.tpot_slo_ms = tpot_slo_ms
        # wall-clock times (time.time()) of the request's life, for SLOs and the dashboard
        self.first_scheduled_time: Optional[float] = None
        self.first_token_time: Optional[float] = None
        self.finished_time: Optional[float] = None
        self.eos_token_ids = eos_token_ids
        self.lora_request = lora_request  # servelm.lora.LoRARequest, or None (the base model)
        # what besides the tokens changes their KV: part of every block's prefix-cache hash
        self.cache_extra_keys: Optional[tuple] = (
            None if lora_request is None else ("lora", lora_request.lora_int_id))
        # the one owner of this sequence's token ids (its own list: n > 1 samples of a prompt
        # arrive with one shared message list)
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.spec_token_ids: list[int] = []  # drafts proposed for the next step
        self.spec_acceptance = 1.0  # recent fraction of its drafts accepted (scheduler's)
        # tokens being sampled by steps in flight (scheduled, output not yet back): with
        # asynchronous scheduling the next step is scheduled before the last one's tokens land
        self.num_output_placeholders = 0
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit length at first scheduling; -1 = not yet
        self.block_ids: list[int] = []
        # block_ids[:num_null_blocks] were released (outside a sliding window; kv_cache.py)
        self.num_null_blocks = 0
        # KV eviction (kv_eviction/): tokens dropped from its cache so far; its cache holds
        # num_computed_tokens - num_evicted tokens, the survivors at positions 0, 1, ...
        self.num_evicted = 0
        self.swapped_kv = None  # kv_cache.SwappedKV while its blocks are in host memory
        self.block_hashes: list[bytes] = []  # chained hashes of the full blocks of all_token_ids
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        # structured outputs: the compiled grammar (set by the engine core before scheduling)
        self.grammar = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.all_token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)

    def slo_met(self) -> Optional[bool]:
        """Whether a finished request met both its SLOs (None: unfinished, or it set none).
        TPOT is the mean over the tokens after the first: (finish - first token) / (n - 1)."""
        if self.ttft_slo_ms is None and self.tpot_slo_ms is None:
            return None
        if not self.is_finished or self.finished_time is None:
            return None
        if self.first_token_time is None or self.status == RequestStatus.FINISHED_SHED:
            return False
        if (self.ttft_slo_ms is not None and
                (self.first_token_time - self.arrival_time) * 1e3 > self.ttft_slo_ms):
            return False
        n = self.num_output_tokens
        if self.tpot_slo_ms is not None and n > 1:
            if (self.finished_time - self.first_token_time) * 1e3 / (n - 1) > self.tpot_slo_ms:
                return False
        return True

    def check_stop(self, max_model_len: int) -> bool:
        """After appending a sampled token: set a finished status if generation must end.

        min_tokens needs no check here: the min_tokens logits processor keeps EOS and stop
        token ids from being sampled until then (the one place it is enforced)."""
        p = self.params
        ids = self.all_token_ids
        num_tokens = len(ids)
        num_out = num_tokens - self.num_prompt_tokens
        last = ids[-1]
        if not p.ignore_eos and last in self.eos_token_ids:
            self.status, self.stop_reason = RequestStatus.FINISHED_STOPPED, None
            return True
        if p.stop_token_ids and last in p.stop_token_ids:
            self.status, self.stop_reason = RequestStatus.FINISHED_STOPPED, last
            return True
        if (p.max_tokens is not None and num_out >= p.max_tokens) or num_tokens >= max_model_len:
            self.status = RequestStatus.FINISHED_LENGTH
            return True
        return False
