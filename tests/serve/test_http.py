"""The uvicorn server `tuneloop serve` runs: slow or silent clients cannot hold its connections."""

from __future__ import annotations

import socket
import time

import pytest
from live_server import LiveServer

from tuneloop.serve.app import create_app

TIMEOUT = 1.0  # serve.read_timeout_seconds in these tests


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def seconds_until_closed(sock: socket.socket, at_once: bytes = b"", trickle: bytes = b"", limit: float = 8.0) -> float:
    """Seconds until the server closes `sock`: `at_once` is sent first, then one byte of `trickle` every 0.1 s
    (a byte arrives all along: the deadline must not start again with each one)."""
    started = time.monotonic()
    sock.sendall(at_once)
    sock.settimeout(0.1)
    position = 0
    while time.monotonic() - started < limit:
        try:
            if position < len(trickle):
                sock.sendall(trickle[position : position + 1])
                position += 1
            if sock.recv(4096) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - started
    raise AssertionError(f"the server kept the connection open for {limit}s")


HEADERS = (
    b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 900000\r\n\r\n"
)
CASES = {  # (sent at once, then a byte at a time)
    "silent": (b"", b""),
    "headers-a-byte-at-a-time": (b"", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200),
    "body-a-byte-at-a-time": (HEADERS, b'{"texts": ["' + b"a" * 200),
}


@pytest.fixture()
def live(served):
    config, _ = served
    config.serve.read_timeout_seconds = TIMEOUT
    with LiveServer(create_app(config)) as server:
        yield server


@pytest.mark.parametrize("case", CASES)
def test_a_client_whose_request_never_arrives_whole_is_disconnected(live, case):
    """Regression: uvicorn only times out idle keep-alive connections; one that said nothing, or trickled its
    headers or its body, was kept forever, so a few hundred of them held every connection slot (slowloris)."""
    with connect(live.url) as sock:
        assert TIMEOUT * 0.8 < seconds_until_closed(sock, *CASES[case]) < TIMEOUT + 3


def test_a_client_that_sends_its_requests_in_time_is_served_on_one_connection(live):
    with connect(live.url) as sock:
        sock.settimeout(10)
        for _ in range(3):
            time.sleep(TIMEOUT * 0.6)  # each request starts within the deadline, which starts again after an answer
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        assert seconds_until_closed(sock) < TIMEOUT + 3  # and idles out after the last one
