"""`tuneloop train --profile` and `serve.profile=true`: a torch.profiler trace and where the time went."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient
from typer.testing import CliRunner

from helpers import server_settings
from tuneloop.cli import app
from tuneloop.profiling import SUMMARY_FILE, TRACE_FILE
from tuneloop.serve.app import create_app


def test_train_profile_writes_a_trace_and_prints_time_per_stage(tiny_overrides, home):
    result = CliRunner().invoke(app, ["train", "--profile", *tiny_overrides, "train.profile_steps=4"])
    assert result.exit_code == 0, result.output
    assert "where the time went" in result.output
    for stage in ("tokenise", "data", "forward", "backward", "optimizer"):
        assert f"  {stage} " in result.output, result.output
    folder = home / "models" / "toy" / "v1" / "profile"  # registered with the version
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    assert summary["steps"] == 4
    assert set(summary["stages_ms"]) == {"tokenise", "data", "forward", "backward", "optimizer"}
    assert all(ms > 0 for ms in summary["stages_ms"].values())
    assert sum(summary["stages_ms"].values()) <= summary["wall_ms"] * 1.05  # stages do not overlap
    assert summary["top_operators"] and summary["top_operators"][0]["self_cpu_ms"] > 0
    events = json.loads((folder / TRACE_FILE).read_text())["traceEvents"]
    assert {"forward", "backward", "optimizer"} <= {e.get("name") for e in events}


def test_a_run_shorter_than_the_window_still_writes_its_profile(tiny_overrides, home):
    result = CliRunner().invoke(app, ["train", "--profile", *tiny_overrides, "train.epochs=1"])
    assert result.exit_code == 0, result.output
    summary = json.loads((home / "models" / "toy" / "v1" / "profile" / SUMMARY_FILE).read_text())
    assert 0 < summary["steps"] < 30  # train.profile_steps' default


def test_served_batches_are_profiled_then_the_server_runs_unprofiled(served):
    _, home = served
    config = server_settings(home, "serve.profile=true", "serve.profile_batches=3")
    with TestClient(create_app(config)) as client:
        for text in ("refund please", "my parcel", "password reset", "one more after the window"):
            assert client.post("/v1/predict", json={"texts": [text]}).status_code == 200
        [folder] = (home / "profiles").glob("serve-toy-*")
        summary = json.loads((folder / SUMMARY_FILE).read_text())  # written when the window closed
    assert summary["steps"] == 3
    assert {"tokenise", "forward"} <= set(summary["stages_ms"])
    assert (folder / TRACE_FILE).is_file()


def test_a_server_stopped_inside_the_window_writes_what_it_recorded(served):
    _, home = served
    config = server_settings(home, "serve.profile=true", "serve.profile_batches=100")
    with TestClient(create_app(config)) as client:
        assert client.post("/v1/predict", json={"texts": ["refund please"]}).status_code == 200
        assert not (home / "profiles").exists() or not list((home / "profiles").rglob(SUMMARY_FILE))
    [summary] = (home / "profiles").rglob(SUMMARY_FILE)
    assert json.loads(summary.read_text())["steps"] == 1
