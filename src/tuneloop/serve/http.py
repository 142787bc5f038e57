"""The HTTP server around the app: uvicorn, with limits on what one client can hold.

uvicorn closes an idle keep-alive connection, but a connection whose request never finishes arriving
(headers or body sent a byte at a time, or nothing at all: slowloris) is kept forever, and enough of them
take every connection slot. `ReadDeadline` closes a connection whose request (headers and body) has not
fully arrived within `serve.read_timeout_seconds` of the connection opening, or of its previous response.
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


class ReadDeadline(H11Protocol):
    read_timeout: float = 10.0  # set per server by `uvicorn_config`

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.read_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _reading(self) -> bool:
        """The client is still sending this request (or has not begun it)."""
        return self.conn.their_state in (h11.IDLE, h11.SEND_BODY)

    def _too_slow(self) -> None:
        if self._reading() and not self.transport.is_closing():
            log.info("closed a connection from %s: no whole request in %.0fs", self.client, self.read_timeout)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._reading():  # all of it is in: the request runs on its own deadline from here
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
    protocol = type("ServerReadDeadline", (ReadDeadline,), {"read_timeout": settings.read_timeout_seconds})
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": "warning",
        "limit_concurrency": settings.max_connections,
        "timeout_keep_alive": settings.keep_alive_seconds,
        "http": protocol,
        # X-Forwarded-For is read by the app, from serve.trusted_proxies only; uvicorn's own reading would take
        # it from any peer on this machine (its default FORWARDED_ALLOW_IPS), so a client could choose its address.
        "proxy_headers": False,
    }
    return uvicorn.Config(app, **{**options, **overrides})
