"""The ``ray`` executor: the model's ranks placed by Ray, so one command spans the nodes of a
Ray cluster (``ray start --head`` on one, ``ray start --address=...`` on the others, then
``servelm serve ... --distributed-executor-backend ray`` where RAY_ADDRESS points at it; with
no cluster, a local one is started). Rank 0 (the driver) runs in this process; ranks 1.. are
Ray actors in one placement group (a bundle per rank: a GPU each, or its share of the CPU
threads; bundle 0 is the driver's, on this node), packed onto as few nodes as fit. They join
the same process groups as the ``mp`` executor's workers (a TCP store at this node's IP: NCCL
across nodes goes over the network NCCL finds) and run the same calls (mp_worker.RankCalls) in
submission order. A worker's exception surfaces at the next step; an actor that dies is
reported by a monitor (pings in their own concurrency group), idle or not.

Ray is an optional dependency (``pip install ray``), imported here only."""
from __future__ import annotations

import collections
import logging
import os
import threading
import time
from typing import Any, Optional

from servelm.config import EngineConfig
from servelm.executor.driver import STARTUP_TIMEOUT_S, DriverExecutor, WorkerError
from servelm.executor.mp_worker import RankCalls, rank_config, release_graphs

logger = logging.getLogger(__name__)


class _RankActor:
    """Rank r >= 1 inside a Ray actor (the class is wrapped by ray.remote at run time)."""

    def join(self, config: EngineConfig, rank: int, host: str, port: int, level: int) -> str:
        logging.basicConfig(level=level,
                            format=f"%(levelname)s %(name)s[rank {rank}]: %(message)s")
        import dataclasses

        from servelm.distributed.init import make_store
        cfg = rank_config(config, rank)
        if cfg.device.startswith("cuda"):  # Ray shows this actor its one GPU as cuda:0
            cfg = dataclasses.replace(cfg, device="cuda:0")
        else:
            from servelm.cpu.threads import configure_engine
            configure_engine(cfg.threads)
        self.cfg, self.rank = cfg, rank
        self.store = make_store(host, port, config.parallel.world_size, rank)
        import ray
        return ray.util.get_node_ip_address()

    def build(self) -> None:
        from servelm.distributed.init import make_groups
        from servelm.worker.model_runner import ModelRunner
        pc = self.cfg.parallel
        self.groups = make_groups(self.store, self.rank, pc, self.cfg.device)
        g = self.groups
        self.calls = RankCalls(ModelRunner(self.cfg, g.tp, g.pp, g.world))

    def call(self, method: str, args: tuple) -> Any:
        return self.calls.call(method, args)

    def close(self) -> None:
        from servelm.distributed.init import close_group
        calls = getattr(self, "calls", None)
        release_graphs(calls.runner if calls is not None else None)
        g = getattr(self, "groups", None)
        for grp in g.distinct() if g is not None else []:
            close_group(grp)

    def ping(self) -> bool:
        return True


class RayExecutor(DriverExecutor):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        try:
            import ray
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        except ImportError as e:
            raise ValueError("distributed_executor_backend='ray' needs Ray: pip install ray "
                             "(or use 'mp' on one host).") from e
        from servelm.distributed.init import free_port, make_store
        self._ray = ray
        self._closed = False
        self._groups: list = []
        self.actors: list = []
        self._pending: collections.deque = collections.deque()  # steps' refs not yet seen done
        self._started_ray = not ray.is_initialized()
        if self._started_ray:  # RAY_ADDRESS (a cluster) if set, else a local instance
            ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False,
                     log_to_driver=True, ignore_reinit_error=True)
        pc = config.parallel
        ws = pc.world_size
        cuda = config.device.startswith("cuda")
        threads = rank_config(config, 0).threads if not cuda else 0
        bundle = {"GPU": 1, "CPU": 1} if cuda else {"CPU": max(1, threads)}
        self._pg = placement_group([bundle] * ws, strategy="PACK")
        ready, _ = ray.wait([self._pg.ready()], timeout=60)
        if not ready:
            available = ray.available_resources()
            ray.util.remove_placement_group(self._pg)
            if self._started_ray:
                ray.shutdown()
            raise ValueError(f"the Ray cluster cannot place {ws} ranks of {bundle} each "
                             f"(available: {available}); add nodes or lower "
                             "tensor_parallel_size x pipeline_parallel_size.")
        host = ray.util.get_node_ip_address()
        port = free_port()
        store = make_store(host, port, ws, 0)
        actor_cls = ray.remote(concurrency_groups={"ping": 1})(
            type("ServelmRank", (_RankActor,), {
                "ping": ray.method(concurrency_group="ping")(_RankActor.ping)}))
        try:
            for rank in range(1, ws):
                strategy = PlacementGroupSchedulingStrategy(placement_group=self._pg,
                                                            placement_group_bundle_index=rank)
                self.actors.append(actor_cls.options(
                    num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                    scheduling_strategy=strategy, name=None).remote())
            level = logging.getLogger().getEffectiveLevel()
            nodes = ray.get([a.join.remote(config, r + 1, host, port, level)
                             for r, a in enumerate(self.actors)], timeout=STARTUP_TIMEOUT_S)
            logger.info("ray executor: %d ranks, workers on nodes %s", ws, nodes)
            builds = [a.build.remote() for a in self.actors]
            self._start_driver(config, store, self._groups)
            self._store = store
            self._get(builds, STARTUP_TIMEOUT_S)
        except BaseException:
            self.shutdown()
            raise
        self._monitor_thread = threading.Thread(target=self._monitor, name="servelm-ray-monitor",
                                                daemon=True)
        self._monitor_thread.start()

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        monitor = getattr(self, "_monitor_thread", None)
        if monitor is not None:  # before Ray goes: a ping after ray.shutdown() would start a
            monitor.join(10)     # new local instance (Ray connects on first use)
        if getattr(self, "_thread", None) is not None:
            self._thread.shutdown(wait=False, cancel_futures=True)
        release_graphs(getattr(self, "runner", None))
        ray = self._ray
        try:
            ray.get([a.close.remote() for a in self.actors], timeout=15)
        except Exception:  # noqa: BLE001 - dead or stuck actors are killed below
            pass
        from servelm.distributed.init import close_group
        for g in getattr(self, "_groups", []):
            close_group(g)
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001
                pass
        try:
            ray.util.remove_placement_group(self._pg)
        except Exception:  # noqa: BLE001
            pass
        if self._started_ray:
            ray.shutdown()

    # ---- helpers -----------------------------------------------------------------------
    def _get(self, refs: list, timeout_s: float | None) -> list:
        """ray.get that reports a worker's failure as a WorkerError naming its rank."""
        out = []
        for rank, ref in enumerate(refs, start=1):
            try:
                out.append(self._ray.get(ref, timeout=timeout_s))
            except self._ray.exceptions.GetTimeoutError as e:
                raise WorkerError(f"worker rank {rank} did not answer in {timeout_s} s") from e
            except self._ray.exceptions.RayError as e:
                raise WorkerError(f"worker rank {rank} failed: {e}") from e
        return out

    def _send(self, method: str, args: tuple, reply: bool) -> list:
        refs = [a.call.remote(method, args) for a in self.actors]
        if not reply:  # steps: their failures surface at a later _check
            self._pending.extend(refs)
        return refs

    def _replies(self, refs: list) -> list:
        return self._get(refs, None)

    def _check(self, cause: Optional[BaseException] = None) -> None:
        self._check_steps(wait_s=0.0 if cause is None else 2.0, cause=cause)

    def _check_steps(self, wait_s: float = 0.0, cause: BaseException | None = None) -> None:
        """Steps the workers finished: one that raised (or whose actor died) stops the engine."""
        if not self._pending:
            return
        ready, _ = self._ray.wait(list(self._pending), num_returns=len(self._pending),
                                  timeout=wait_s)
        done = set(ready)
        for ref in ready:
            try:
                self._ray.get(ref)
            except self._ray.exceptions.RayError as e:
                raise WorkerError(f"a worker rank failed: {e}") from (cause or e)
        self._pending = collections.deque(r for r in self._pending if r not in done)

    def _monitor(self) -> None:
        ray = self._ray
        while not self._closed:
            time.sleep(0.5)
            for rank, a in enumerate(self.actors, start=1):
                if self._closed:
                    return
                try:
                    ray.get(a.ping.remote(), timeout=30)
                except Exception as e:  # noqa: BLE001 - dead, or unreachable for 30 s
                    if not self._closed and self.on_failure is not None:
                        self.on_failure(f"worker rank {rank} (a Ray actor) is gone: "
                                        f"{type(e).__name__}")
                    return
