"""Users' texts are kept for privacy.retention_days at most, and one text or chat session can be erased
everywhere tuneloop copied it; what a registered version was trained on is reported, not rewritten."""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from typer.testing import CliRunner

from tuneloop.cli import app as cli
from tuneloop.config import PrivacyConfig
from tuneloop.data.prepare import load_prepared
from tuneloop.errors import NotFound, TuneloopError
from tuneloop.feedback.log import RESCUE_PREFIX, LoggedPrediction, PredictionLog, new_prediction_id
from tuneloop.feedback.retention import forget, purge
from tuneloop.privacy.mask import masker
from tuneloop.registry import Registry
from tuneloop.serve.app import create_app

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def logged(text: str, days_old: int) -> LoggedPrediction:
    return LoggedPrediction(
        id=new_prediction_id(),
        created_at=NOW - timedelta(days=days_old),
        model_name="toy",
        model_version=1,
        text=text,
        label="refund",
        scores={"refund": 1.0},
    )


def test_purge_removes_what_is_older_than_the_retention_and_keeps_the_rest(served_on_each_database):
    config, home = served_on_each_database
    old, recent = logged("an old message", 40), logged("a recent message", 5)
    log = PredictionLog(config.registry.resolved_database_url(), home)
    log.record([old, recent])
    log.flush()
    log.add_feedback(old.id, corrected_label="delivery")
    log.add_feedback(recent.id, corrected_label="delivery")
    rescued = home / f"{RESCUE_PREFIX}test.jsonl"
    rows = [logged("old and rescued", 60), logged("recent and rescued", 1)]
    rescued.write_text("".join(json.dumps({**vars(r), "created_at": r.created_at.isoformat()}) + "\n" for r in rows))
    with pytest.raises(TuneloopError, match="privacy.retention_days is not set"):
        purge(config.registry, PrivacyConfig(), now=NOW)
    erased = purge(config.registry, PrivacyConfig(retention_days=30), now=NOW)
    assert (erased.predictions, erased.feedback, erased.rescued_rows) == (1, 1, 1)
    assert log.get(old.id) is None and log.get(recent.id) is not None
    assert [f.prediction_id for f, _ in log.feedback_for("toy")] == [recent.id]
    assert [json.loads(line)["text"] for line in rescued.read_text().splitlines()] == ["recent and rescued"]
    log.close()


def test_forget_erases_a_text_or_a_session_everywhere_and_names_versions_trained_on_it(assistant_setup):
    config, definition = assistant_setup
    config.serve.assistant = definition
    with TestClient(create_app(config)) as client:
        said = "my card 4526 0181 5908 3012 was charged twice"  # stored masked: forget finds it as given
        first = client.post("/v1/chat", json={"message": said}).json()
        client.post("/v1/chat", json={"message": "and where is my parcel", "session_id": first["session_id"]})
        other = client.post("/v1/chat", json={"message": "talk to a human"}).json()
        predicted = client.post("/v1/predict", json={"texts": [said], "model": "toy"}).json()["predictions"][0]
        client.post("/v1/feedback", json={"prediction_id": predicted["prediction_id"], "comment": "urgent"})
        conversations = client.app.state.tuneloop.conversations
    erased = forget(config.registry, config.privacy, text=said)
    assert (erased.chat_turns, erased.predictions, erased.feedback) == (1, 3, 1)  # the turn's two, /v1/predict's
    assert conversations.get(first["turn_id"]) is None and len(conversations.recent(first["session_id"], 10)) == 1
    by_session = forget(config.registry, config.privacy, session_id=first["session_id"])
    assert by_session.chat_turns == 1 and conversations.recent(first["session_id"], 10) == []
    assert conversations.get(other["turn_id"]) is not None  # another session is untouched
    with pytest.raises(NotFound, match="nothing was erased"):
        forget(config.registry, config.privacy, session_id=first["session_id"])
    registry = Registry(config.registry)
    trained_on = load_prepared(registry.folder(registry.get("toy@1")).data()).train["text"].iloc[0]
    assert forget(config.registry, config.privacy, text=trained_on).versions_holding_it == ["toy@1"]


def test_forgetting_one_users_text_keeps_another_users_text_that_masks_the_same(served):
    """Review finding L5: forget matched the masked form of the text, which two users' different card numbers
    share ("my card [CARD] was charged twice"), so erasing one user's message erased the other's as well."""
    config, home = served
    mine, theirs = logged("my card 4526 0181 5908 3012 was charged twice", 1), logged("x", 1)
    theirs.text = "my card 4111 1111 1111 1111 was charged twice"
    log = PredictionLog(config.registry.resolved_database_url(), home, mask=masker(PrivacyConfig()))
    log.record([mine, theirs])
    assert log.get(mine.id).text == log.get(theirs.id).text == "my card [CARD] was charged twice"
    log.add_feedback(theirs.id, corrected_label="refund")
    erased = forget(config.registry, PrivacyConfig(), text="my card 4526 0181 5908 3012 was charged twice")
    assert log.get(mine.id) is None and log.get(theirs.id) is not None
    assert (erased.predictions, erased.feedback, erased.kept_unsure) == (1, 0, 0)
    by_id = forget(config.registry, PrivacyConfig(), prediction_id=theirs.id)
    assert (by_id.predictions, by_id.feedback) == (1, 1) and log.get(theirs.id) is None
    log.close()


def test_rows_from_before_digests_holding_only_the_masked_form_are_kept_and_counted(served):
    config, home = served
    log = PredictionLog(config.registry.resolved_database_url(), home)
    said, other = logged("mail me at jane@example.com", 1), logged("mail me at [EMAIL]", 1)
    log.record([said, other])
    log.flush()
    with log.engine.begin() as connection:  # as rows stored before text digests existed
        connection.execute(text("update predictions set text_digest = null"))
    erased = forget(config.registry, PrivacyConfig(), text="mail me at jane@example.com")
    assert (erased.predictions, erased.kept_unsure) == (1, 1) and log.get(other.id) is not None
    log.close()


def test_forget_names_the_run_folders_whose_data_hold_the_text(served):
    """Review finding L5: forget looked only at registered versions' data, not at runs/*/data."""
    config, home = served
    registry = Registry(config.registry)
    data = registry.folder(registry.get("toy@1")).data()
    run = home / "runs" / "toy-20260101-000000"  # a run kept (train.keep_checkpoints) or interrupted
    shutil.copytree(data, run / "data")
    trained_on = load_prepared(data).train["text"].iloc[0]
    erased = forget(config.registry, config.privacy, text=trained_on)
    assert erased.runs_holding_it == [str(run)] and erased.versions_holding_it == ["toy@1"]


def test_privacy_commands_say_what_they_did_and_refuse_what_they_cannot(served):
    _, home = served
    runner = CliRunner()
    before = os.umask(0o022)
    try:
        unset = runner.invoke(cli, ["privacy", "purge", f"registry.home={home}"])
        assert unset.exit_code != 0 and "privacy.retention_days is not set" in unset.output
        purged = runner.invoke(cli, ["privacy", "purge", f"registry.home={home}", "privacy.retention_days=30"])
        assert purged.exit_code == 0 and purged.output.startswith("removed 0 predictions"), purged.output
        missing = runner.invoke(cli, ["privacy", "forget", "--text", "never said", f"registry.home={home}"])
        assert missing.exit_code != 0 and "nothing matches" in missing.output
        both = runner.invoke(cli, ["privacy", "forget", "--text", "x", "--session", "y", f"registry.home={home}"])
        assert both.exit_code != 0 and "exactly one of --text, --session or --prediction" in both.output
        fresh = home.parent / "fresh-home"
        fresh.mkdir()
        made = runner.invoke(cli, ["privacy", "purge", f"registry.home={fresh}", "privacy.retention_days=30"])
        assert made.exit_code == 0, made.output
        assert (fresh / "registry.db").stat().st_mode & 0o077 == 0  # the database it made: owner only
    finally:
        os.umask(before)


def test_a_server_with_a_retention_purges_at_start(served):
    config, home = served
    log = PredictionLog(config.registry.resolved_database_url(), home)
    stale = logged("said long ago", 400)
    stale.created_at = datetime.now(UTC) - timedelta(days=400)
    log.record([stale])
    log.close()
    config.privacy.retention_days = 365
    with TestClient(create_app(config)) as client:
        state = client.app.state.tuneloop
        deadline = datetime.now(UTC) + timedelta(seconds=20)
        while state.prediction_log.get(stale.id) is not None:
            assert datetime.now(UTC) < deadline, "the server did not purge at start"
            time.sleep(0.05)
