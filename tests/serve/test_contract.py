"""The server keeps the contract its OpenAPI document states.

schemathesis' own command (`schemathesis run --checks all`) tests a live server with two models and an
assistant, with the server's default limits (the wrong-key throttle included) and a valid admin key, as an
outside client would: generated requests, valid and invalid, for every operation, then sequences of
operations. No answer may be a server error, an undocumented status, header or content type, a body that
disagrees with its schema, a schema-valid request refused, an invalid one accepted, or a key ignored where the
document asks for one. The run is seeded and deterministic, so a CI run is repeatable.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from live_server import LiveServer

from tuneloop.serve.app import create_app
from tuneloop.serve.security import new_key

pytestmark = pytest.mark.fuzz

EXAMPLES_PER_OPERATION = 20
ADMIN_KEY = new_key()  # as `tuneloop keys new` makes them: a short key is refused after a fuzzer's wrong ones


def schemathesis_failures(url: str, folder: Path) -> str | None:
    """Run `schemathesis run --checks all` against `url`; its report when anything failed, else None."""
    command = [
        *(sys.executable, "-m", "schemathesis.cli"),
        *("run", f"{url}/openapi.json", "--checks", "all", "-H", f"X-API-Key: {ADMIN_KEY}"),
        *("--max-examples", str(EXAMPLES_PER_OPERATION), "--seed", "1", "--generation-deterministic"),
        "--no-color",
    ]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=folder)  # its files go there
    return None if finished.returncode == 0 else finished.stdout[-20_000:] + finished.stderr[-5_000:]


@pytest.fixture()
def two_models_and_an_assistant(assistant_setup):
    config, definition = assistant_setup
    config.serve.assistant = definition
    config.admin_keys = ADMIN_KEY
    return config


def test_an_open_server_keeps_its_contract(two_models_and_an_assistant, tmp_path):
    """No client keys: predict, feedback and chat take none (and the document says so); admin needs one."""
    with LiveServer(create_app(two_models_and_an_assistant)) as live:
        report = schemathesis_failures(live.url, tmp_path)
    assert report is None, report


def test_a_keyed_server_keeps_its_contract(two_models_and_an_assistant, tmp_path):
    """Client and admin keys configured; requests carry the admin key, so the admin routes are exercised too."""
    config = two_models_and_an_assistant
    config.client_keys = "client"
    with LiveServer(create_app(config)) as live:
        report = schemathesis_failures(live.url, tmp_path)
    assert report is None, report
