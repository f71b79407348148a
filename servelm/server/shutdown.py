"""Graceful shutdown: on SIGTERM / Ctrl-C the server stops accepting connections (uvicorn),
refuses new requests on open ones (503), lets requests in flight run for the grace period, and
just before it ends gives each one still running an OpenAI-shaped error: a 503 body, or in a
stream an error event and then ``[DONE]``. Without this the grace period's end cuts them:
plain requests got a text/plain 500 and streams just stopped."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from servelm.engine.async_client import ShuttingDownError

logger = logging.getLogger(__name__)

# requests still running this long before the grace period ends get their error, so it is
# delivered before uvicorn closes the connections
_MARGIN_S = 1.0


def install(server_cls: type, app: Any, grace_s: float) -> type:
    """A subclass of uvicorn's Server whose exit handler starts the app's graceful shutdown."""

    class GracefulServer(server_cls):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit:
                begin(app, grace_s)
            super().handle_exit(sig, frame)

    return GracefulServer


def begin(app: Any, grace_s: float) -> None:
    serving = getattr(app.state, "serving", None)
    if serving is None or serving.shutting_down:
        return
    serving.shutting_down = True
    loop = asyncio.get_event_loop()
    delay = max(0.0, grace_s - min(_MARGIN_S, grace_s / 2))
    logger.warning("servelm: shutting down; requests in flight have %.1f s to finish", delay)
    # begin() runs in uvicorn's signal handler, which can interrupt the loop inside its own
    # bookkeeping: call_later from here once raised "list changed size during iteration" in
    # the loop's timer heap; call_soon_threadsafe is the loop's entry for signal handlers
    loop.call_soon_threadsafe(loop.call_later, delay, _end_requests, serving)


def _end_requests(serving: Any) -> None:
    n = serving.client.end_requests(ShuttingDownError(
        "the server is shutting down and this request did not finish in time; retry it."))
    if n:
        logger.warning("servelm: ended %d request(s) still running at shutdown", n)
