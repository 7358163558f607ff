"""Running the app on uvicorn with the limits uvicorn leaves to its user: a deadline for request headers, a
drain on SIGTERM during which ``/health`` says 503 and requests in flight finish, and a bound on all of it.

uvicorn's h11 protocol is used (not httptools, even when installed): the header deadline hooks into it, and it is
the protocol this package's tests run.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import signal
import socket
import time
from types import FrameType
from typing import Any, Protocol

import h11
import uvicorn
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.h11_impl import H11Protocol

from .config import ServerConfig

__all__ = ["Drainable", "run_uvicorn"]

logger = logging.getLogger("deberta_onnx")


class Drainable(Protocol):
    """What the launch needs of the app's state: to be told that the server drains."""

    def start_draining(self) -> None: ...


class _HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol, closing a connection that has not sent a whole request head ``read_timeout_s`` after
    it opened or after the previous response on it (uvicorn waits for headers forever: a client that sends a few
    bytes and stops holds its connection, and its place under ``max_connections``, for good)."""

    read_timeout_s = 10.0  # set per server by run_uvicorn

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.read_timeout_s, self._head_overdue)

    def _disarm(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_overdue(self) -> None:
        self._head_timer = None
        # IDLE: no whole request head since the connection opened or the last response (h11 buffers a part).
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            logger.info("closed a connection from %s: no request head within %g s",
                        f"{self.client[0]}:{self.client[1]}" if self.client else "unknown client", self.read_timeout_s)
            self.transport.close()


class _DrainingServer(uvicorn.Server):
    """On SIGTERM or Ctrl+C: keeps listening while requests are in flight (new ones get 503, ``/health`` 503, so
    that a load balancer takes the server out), then stops as uvicorn does, all within ``shutdown_timeout_s``.
    SIGTERM then ends the process with status 0; a second Ctrl+C quits at once."""

    def __init__(self, config: uvicorn.Config, state: Drainable, shutdown_timeout_s: float) -> None:
        super().__init__(config)
        self.state = state
        self.shutdown_timeout_s = shutdown_timeout_s
        self._drain_started: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGINT:
            self._captured_signals.append(sig)  # Ctrl+C ends as KeyboardInterrupt, once shut down
            if self._drain_started is not None:
                self.force_exit = self.should_exit = True
                return
        # SIGTERM is not re-raised after the shutdown: the process exits 0, as an orchestrator expects.
        if self._drain_started is None:
            self._drain_started = time.monotonic()

    async def on_tick(self, counter: int) -> bool:
        if self._drain_started is not None and not self.should_exit:
            self.state.start_draining()
            left = self.shutdown_timeout_s - (time.monotonic() - self._drain_started)
            if not self.server_state.tasks or left <= 0:
                # uvicorn's own shutdown: close the listener and idle connections, wait for (or cancel) the rest.
                self.config.timeout_graceful_shutdown = max(left, 0.5)  # type: ignore[assignment]
                self.should_exit = True
        return await super().on_tick(counter)


def _log_config() -> dict[str, Any]:
    """uvicorn's logging configuration, with this package's logger on the same handler."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["deberta_onnx"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


def run_uvicorn(app: Any, state: Drainable, config: ServerConfig, sock: socket.socket) -> None:
    """Serves ``app`` on the bound ``sock`` until SIGTERM or Ctrl+C, with ``config``'s connection limits."""
    protocol = type("HeaderDeadlineProtocol", (_HeaderDeadline,), {"read_timeout_s": config.read_timeout_s})
    settings = uvicorn.Config(
        app, lifespan="on", access_log=config.access_log, log_level="info", log_config=_log_config(),
        http=protocol, limit_concurrency=config.max_connections, timeout_keep_alive=config.keep_alive_s,  # type: ignore[arg-type]
        timeout_graceful_shutdown=config.shutdown_timeout_s,  # type: ignore[arg-type]
    )
    _DrainingServer(settings, state, config.shutdown_timeout_s).run(sockets=[sock])
