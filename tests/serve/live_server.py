"""Helpers for server tests: a real uvicorn server on 127.0.0.1 in a thread or in its own process, and a cheap
second version."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import uvicorn

from tuneloop.registry import Registry
from tuneloop.serve.http import uvicorn_config


class LiveServer:
    def __init__(self, app) -> None:
        # The server `tuneloop serve` runs (its protocol and limits), on a free port of this machine only.
        self.server = uvicorn.Server(uvicorn_config(app, app.state.tuneloop.config.serve, host="127.0.0.1", port=0))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def register_copy(config, ref: str = "toy@1"):
    """A new version of toy with the same weights: a cheap second version to swap to."""
    registry = Registry(config.registry)
    source = registry.get(ref)
    return registry.register(
        source.name,
        registry.folder(source),
        base_model=source.base_model,
        data_fingerprint=source.data_fingerprint,
        config=source.config,
        metrics=source.metrics,
        parent=source.ref,
    )


class ServerProcess:
    """`tuneloop serve` in its own process on 127.0.0.1 (killable like a real one); ready when /readyz says so."""

    def __init__(self, *overrides: str, port: int | None = None) -> None:
        self.overrides = overrides
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, seconds: float = 120) -> ServerProcess:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tuneloop", "serve", "--port", str(self.port), *self.overrides],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + seconds
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"tuneloop serve exited with {self.process.returncode}: {self.process.stderr.read()}"
                )
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"tuneloop serve was not ready after {seconds}s")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, as in a power cut or the OOM killer."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        """SIGINT: a clean shutdown, which finishes queued requests and flushes the prediction log."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
