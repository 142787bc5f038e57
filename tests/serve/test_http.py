"""The uvicorn server `tuneloop serve` runs: slow or silent clients cannot hold its connections."""

from __future__ import annotations

import socket
import time

from live_server import LiveServer

from tuneloop.serve.app import create_app


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def closed_after(sock: socket.socket, trickle: bytes = b"", limit: float = 10.0) -> float:
    """Seconds until the server closes `sock`, sending a byte of `trickle` every 0.2 s meanwhile."""
    started = time.monotonic()
    sock.settimeout(0.2)
    for byte in [trickle[i : i + 1] for i in range(len(trickle))] + [b""] * int(limit / 0.2):
        try:
            if byte:
                sock.sendall(byte)
            if sock.recv(1024) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - started
    raise AssertionError(f"the server kept the connection open for {limit}s")


def test_a_client_that_never_finishes_its_headers_is_disconnected(served):
    """Regression: uvicorn only times out idle keep-alive connections; one that trickles its headers (or
    says nothing) was kept forever, so a few hundred of them held every connection slot (slowloris)."""
    config, _ = served
    config.serve.header_timeout_seconds = 1.0
    with LiveServer(create_app(config)) as live:
        silent, trickling = connect(live.url), connect(live.url)
        assert closed_after(silent) < 5
        assert closed_after(trickling, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100) < 5
        # A client that completes its request in time gets its answer, and may send another after it.
        polite = connect(live.url)
        polite.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        polite.settimeout(10)
        assert polite.recv(4096).startswith(b"HTTP/1.1 200")
        polite.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert polite.recv(4096).startswith(b"HTTP/1.1 200")
        for sock in (silent, trickling, polite):
            sock.close()
