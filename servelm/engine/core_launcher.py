"""An engine core process started before its configuration exists, so that its imports (torch,
the engine, transformers' config class of the model: ~5 s of a ~10 s `servelm serve` start on
a 2-core CPU) run while the API process does the same imports and builds that configuration.

`servelm serve` starts one as its first act (``CoreLauncher.for_serve_argv``); the first
single-core engine client hands it ``run_engine_core``'s arguments (``launch``); one nobody
launched is stopped (``close``). Data-parallel replicas spawn their own cores: the API
process sets environment variables (RAY_ADDRESS) for them that a process started earlier
would not see.
"""
from __future__ import annotations

import json
import multiprocessing
import os
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Optional, Sequence

PROCESS_NAME = "servelm-engine-core"


def _preimport(model_hint: Optional[str]) -> None:
    """What every core imports, and the HF config class of the model at ``model_hint`` (an
    unpickled EngineConfig imports it). Best effort: any failure shows later, where it counts."""
    import servelm.engine.core_proc  # noqa: F401  (torch and the engine)
    if not model_hint:
        return
    try:
        with open(os.path.join(model_hint, "config.json")) as f:
            model_type = json.load(f).get("model_type")
        if isinstance(model_type, str):
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING
            CONFIG_MAPPING[model_type]  # imports the module that defines the class
    except Exception:  # noqa: BLE001  (a hint only: no file, not JSON, unknown type)
        pass


def _prestarted_core(conn: Connection, model_hint: Optional[str]) -> None:
    """The process: import, then wait for the arguments (the API process gone: exit)."""
    _preimport(model_hint)
    try:
        args = conn.recv()
    except (EOFError, OSError):
        return
    finally:
        conn.close()
    from servelm.engine.core_proc import run_engine_core
    run_engine_core(*args)


class CoreLauncher:
    """One pre-started core process, taken at most once."""

    def __init__(self, model_hint: Optional[str] = None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=False)[::-1]  # (send end, receive end)
        self._proc: Optional[BaseProcess] = ctx.Process(
            target=_prestarted_core, name=PROCESS_NAME, daemon=True, args=(child, model_hint))
        self._proc.start()
        child.close()

    @classmethod
    def for_serve_argv(cls, argv: Sequence[str]) -> Optional["CoreLauncher"]:
        """A launcher for ``servelm serve ARGV`` (argv after "serve"), or None where the core
        would not be one process started by this one: help, a YAML config (it may set data
        parallel), data parallel. A model that is not a HF directory (a GGUF file, a preset,
        the default) gives no hint: its config needs no transformers class."""
        if any(a in ("-h", "--help") or a.startswith(("--config", "--data-parallel-size",
                                                      "-dp"))
               for a in argv):
            return None
        return cls(_model_hint(argv))

    def launch(self, args: tuple[Any, ...]) -> Optional[BaseProcess]:
        """The waiting process, now running ``run_engine_core(*args)``; None if it was
        launched already or died (the caller spawns a core of its own)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.is_alive():
            self._conn.send(args)
        self._conn.close()
        return proc if proc.is_alive() else None

    def close(self) -> None:
        """Stops the process if nobody took it: at once (it holds nothing but its imports; an
        argument error must not wait for them to finish)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        self._conn.close()
        proc.terminate()
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)


def _model_hint(argv: Sequence[str]) -> Optional[str]:
    """The model directory in serve's arguments: ``--model X`` / ``--model=X``, else the
    first argument after "serve" that is no flag (flags' values are never directories here
    except by accident, and a wrong hint costs only a useless import)."""
    for i, a in enumerate(argv):
        if a == "--model" and i + 1 < len(argv):
            return argv[i + 1] if os.path.isdir(argv[i + 1]) else None
        if a.startswith("--model="):
            v = a.split("=", 1)[1]
            return v if os.path.isdir(v) else None
    if argv and not argv[0].startswith("-") and os.path.isdir(argv[0]):
        return argv[0]
    return None
