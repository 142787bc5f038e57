"""Helpers for server tests: a real uvicorn server on 127.0.0.1 in a thread, and a cheap second version."""

from __future__ import annotations

import threading
import time

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
