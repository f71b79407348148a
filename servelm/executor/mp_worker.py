"""One worker process of the ``mp`` executor: rank r >= 1 of the model's ranks. It joins the
process group, builds its ModelRunner on its shard, then runs what the driver (rank 0, in the
engine's process) sends over its connection: every step the driver runs, in the same order, so
the collectives inside the forward pass meet. It reports an error over the connection and
exits; it also exits when the driver goes (the connection closes, or its parent changes)."""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import traceback
from typing import Any

logger = logging.getLogger(__name__)

# connection messages: driver -> worker (method, args, reply?) or None (stop);
# worker -> driver ("joined" | "ready" | "ok" | "error", payload)


def rank_config(config: Any, rank: int) -> Any:
    """The EngineConfig rank ``rank`` runs with: its own GPU, or its share of the CPU threads."""
    ws = config.parallel.world_size
    if config.device.startswith("cuda"):  # the GPUs from the replica's first one on
        base = int(config.device.partition(":")[2] or 0)
        return dataclasses.replace(config, device=f"cuda:{base + rank}")
    import torch
    threads = max(1, (config.threads or torch.get_num_threads()) // ws)
    return dataclasses.replace(config, threads=threads)


def rank_cpus(config: Any, rank: int) -> list[int]:
    """The CPUs a CPU rank keeps to: its slice of the engine's, when there are enough."""
    t, cpus = config.threads, list(config.cpus)
    return cpus[rank * t:(rank + 1) * t] if t >= 1 and len(cpus) >= config.parallel.world_size * t else []


class RankCalls:
    """The calls the driver makes on every rank (the Executor contract's, runner-side). A
    worker's steps overlap as the driver's do under asynchronous scheduling: step N+1 is
    launched before step N's tokens are landed in this rank's batch (its next inputs come from
    the device), so a worker's host work never idles its GPU while rank 0's runs ahead."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.unlanded: Any = None  # this rank's last launched step (a PendingOutput)

    def call(self, method: str, args: tuple) -> Any:
        if method == "execute":
            prev, self.unlanded = self.unlanded, self.runner.execute_async(*args)
            if prev is not None:
                prev.result()
            return None
        if self.unlanded is not None:  # anything else sees every step landed
            self.unlanded.result()
            self.unlanded = None
        if method == "determine_num_blocks":
            from servelm.worker.memory import determine_num_blocks
            return determine_num_blocks(self.runner)
        if method == "initialize_kv_cache":
            return self.runner.initialize_kv_cache(*args)
        if method == "capture_pending_graph":
            return self.runner.capture_pending_graph()
        raise ValueError(f"unknown worker method {method!r}")


def release_graphs(runner: Any) -> None:
    """Before a rank's communicators close: its device work finished and its CUDA graphs
    (which hold NCCL work captured in them) freed."""
    import gc

    import torch
    if runner is None or runner.device.type != "cuda":
        return
    torch.cuda.synchronize(runner.device)
    runner.graphs = runner.tree_graphs = None
    gc.collect()


def _exit_with_driver(driver_pid: int) -> None:
    """A thread that ends this process once the driver's is gone, even while the main thread
    waits in a collective that will never complete."""
    import threading
    import time

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != driver_pid:
                os._exit(1)

    threading.Thread(target=watch, name="servelm-driver-watch", daemon=True).start()


def worker_main(conn: Any, rank: int) -> None:
    """Rank ``rank``'s life: the driver sends (config, store host, store port, log level)
    first, then calls."""
    _exit_with_driver(os.getppid())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the driver decides
    config, host, port, log_level = conn.recv()
    logging.basicConfig(level=log_level,
                        format=f"%(levelname)s %(name)s[rank {rank}]: %(message)s")
    try:
        from servelm.distributed.init import make_groups, make_store
        cfg = rank_config(config, rank)
        if cfg.device == "cpu":
            from servelm.cpu.threads import configure_engine
            configure_engine(cfg.threads)
            cpus = rank_cpus(cfg, rank)
            if cpus:
                os.sched_setaffinity(0, cpus)
        store = make_store(host, port, config.parallel.world_size, rank)
        conn.send(("joined", None))
        pc = config.parallel
        groups = make_groups(store, rank, pc, cfg.device)
        from servelm.worker.model_runner import ModelRunner
        calls = RankCalls(ModelRunner(cfg, groups.tp, groups.pp, groups.world))
        conn.send(("ready", None))
        while True:
            try:
                msg = conn.recv()
            except EOFError:  # the driver is gone
                msg = None
            if msg is None:
                # end the communicators now, and skip the interpreter's teardown: NCCL's
                # destructors at exit wait on peers and can hang
                from servelm.distributed.init import close_group
                release_graphs(calls.runner)
                for g in groups.distinct():
                    close_group(g)
                logging.shutdown()
                os._exit(0)
            method, args, reply = msg
            result = calls.call(method, args)
            if reply:
                conn.send(("ok", result))
    except BaseException as e:  # noqa: BLE001 - reported to the driver, then exit
        try:
            conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        except (OSError, BrokenPipeError):
            pass
        logger.error("worker rank %d failed: %s", rank, traceback.format_exc())
        os._exit(1)  # no atexit/NCCL teardown that could wait on the other ranks


def main() -> None:
    """``python -m servelm.executor.mp_worker``: started by the driver with the address of its
    listener, its auth key and this worker's rank in the environment (a fresh interpreter: no
    fork of the driver's threads, CUDA or OpenMP state, and no re-import of the user's script
    as multiprocessing's spawn would do)."""
    from multiprocessing.connection import Client
    host, port = os.environ["SERVELM_WORKER_ADDR"].rsplit(":", 1)
    rank = int(os.environ["SERVELM_WORKER_RANK"])
    conn = Client((host, int(port)), authkey=bytes.fromhex(os.environ["SERVELM_WORKER_AUTHKEY"]))
    conn.send(rank)
    worker_main(conn, rank)


if __name__ == "__main__":
    main()
