"""What the server does when its engine core process dies (--on-engine-failure): every request
in flight has already failed with a 503 (the client's watchdog) and the cause is logged; then

- ``restart``: a new core starts; until it is ready /health and requests answer 503; then
  serving goes on. More than ``_MAX_RESTARTS`` deaths within ``_WINDOW_S`` is a crash loop:
  the server exits instead.
- ``exit``: the server shuts down and exits with status 1, for a supervisor to restart it.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

from servelm.engine.async_client import AsyncEngineClient, EngineDeadError

logger = logging.getLogger(__name__)

_MAX_RESTARTS = 3
_WINDOW_S = 600.0


class EngineRecovery:
    def __init__(self, app: Any, engine_config: Any, listener: Any, mode: str) -> None:
        self.app = app
        self.engine_config = engine_config
        self.listener = listener
        self.mode = mode
        self._deaths: collections.deque[float] = collections.deque()
        self._task: Any = None

    def attach(self, client: AsyncEngineClient) -> None:
        client.on_dead = self._on_dead

    def _on_dead(self, err: EngineDeadError) -> None:
        now = time.monotonic()
        self._deaths.append(now)
        while self._deaths and now - self._deaths[0] > _WINDOW_S:
            self._deaths.popleft()
        if self.mode == "exit" or len(self._deaths) > _MAX_RESTARTS:
            if self.mode == "restart":
                logger.error("servelm: the engine core died %d times in %.0f s: exiting",
                             len(self._deaths), _WINDOW_S)
            self.exit()
            return
        self._task = asyncio.ensure_future(self._restart())

    async def _restart(self) -> None:
        serving = self.app.state.serving
        old = serving.client
        logger.warning("servelm: restarting the engine core")
        try:
            # a new client, or (data parallel) the same one with its dead replicas restarted
            new = await old.restart(self.listener)
        except Exception:
            logger.exception("servelm: the engine core did not restart: exiting")
            self.exit()
            return
        if new is not old:
            self.attach(new)
            serving.client = new
            await old.shutdown()
        logger.warning("servelm: engine core restarted (pid %s)", new.core_pid)

    def exit(self) -> None:
        """Shut the server down; main_serve returns status 1."""
        self.app.state.exit_code = 1
        server = getattr(self.app.state, "uvicorn_server", None)
        if server is not None:
            server.should_exit = True
        else:
            logger.error("servelm: no server to stop: the engine core is gone")
