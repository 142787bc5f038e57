"""The HTTP server around the app: uvicorn, with limits on what one client can hold.

uvicorn closes an idle keep-alive connection, but a connection whose request headers never finish (sent a
byte at a time, or not at all: slowloris) is kept forever, and enough of them take every connection slot.
`HeaderDeadline` closes a connection whose request headers are not complete within
`serve.header_timeout_seconds` of it opening, or of its previous response.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from tuneloop.config import ServeConfig

log = logging.getLogger(__name__)


class HeaderDeadline(H11Protocol):
    header_timeout: float = 10.0  # set per server by `uvicorn_config`

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info(
                "closed a connection from %s: no complete request headers in %.0fs", self.client, self.header_timeout
            )
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are in: the request runs on its own timeout
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection gets the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def uvicorn_config(app: Any, settings: ServeConfig, **overrides: Any) -> uvicorn.Config:
    """How `tuneloop serve` (and the tests' live servers) run the app."""
    protocol = type("ServerHeaderDeadline", (HeaderDeadline,), {"header_timeout": settings.header_timeout_seconds})
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": "warning",
        "limit_concurrency": settings.max_connections,
        "timeout_keep_alive": settings.keep_alive_seconds,
        "http": protocol,
    }
    return uvicorn.Config(app, **{**options, **overrides})
