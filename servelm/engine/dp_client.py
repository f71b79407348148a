"""Data parallelism: ``data_parallel_size`` engine cores (replicas, each with its own tensor-
parallel workers) behind one API server, as vLLM's and SGLang's DP serving do. Each replica is
an AsyncEngineClient with its own core process; this client has the same surface and routes
each request to one replica (dp_router.py: prefix affinity bounded by load). Metrics' counters
come from every replica's outputs (one shared listener) and the scheduler gauges are summed;
/health is 200 while every replica runs; a replica that dies fails its own requests only, and
the server's recovery restarts that replica (the others keep serving). The dashboard shows
replica 0's steps. On GPUs replica r takes GPUs r * world_size ..; on the CPU its share of the
threads and CPUs. With the ``ray`` executor every replica's ranks are placed by one Ray cluster
(RAY_ADDRESS, or a local instance started here); the replicas' engine cores themselves run on
this host."""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
from typing import Any, AsyncIterator, Callable, Optional, Union

from servelm.config import EngineConfig
from servelm.core.step import SchedulerStats
from servelm.engine.async_client import (AsyncEngineClient, EngineDeadError, OutputListener,
                                         ProcessedPrompt)
from servelm.engine.core_launcher import CoreLauncher
from servelm.engine.dp_router import PrefixRouter, RouterConfig
from servelm.engine.engine import PromptType
from servelm.outputs import RequestOutput
from servelm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


def replica_config(config: EngineConfig, index: int) -> EngineConfig:
    """Replica ``index``'s EngineConfig: one replica (data_parallel_size 1) on its GPUs, or on
    its share of the CPU threads (its own CPUs first, then those left for the API process)."""
    pc = config.parallel
    n, ws = pc.data_parallel_size, pc.world_size
    par = dataclasses.replace(pc, data_parallel_size=1)
    if config.device.startswith("cuda"):
        return dataclasses.replace(config, parallel=par, device=f"cuda:{index * ws}")
    t = max(1, config.threads // n) if config.threads else 0
    cpus = list(config.cpus)
    if t and len(cpus) >= n * t:
        cpus = cpus[index * t:(index + 1) * t] + cpus[n * t:]
    return dataclasses.replace(config, parallel=par, threads=t, cpus=tuple(cpus))


def _share_ray(config: EngineConfig) -> bool:
    """With the ``ray`` executor and no cluster named (RAY_ADDRESS), one local Ray instance
    started here, which every replica's core joins (else each would start its own); True if
    this process started it."""
    if config.parallel.distributed_executor_backend != "ray" or os.environ.get("RAY_ADDRESS"):
        return False
    try:
        import ray
    except ImportError as e:
        raise ValueError("distributed_executor_backend='ray' needs Ray: pip install ray.") from e
    ray.init(include_dashboard=False, ignore_reinit_error=True)
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    return True


async def start_client(config: EngineConfig, tokenizer: Any = None,
                       listener: Optional[OutputListener] = None,
                       launcher: Optional[CoreLauncher] = None
                       ) -> Union[AsyncEngineClient, "DataParallelClient"]:
    """The server's engine client: one core (``launcher``'s pre-started process if it has one
    left), or a replica per data-parallel rank (each spawned here: see core_launcher)."""
    if config.parallel.data_parallel_size > 1:
        return await DataParallelClient.start(config, tokenizer, listener)
    return await AsyncEngineClient.start(config, tokenizer=tokenizer, listener=listener,
                                         launcher=launcher)


def merge_stats(stats: list[SchedulerStats]) -> SchedulerStats:
    """Counts summed over replicas; KV usage their mean (replicas have equal caches)."""
    per_pos: list[int] = []
    for s in stats:
        per_pos += [0] * (len(s.spec_accepted_per_pos) - len(per_pos))
        for i, v in enumerate(s.spec_accepted_per_pos):
            per_pos[i] += v
    return SchedulerStats(
        sum(s.num_running for s in stats), sum(s.num_waiting for s in stats),
        sum(s.kv_cache_usage for s in stats) / max(1, len(stats)),
        sum(s.num_preemptions for s in stats), sum(s.prefix_cache_queries for s in stats),
        sum(s.prefix_cache_hits for s in stats), sum(s.num_swapped for s in stats),
        sum(s.spec_num_drafts for s in stats), sum(s.spec_num_draft_tokens for s in stats),
        sum(s.spec_num_accepted_tokens for s in stats), per_pos,
        {n: sum(s.early_exit_tokens.get(n, 0) for s in stats)
         for n in sorted({n for s in stats for n in s.early_exit_tokens})},
        max_lora=max((s.max_lora for s in stats), default=0),
        running_lora_adapters=sorted({a for s in stats for a in s.running_lora_adapters}),
        waiting_lora_adapters=sorted({a for s in stats for a in s.waiting_lora_adapters}))


class DataParallelClient:
    def __init__(self, config: EngineConfig, replicas: list[AsyncEngineClient],
                 listener: Optional[OutputListener]) -> None:
        self.config = config  # the server's: data_parallel_size replicas
        self.replicas = replicas
        self.listener = listener
        self.tokenizer = replicas[0].tokenizer
        self.inputs = replicas[0].inputs  # the checks of priorities and SLOs
        self.router = PrefixRouter(len(replicas), RouterConfig(block_size=config.cache.block_size))
        self._owner: dict[str, int] = {}  # request id -> its replica
        self._on_dead: Optional[Callable[[EngineDeadError], None]] = None
        for i, r in enumerate(replicas):
            r.on_dead = functools.partial(self._replica_died, i)

    @classmethod
    async def start(cls, config: EngineConfig, tokenizer: Any = None,
                    listener: Optional[OutputListener] = None) -> "DataParallelClient":
        n = config.parallel.data_parallel_size
        ray_started = _share_ray(config)
        if tokenizer is None and not config.skip_tokenizer_init:  # one, shared by the replicas
            from servelm.loader import load_tokenizer
            mc = config.model
            tokenizer = await asyncio.to_thread(load_tokenizer, mc.model, mc.tokenizer,
                                                mc.load_format)
        # every replica's core starts at once (each loads its own copy of the model)
        out = await asyncio.gather(
            *(AsyncEngineClient.start(replica_config(config, i), tokenizer=tokenizer,
                                      listener=listener) for i in range(n)),
            return_exceptions=True)
        started = [r for r in out if isinstance(r, AsyncEngineClient)]
        failed = [r for r in out if isinstance(r, BaseException)]
        if failed:
            await asyncio.gather(*(r.shutdown() for r in started))
            raise failed[0]
        logger.info("data parallel: %d replicas (engine core pids %s)", n,
                    [r.core_pid for r in started])
        client = cls(config, started, listener)
        client._ray_started = ray_started
        return client

    # ---- lifecycle and health -----------------------------------------------------------
    @property
    def on_dead(self) -> Optional[Callable[[EngineDeadError], None]]:
        return self._on_dead

    @on_dead.setter
    def on_dead(self, fn: Optional[Callable[[EngineDeadError], None]]) -> None:
        """Called when a replica died (after its own requests failed)."""
        self._on_dead = fn

    def _replica_died(self, index: int, err: EngineDeadError) -> None:
        logger.error("data-parallel replica %d died: %s", index, err)
        self.router.forget(index)
        if self._on_dead is not None:
            self._on_dead(err)

    async def restart(self, listener: Optional[OutputListener]) -> "DataParallelClient":
        """Start again the replicas that died (the others keep serving); returns self."""
        for i, r in enumerate(self.replicas):
            if r.is_healthy:
                continue
            new = await AsyncEngineClient.start(replica_config(self.config, i),
                                                tokenizer=self.tokenizer, listener=listener)
            new.on_dead = functools.partial(self._replica_died, i)
            self.replicas[i] = new
            await r.shutdown()
            if i == 0:
                self.inputs = new.inputs
        return self

    async def shutdown(self) -> None:
        await asyncio.gather(*(r.shutdown() for r in self.replicas))
        if getattr(self, "_ray_started", False):
            import ray
            ray.shutdown()
            os.environ.pop("RAY_ADDRESS", None)

    @property
    def core_pid(self) -> tuple:
        return tuple(r.core_pid for r in self.replicas)

    @property
    def is_healthy(self) -> bool:
        return all(r.is_healthy for r in self.replicas)

    def check_health(self) -> None:
        """Raises only when no replica can take a request."""
        if not any(r.is_healthy for r in self.replicas):
            self.replicas[0].check_health()
            raise EngineDeadError("no data-parallel replica is running.")

    # ---- requests -----------------------------------------------------------------------
    def _front(self) -> AsyncEngineClient:
        """A live replica for tokenizer work (its tokenizer thread)."""
        return next((r for r in self.replicas if r.is_healthy), self.replicas[0])

    def process_input(self, prompt: PromptType, params: SamplingParams,
                      add_special_tokens: bool = True) -> ProcessedPrompt:
        return self._front().process_input(prompt, params, add_special_tokens)

    async def process_input_async(self, prompt: PromptType, params: SamplingParams,
                                  add_special_tokens: bool = True) -> ProcessedPrompt:
        return await self._front().process_input_async(prompt, params, add_special_tokens)

    async def encode_async(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await self._front().encode_async(text, add_special_tokens)

    async def run_in_tokenizer_thread(self, fn: Any, *args: Any) -> Any:
        return await self._front().run_in_tokenizer_thread(fn, *args)

    async def generate(self, request_id: str, prompt: Union[PromptType, ProcessedPrompt],
                       params: Optional[SamplingParams] = None, **kw: Any
                       ) -> AsyncIterator[RequestOutput]:
        """As AsyncEngineClient.generate, on the replica the router picks."""
        self.check_health()
        if not isinstance(prompt, ProcessedPrompt):
            prompt = self.process_input(prompt, params or SamplingParams(),
                                        kw.pop("add_special_tokens", True))
        kw.pop("add_special_tokens", None)
        loads = [r.num_sequences_in_flight() for r in self.replicas]
        lora = kw.get("lora_request")  # its KV is cached apart: its own prefix affinity
        salt = b"" if lora is None else f"lora:{lora.lora_int_id}".encode()
        i = self.router.route(prompt.token_ids, loads, [r.is_healthy for r in self.replicas],
                              salt)
        self._owner[request_id] = i
        try:
            async for out in self.replicas[i].generate(request_id, prompt, None, **kw):
                yield out
        finally:
            self._owner.pop(request_id, None)

    def replica_of(self, request_id: str) -> Optional[int]:
        """The replica serving a request in flight."""
        return self._owner.get(request_id)

    async def abort(self, request_id: str) -> None:
        i = self._owner.get(request_id)
        if i is not None:
            await self.replicas[i].abort(request_id)

    def end_requests(self, err: BaseException) -> int:
        return sum(r.end_requests(err) for r in self.replicas)

    def num_sequences_in_flight(self) -> int:
        return sum(r.num_sequences_in_flight() for r in self.replicas)

    async def get_stats(self, timeout_s: float = 5.0) -> SchedulerStats:
        return merge_stats(list(await asyncio.gather(
            *(r.get_stats(timeout_s) for r in self.replicas))))

    async def get_telemetry(self, since_step: int = -1, timeout_s: float = 5.0) -> dict:
        return await self.replicas[0].get_telemetry(since_step, timeout_s)
