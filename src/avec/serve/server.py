"""Running the app with uvicorn, with bounded connections.

uvicorn times out an idle connection only after a response (``timeout_keep_alive``); a client
that opens a connection and sends nothing, or trickles its request headers, would hold it
forever. :class:`IdleTimeoutH11Protocol` closes a connection that has not sent a complete
request head within ``timeout_keep_alive`` seconds of opening or of its last response, and
:func:`uvicorn_config` also caps concurrent connections (``limit_concurrency``: beyond it
uvicorn answers 503).
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


class IdleTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on receiving each request's line and headers."""

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.timeout_keep_alive, self._idle)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _idle(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a complete request head arrived
            self._disarm()

    def on_response_complete(self) -> None:
        self._arm()  # before the next pipelined request (if any) is handled
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def uvicorn_config(app: Any, *, host: str = "127.0.0.1", port: int = 8000,
                   idle_timeout_s: int = 5, max_connections: int | None = 256,
                   log_level: str = "info") -> uvicorn.Config:
    """A uvicorn config for ``app`` that closes idle or slow-to-start connections after
    ``idle_timeout_s`` and answers 503 beyond ``max_connections`` open connections."""
    return uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          http=IdleTimeoutH11Protocol, timeout_keep_alive=idle_timeout_s,
                          limit_concurrency=max_connections)
