"""One engine step's messages: scheduler -> runner (SchedulerOutput), runner -> scheduler
(ModelRunnerOutput), core -> client (EngineCoreOutput). Plain ints and lists, no tensors, so the
same objects can cross a process boundary (multi-process executors, the EngineCore process).

Token ids have one owner, the scheduler's ``Request``. The runner keeps a working copy for its
input buffers, written from ``NewRequestData`` when a request (re)joins and then only from the
tokens it samples itself, which are exactly those the scheduler appends, except when a request
stops inside a step's accepted tokens, and then the request is finished and the runner drops it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from servelm.sampling_params import SamplingParams

# token id -> (logprob, rank), one dict per position (rank 1 = most likely)
TokenLogprobs = dict[int, tuple[float, int]]


@dataclass
class NewRequestData:
    """A request the runner has not seen (or sees again after preemption): full state.

    ``token_ids`` may be the scheduler's own list (in-process: no copy): only its first
    ``num_tokens`` entries belong to this message, since the scheduler appends to it later.
    """

    req_id: str
    token_ids: Sequence[int]  # prompt + outputs so far (the first num_tokens entries)
    num_tokens: int
    num_prompt_tokens: int
    params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    # structured outputs: the compiled grammar (an object: in-process executors only; one
    # that crosses processes sends params.structured_outputs and compiles there)
    grammar: Any = None
    num_evicted: int = 0  # KV eviction: as CachedRequestData's (a swapped-in request's)
    lora_request: Any = None  # servelm.lora.LoRARequest: the adapter it runs with, or None


@dataclass
class KVEviction:
    """A request's KV eviction, done by the runner before the step's forward: of the old_len
    tokens its cache held (through its current table), ``keep`` survive, moved to the first
    entries of ``block_ids``, its new table (kv_eviction/compact.py)."""

    old_len: int
    keep: int
    block_ids: list[int]


@dataclass
class CachedRequestData:
    """A request the runner already holds: only what changed."""

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int
    # under a sliding window: the request's first num_null_blocks table entries were released
    # (now kv_cache.NULL_BLOCK; the runner stops pointing them at blocks others may reuse)
    num_null_blocks: int = 0
    # KV eviction: tokens dropped from its cache so far (its token at position p sits at cache
    # index p - num_evicted), and this step's eviction, applied before new_block_ids append
    num_evicted: int = 0
    eviction: Optional[KVEviction] = None


@dataclass
class SchedulerOutput:
    new_reqs: list[NewRequestData]
    cached_reqs: list[CachedRequestData]
    # req id -> tokens to compute this step (spec tokens included), in batch order
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    finished_req_ids: set[str]  # the runner drops their state
    preempted_req_ids: set[str] = field(default_factory=set)
    # req id -> draft tokens to verify this step; they follow the request's last token, and the
    # request is sampled at all len(drafts) + 1 positions
    scheduled_spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)
    # swap preemption: KV blocks to copy before this step's forward, outs first (a block
    # swapped out may be swapped into, or written, in the same step)
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)  # (GPU, host)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host, GPU)
    # cached partial blocks taken copy-on-write (kv_cache.py): (cached block, the request's new
    # block), copied after the swaps and before this step's forward
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    # multi-LoRA: adapters of requests left waiting for a slot, for the workers to read into
    # host memory in the background (the step that first runs one copies it, no disk read)
    lora_prefetch: list = field(default_factory=list)
    # num_scheduler_steps: the decode requests of this schedule (all of them decode, greedy)
    # run this many forward passes, each feeding its tokens to the next; their computed counts
    # already include the extra positions (the scheduler rolls back passes that did not run)
    num_scheduler_steps: int = 1


@dataclass
class ModelRunnerOutput:
    """What one step produced, per request that sampled.

    ``sampled_token_ids[r]`` holds 1..k+1 tokens for a request verifying k drafts (the accepted
    drafts and one more); a request in the middle of its prompt has no entry. Logprobs are those
    of the raw model (before logits processors and temperature), as vLLM returns by default.
    """

    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)  # one per sampled token
    # req id -> (index of the first prompt position these rows are for, rows): row j is the
    # distribution of prompt token start + j + 1 given the tokens before it
    prompt_logprobs_dict: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
    # req id -> draft tokens proposed for the next step (speculative decoding)
    draft_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # early exit: layer count -> tokens of this step that exited after it
    early_exit_tokens: dict[int, int] = field(default_factory=dict)
    # a proposer ran after this step (its drafts, maybe none, are above): the engine lands
    # such a step before scheduling the next, whose input they are
    drafting: bool = False


@dataclass
class EngineCoreOutput:
    """One request's news from one step."""

    req_id: str
    new_token_ids: list[int]
    finish_reason: Optional[str] = None
    stop_reason: int | str | None = None
    new_logprobs: Optional[list[TokenLogprobs]] = None
    # a chunk of prompt logprobs: rows for prompt tokens prompt_logprobs_start + 1, + 2, ...
    prompt_logprobs: Optional[list[TokenLogprobs]] = None
    prompt_logprobs_start: int = 0
    num_cached_tokens: int = 0


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_swapped: int = 0
    # speculative decoding, since start (vLLM's spec_decode_* counters): verifications, draft
    # tokens verified, of those accepted, and accepted ones by draft position (0 = first)
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: list[int] = field(default_factory=list)
    # early exit, since start: layer count -> tokens that exited after it
    early_exit_tokens: dict[int, int] = field(default_factory=dict)
    # servelm serve --cascade: requests answered, and of those escalated to the large model
    cascade_requests: int = 0
    cascade_escalations: int = 0
    # path ("small" | "large") -> [requests, seconds in all] from arrival to the answer's end
    cascade_latency: dict[str, list[float]] = field(default_factory=dict)
    # multi-LoRA (vLLM's lora_requests_info): adapter slots, and the adapters of the running
    # and of the waiting requests (names, sorted)
    max_lora: int = 0
    running_lora_adapters: list[str] = field(default_factory=list)
    waiting_lora_adapters: list[str] = field(default_factory=list)
