"""The whole loop on the tiny model: serve → predict → feedback → retrain → gate → promote → the running
server answers with the new version."""

from __future__ import annotations

import time

import pandas as pd
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from helpers import server_settings, tiny_config, toy_rows
from tuneloop.cli import app as cli
from tuneloop.feedback.log import PredictionLog
from tuneloop.registry import Registry
from tuneloop.serve.app import create_app
from tuneloop.training import classification

GOOD_RECIPE = ["model.head_init=centroids", "train.lr=1e-3", "train.head_lr=1e-2", "train.epochs=6"]


def test_corrections_flow_into_a_promoted_version_that_the_server_then_answers_with(tiny_encoder, tmp_path, database):
    data = tmp_path / "toy.csv"
    pd.DataFrame(toy_rows(per_label=40, seed=3)).to_csv(data, index=False)
    home = tmp_path / "home"
    # Production learned nothing (random head, no real updates), so users have plenty to correct.
    weak = tiny_config(
        tiny_encoder, data, home, "model.head_init=random", "train.lr=1e-9", "train.head_lr=1e-9", "train.epochs=1"
    )
    Registry(weak.registry).promote(classification.run(weak, show_progress=False).version.ref)
    config = server_settings(home)
    stream = [row for row in toy_rows(per_label=30, seed=11)]
    runner = CliRunner()

    with TestClient(create_app(config)) as server:
        corrected, corrected_texts = 0, set()
        for start in range(0, len(stream), 10):
            chunk = stream[start : start + 10]
            answer = server.post("/v1/predict", json={"texts": [r["text"] for r in chunk]}).json()
            assert answer["version"] == 1
            for row, prediction in zip(chunk, answer["predictions"], strict=True):
                if prediction["label"] != row["label"]:
                    sent = server.post(
                        "/v1/feedback",
                        json={"prediction_id": prediction["prediction_id"], "corrected_label": row["label"]},
                    )
                    assert sent.status_code == 201
                    corrected += 1
                    corrected_texts.add(row["text"].casefold())
        assert corrected >= 20

        overrides = [f"registry.home={home}"]
        # The users sent no key, so their corrections wait for an admin: reviewed, then approved by sender.
        queue = runner.invoke(cli, ["feedback", "review", "toy", *overrides])
        assert f"{corrected} feedback rows in" in queue.output, queue.output
        approved = runner.invoke(cli, ["feedback", "approve", "toy", "--sender", "anonymous", *overrides])
        assert approved.exit_code == 0 and f"approved {corrected} feedback rows" in approved.output, approved.output
        exported = runner.invoke(cli, ["feedback", "export", "toy", "--out", str(tmp_path / "fb.csv"), *overrides])
        assert exported.exit_code == 0, exported.output
        assert len(pd.read_csv(tmp_path / "fb.csv")) == len(corrected_texts)  # deduplicated, none lost
        retrained = runner.invoke(cli, ["retrain", "toy", *overrides, *GOOD_RECIPE])
        assert retrained.exit_code == 0, retrained.output
        assert "registered toy@2" in retrained.output
        gated = runner.invoke(cli, ["gate", "toy@2", *overrides])
        assert gated.exit_code == 0, gated.output
        assert "toy@2 promoted" in gated.output

        deadline = time.monotonic() + 60
        while server.post("/v1/predict", json={"texts": ["parcel late"]}).json()["version"] != 2:
            assert time.monotonic() < deadline, "the server never switched to toy@2"
            time.sleep(0.05)

    registry = Registry(config.registry)
    assert registry.get("toy@production").parent == "toy@1"
    log = PredictionLog(config.registry.resolved_database_url(), home)
    assert log.count("toy")["feedback"] == corrected
    log.close()
