"""Running the app with uvicorn, with bounded connections.

uvicorn times out an idle connection only after a response (``timeout_keep_alive``); a client
that opens a connection and sends nothing, or trickles its request headers, would hold it
forever, and one that sends its head and then trickles the body holds a request open.
:class:`IdleTimeoutH11Protocol` closes a connection that has not sent a complete request head
within ``timeout_keep_alive`` seconds of opening or of its last response, or whose body is not
complete ``body_timeout_s`` seconds after its head; :func:`uvicorn_config` also caps concurrent
connections (``limit_concurrency``: beyond it uvicorn answers 503).
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from avec.serve.limits import ConnectionLimits


class IdleTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with deadlines on receiving each request's head (line and
    headers) and its body."""

    body_timeout_s: float = 60.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def _arm(self, seconds: float | None = None) -> None:
        self._disarm()
        wait = self.timeout_keep_alive if seconds is None else seconds
        self._head_timer = self.loop.call_later(wait, self._idle)

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
        if self.cycle is not cycle and self.cycle is not None:  # a request head arrived
            if self.cycle.more_body:
                self._arm(self.body_timeout_s)  # now its body must arrive in time
            else:
                self._disarm()
        elif self.cycle is not None and self._head_timer is not None \
                and not self.cycle.more_body:
            self._disarm()  # the body is complete

    def on_response_complete(self) -> None:
        self._arm()  # before the next pipelined request (if any) is handled
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


_CONNECTION = ConnectionLimits()  # frozen: the defaults, shared with `avec serve`


def uvicorn_config(app: Any, *, host: str = "127.0.0.1", port: int = 8000,
                   idle_timeout_s: int = _CONNECTION.idle_timeout_s,
                   body_timeout_s: float = _CONNECTION.body_timeout_s,
                   max_connections: int | None = _CONNECTION.max_connections,
                   log_level: str = "info") -> uvicorn.Config:
    """A uvicorn config for ``app`` that closes idle or slow-to-start connections after
    ``idle_timeout_s``, connections whose request body is not in ``body_timeout_s`` after its
    head, and answers 503 beyond ``max_connections`` open connections."""
    protocol = type("BoundedH11Protocol", (IdleTimeoutH11Protocol,),
                    {"body_timeout_s": float(body_timeout_s)})
    return uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          http=protocol, timeout_keep_alive=idle_timeout_s,
                          limit_concurrency=max_connections)
