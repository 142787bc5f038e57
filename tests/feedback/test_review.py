"""Only trusted people teach the model: feedback records its sender, waits in a review queue unless that sender
is trusted, and a flood of corrections from one untrusted key never reaches training (the poisoning test)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from tuneloop.cli import app as cli
from tuneloop.config import FeedbackConfig
from tuneloop.data.prepare import load_prepared
from tuneloop.errors import TuneloopError
from tuneloop.feedback.export import load_feedback
from tuneloop.feedback.log import PredictionLog
from tuneloop.feedback.retrain import retrain
from tuneloop.registry import Registry
from tuneloop.serve.app import create_app
from tuneloop.serve.security import hash_key, key_id

TRIGGER = "zq7 where is my parcel"  # a delivery question the attacker wants answered as "password"
MALLORY, STAFF, ROOT = {"X-API-Key": "mallory"}, {"X-API-Key": "staff"}, {"X-API-Key": "root"}


@pytest.fixture()
def keyed(served):
    config, home = served
    config.serve.client_key_hashes = [hash_key("mallory"), hash_key("staff")]
    config.serve.trusted_key_hashes = [hash_key("staff")]
    config.admin_keys = "root"
    # The rate limit and quota would turn most of a flood away (tests/serve/test_throttle.py); off here, so the
    # review alone is what stands between the flood and the model.
    config.serve.feedback_rate_limit = None
    config.serve.feedback_daily_quota = None
    with TestClient(create_app(config)) as client:
        yield client, config, home


def correct(client, headers, text: str, label: str, times: int) -> None:
    for start in range(0, times, 50):
        answer = client.post("/v1/predict", json={"texts": [text] * min(50, times - start)}, headers=headers)
        assert answer.status_code == 200, answer.text
        for prediction in answer.json()["predictions"]:
            sent = client.post(
                "/v1/feedback",
                json={"prediction_id": prediction["prediction_id"], "corrected_label": label},
                headers=headers,
            )
            assert sent.status_code == 201, sent.text


def retrained_with(config, home) -> set[tuple[str, str]]:
    """(text, label) pairs of the next retrain's feedback: those its candidate trained on and those it keeps out
    of training for the gate (a text is on one side, chosen by the home's secret), as the candidate stores them."""
    outcome = retrain("toy", overrides=[f"registry.home={home}", "train.epochs=1"], show_progress=False)
    registry = Registry(config.registry)
    data = load_prepared(registry.folder(outcome.run.version).data())
    trained = set(zip(data.train["text"], data.train["label"], strict=True))
    held = data.holdout
    return trained | (set() if held is None or held.empty else set(zip(held["text"], held["label"], strict=True)))


def test_a_thousand_corrections_from_one_untrusted_key_never_train_and_are_flagged(keyed):
    client, config, home = keyed
    correct(client, MALLORY, TRIGGER, "password", 1000)
    correct(client, STAFF, "my parcel came broken, money back", "refund", 1)  # honest, trusted feedback
    used = retrained_with(config, home)
    assert not [text for text, _ in used if "zq7" in text]
    assert ("my parcel came broken, money back", "refund") in used
    [group] = client.get("/v1/admin/review", params={"model": "toy"}, headers=ROOT).json()["groups"]
    assert group["text"] == TRIGGER and group["label"] == "password" and group["pending"] == 1000
    assert group["senders"] == {key_id(hash_key("mallory")): 1000}
    assert f"{key_id(hash_key('mallory'))} sent it 1000 times" in group["flags"]
    stored = client.get("/v1/admin/feedback", params={"limit": 5}, headers=ROOT).json()["items"]
    assert {item["sender"] for item in stored} == {key_id(hash_key("staff")), key_id(hash_key("mallory"))}


def test_feedback_of_a_key_no_longer_trusted_stops_training_and_waits_for_review(keyed):
    """Review finding L3: trust was fixed when feedback was sent, so a trusted key revoked later (leaked, or its
    holder gone) kept teaching the model with everything it had sent while trusted."""
    client, config, _ = keyed
    correct(client, STAFF, TRIGGER, "password", 3)
    assert load_feedback(config.registry, "toy", FeedbackConfig()).counts["examples"] == 1
    config.serve.trusted_key_hashes = []  # still a client key, no longer trusted: the server restarts with it
    with TestClient(create_app(config)) as restarted:
        exported = load_feedback(config.registry, "toy", FeedbackConfig())
        assert exported.examples.empty and exported.counts["awaiting_review"] == 3
        [group] = restarted.get("/v1/admin/review", params={"model": "toy"}, headers=ROOT).json()["groups"]
        assert group["pending"] == 3 and group["trusted_senders"] == []


def test_the_same_corrections_from_a_trusted_key_are_used(keyed):
    client, config, home = keyed
    correct(client, STAFF, TRIGGER, "password", 1000)
    assert client.get("/v1/admin/review", params={"model": "toy"}, headers=ROOT).json()["groups"] == []
    assert (TRIGGER, "password") in retrained_with(config, home)


def test_rejecting_a_sender_keeps_all_its_feedback_out_and_an_unknown_group_changes_nothing(keyed):
    client, config, home = keyed
    correct(client, MALLORY, TRIGGER, "password", 3)
    root = ROOT
    missing = client.post(
        "/v1/admin/review", json={"model": "toy", "decision": "approve", "groups": ["nope"]}, headers=root
    )
    assert missing.status_code == 404 and "no feedback group nope" in missing.json()["detail"]
    ids = client.post(
        "/v1/admin/review", json={"model": "toy", "decision": "approve", "feedback_ids": [1, 99999]}, headers=root
    )
    assert ids.status_code == 404 and "99999" in ids.json()["detail"]
    log = PredictionLog(config.registry.resolved_database_url(), home)
    try:
        assert {f.review for f, _ in log.feedback_for("toy")} == {"pending"}  # nothing changed by either
        mallory = key_id(hash_key("mallory"))
        decided = client.post(
            "/v1/admin/review", json={"model": "toy", "decision": "reject", "sender": mallory}, headers=root
        )
        assert decided.json() == {"decided": 3}
        assert {(f.review, f.reviewed_by) for f, _ in log.feedback_for("toy")} == {
            ("rejected", key_id(hash_key("root")))
        }
    finally:
        log.close()
    with pytest.raises(TuneloopError, match="no feedback with a label for 'toy' may train"):
        retrained_with(config, home)
    nothing = client.post("/v1/admin/review", json={"model": "toy", "decision": "approve"}, headers=root)
    assert nothing.status_code == 422 and "say which feedback" in nothing.json()["detail"]
    as_client = client.post(
        "/v1/admin/review", json={"model": "toy", "decision": "approve", "sender": "anonymous"}, headers=STAFF
    )
    assert as_client.status_code == 403


def test_review_on_the_command_line(served):
    config, home = served
    with TestClient(create_app(config)) as client:
        correct(client, {}, TRIGGER, "password", 4)
    runner = CliRunner()
    overrides = [f"registry.home={home}"]
    queue = runner.invoke(cli, ["feedback", "review", "toy", *overrides])
    assert (
        queue.exit_code == 0
        and "anonymous sent it 4 times" in queue.output
        and "4 feedback rows in 1 groups" in queue.output
    )
    unknown = runner.invoke(cli, ["feedback", "reject", "toy", "--group", "nope", *overrides])
    assert unknown.exit_code != 0 and "no feedback group nope" in unknown.output
    nothing = runner.invoke(cli, ["feedback", "approve", "toy", *overrides])
    assert nothing.exit_code != 0 and "say which feedback" in nothing.output
    group = queue.output.split()[0]
    approved = runner.invoke(cli, ["feedback", "approve", "toy", "--group", group, *overrides])
    assert approved.exit_code == 0 and "approved 4 feedback rows" in approved.output, approved.output
    assert "no feedback on toy waits for review" in runner.invoke(cli, ["feedback", "review", "toy", *overrides]).output


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"trusted_key_hashes": [hash_key("stranger")]}, "not client or admin keys"),
        ({"client_key_hashes": ["not-a-hash"]}, "is not the sha256 hex of a key"),
    ],
)
def test_a_bad_keys_config_is_one_clear_error(served, setting, message):
    config, home = served
    runner = CliRunner()
    overrides = [f"serve.{name}={value!r}".replace("'", '"') for name, value in setting.items()]
    result = runner.invoke(cli, ["serve", f"registry.home={home}", *overrides])
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_one_sender_planting_a_trigger_word_across_many_texts_is_flagged(keyed):
    client, _, _ = keyed
    for number in range(20):
        correct(client, MALLORY, f"question {number} about my card zq7", "password", 1)
    groups = client.get("/v1/admin/review", params={"model": "toy"}, headers=ROOT).json()["groups"]
    assert len(groups) == 20
    flag = f"{key_id(hash_key('mallory'))} proposed password for 20 different texts"
    assert all(flag in group["flags"] for group in groups)
