"""Leases: one retrain or gate per model across processes, renewed while held, free again after a holder is
killed outright; on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tuneloop.config import GateSettings, load_config
from tuneloop.db import open_database
from tuneloop.db.lease import HeldLease, model_job_lease, model_job_running
from tuneloop.errors import Conflict
from tuneloop.feedback.gate import run_gate
from tuneloop.feedback.retrain import retrain


@pytest.fixture()
def engine(tmp_path, database):
    return open_database(database.url_for(tmp_path))


def test_a_held_lease_refuses_a_second_holder_until_it_is_released(engine):
    with model_job_lease(engine, "toy", "retrain toy"):
        with pytest.raises(Conflict, match=r"gate toy@2: refused, 'retrain toy' is running \(holder "):
            model_job_lease(engine, "toy", "gate toy@2").__enter__()
        assert "retrain toy" in (model_job_running(engine, "toy") or "")
        with model_job_lease(engine, "other", "retrain other"):  # another model is not held up
            pass
    assert model_job_running(engine, "toy") is None
    with model_job_lease(engine, "toy", "gate toy@2"):
        pass


def test_a_lease_is_renewed_while_held(engine):
    with HeldLease(engine, "model-jobs:toy", "retrain toy", ttl_seconds=0.6) as held:
        time.sleep(1.5)  # twice the time to live: only renewal keeps it
        with pytest.raises(Conflict):
            HeldLease(engine, "model-jobs:toy", "gate toy@2", ttl_seconds=0.6).__enter__()
        assert not held.lost


HOLD_AND_WAIT = """
import sys, time
from tuneloop.db import open_database
from tuneloop.db.lease import HeldLease
with HeldLease(open_database(sys.argv[1]), "model-jobs:toy", "retrain toy", ttl_seconds=float(sys.argv[2])):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_holder_killed_outright_frees_the_lease_once_it_expires(engine):
    url = engine.url.render_as_string(hide_password=False)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_WAIT, url, "2"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(Conflict):
            model_job_lease(engine, "toy", "gate toy@2").__enter__()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        deadline = time.monotonic() + 30
        while model_job_running(engine, "toy") is not None:
            assert time.monotonic() < deadline, "the killed holder's lease never expired"
            time.sleep(0.2)
        with model_job_lease(engine, "toy", "gate toy@2"):
            pass
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_retrain_and_gate_refuse_while_another_job_holds_the_model(served_on_each_database):
    config, home = served_on_each_database
    engine = open_database(config.registry.resolved_database_url())
    with model_job_lease(engine, "toy", "retrain toy (elsewhere)"):
        with pytest.raises(Conflict, match="'retrain toy \\(elsewhere\\)' is running"):
            retrain("toy", overrides=[f"registry.home={home}"], show_progress=False)
        with pytest.raises(Conflict, match="is running"):
            run_gate("toy@1", load_config(None, [f"registry.home={home}"], GateSettings))
