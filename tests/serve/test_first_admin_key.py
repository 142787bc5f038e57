"""A newcomer's first `tuneloop serve` makes an admin key, shows it once and keeps only its hash in the home, so
the admin page works after `make demo`; a configured key, or serve.make_admin_key=false, means none is made."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import uvicorn
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from tuneloop.cli import app as cli
from tuneloop.serve.app import create_app
from tuneloop.serve.security import HOME_ADMIN_KEYS, hash_key, make_first_admin_key


def test_the_first_start_makes_one_admin_key_and_keeps_only_its_hash(served):
    config, home = served
    key = make_first_admin_key(config)
    assert key and make_first_admin_key(config) is None  # made once
    stored = home / HOME_ADMIN_KEYS
    assert stored.read_text().split() == [hash_key(key)] and stored.stat().st_mode & 0o777 == 0o600
    with TestClient(create_app(config)) as client:
        assert client.get("/v1/admin/models", headers={"X-API-Key": key}).status_code == 200
        assert client.get("/v1/admin/models", headers={"X-API-Key": "guess"}).status_code == 401


def test_no_key_is_made_when_one_is_configured_or_when_asked_not_to(served):
    config, home = served
    config.admin_keys = "root"
    assert make_first_admin_key(config) is None
    config.admin_keys = None
    config.serve.make_admin_key = False
    assert make_first_admin_key(config) is None and not (home / HOME_ADMIN_KEYS).exists()


def _first_key(config) -> str | None:
    return make_first_admin_key(config)


def test_servers_starting_at_once_make_a_single_key(served):
    config, home = served
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        made = [key for key in pool.map(_first_key, [config] * 6) if key]
    assert len(made) == 1 and (home / HOME_ADMIN_KEYS).read_text().split() == [hash_key(made[0])]
    assert [p.name for p in home.iterdir() if p.name.startswith(f".{HOME_ADMIN_KEYS}")] == []


def test_tuneloop_serve_prints_the_new_key_once(served, monkeypatch):
    _, home = served
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: setattr(self, "started", True))
    first = CliRunner().invoke(cli, ["serve", f"registry.home={home}"])
    assert first.exit_code == 0, first.output
    assert "no admin key was configured, so one was made" in first.output
    key = first.output.split("):")[-1].split()[0]
    assert (home / HOME_ADMIN_KEYS).read_text().split() == [hash_key(key)]
    again = CliRunner().invoke(cli, ["serve", f"registry.home={home}"])
    assert again.exit_code == 0 and "admin key" not in again.output and key not in again.output
