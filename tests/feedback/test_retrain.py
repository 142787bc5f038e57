"""Retraining data and the retrain stage: frozen test split, feedback supersedes, a stable holdout."""

from __future__ import annotations

import hashlib
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime

import pandas as pd
import pytest

from helpers import tiny_config
from tuneloop.config import FeedbackConfig, PrivacyConfig
from tuneloop.data.clean import clean_text
from tuneloop.data.prepare import PreparedData, load_prepared
from tuneloop.errors import TuneloopError
from tuneloop.feedback.export import FeedbackExamples
from tuneloop.feedback.log import LoggedPrediction, PredictionLog, new_prediction_id
from tuneloop.feedback.retrain import FEEDBACK_ROW, holdout_secret, in_holdout, retrain, retraining_data
from tuneloop.privacy.mask import masker
from tuneloop.registry import Registry
from tuneloop.training import classification


def frame(pairs):
    return pd.DataFrame([{"row": i + 2, "text": t, "label": label} for i, (t, label) in enumerate(pairs)])


def frozen() -> PreparedData:
    splits = {
        "train": frame([("card lost", "lost"), ("where is my card", "arrival"), ("refund me", "refund")]),
        "val": frame([("stolen card", "lost")]),
        "test": frame([("card never came", "arrival"), ("money back", "refund")]),
    }
    return PreparedData(splits=splits, labels=["arrival", "lost", "refund"], report={}, fingerprint="f")


def feedback(pairs) -> FeedbackExamples:
    now = datetime.now(UTC)
    rows = [
        {
            "text": t,
            "label": label,
            "source": "corrected",
            "prediction_id": f"p{i}",
            "model_version": 1,
            "feedback_at": now,
        }
        for i, (t, label) in enumerate(pairs)
    ]
    return FeedbackExamples(examples=pd.DataFrame(rows), counts={"examples": len(rows)})


SECRET = b"0" * 64


def test_holdout_choice_is_stable_and_roughly_the_asked_share():
    texts = [f"message number {i}" for i in range(2000)]
    chosen = [in_holdout(t, 0.3, SECRET) for t in texts]
    assert chosen == [in_holdout(t, 0.3, SECRET) for t in texts]
    assert 0.25 < sum(chosen) / len(chosen) < 0.35
    assert in_holdout("Hello", 0.5, SECRET) == in_holdout("hello", 0.5, SECRET)  # same text after case folding
    assert not any(in_holdout(t, 0.0, SECRET) for t in texts)


def test_the_holdout_is_chosen_by_the_homes_secret_not_by_a_public_hash(tmp_path):
    """Regression: a plain SHA-256 of the text let a sender compute which of its texts the gate never sees."""
    texts = [f"message number {i}" for i in range(400)]
    public = [int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "big") / 2**64 < 0.3 for t in texts]
    first, second = holdout_secret(tmp_path / "a"), holdout_secret(tmp_path / "b")
    assert first != second and holdout_secret(tmp_path / "a") == first  # one per home, kept
    assert (tmp_path / "a" / "holdout.secret").stat().st_mode & 0o777 == 0o600
    by_first = [in_holdout(t, 0.3, first) for t in texts]
    assert by_first != [in_holdout(t, 0.3, second) for t in texts] and by_first != public


def test_processes_making_the_holdout_secret_at_once_all_get_the_same_one(tmp_path):
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        made = set(pool.map(holdout_secret, [tmp_path] * 8))
    assert len(made) == 1 and not [p for p in tmp_path.iterdir() if p.name != "holdout.secret"]


def test_feedback_joins_training_replaces_same_texts_and_never_touches_the_test_split():
    examples = feedback([("WHERE is my card", "lost"), ("Card never came", "lost"), ("new kind of message", "fraud")])
    data = retraining_data(
        frozen(),
        examples,
        FeedbackConfig(holdout=0.0, repeat=2),
        source="toy@1 + feedback",
        secret=SECRET,
        near_duplicate_threshold=0.8,
    )
    assert data.test.equals(frozen().test)
    train = data.train
    assert "where is my card" not in set(train["text"])  # superseded by the user's correction
    assert (train[train["text"] == "WHERE is my card"]["label"] == "lost").all()
    assert (train["row"] == FEEDBACK_ROW).sum() == 4  # two usable feedback examples, repeated twice
    assert "Card never came" not in set(train["text"])  # it is a test text: training on it would leak
    assert data.report["dropped"] == {
        "superseded_by_feedback": 1,
        "feedback_in_test_split": 1,
        "feedback_near_duplicate_of_test": 0,
    }
    assert data.labels == ["arrival", "fraud", "lost", "refund"]
    assert data.fingerprint != "f" and data.holdout.empty


def test_feedback_is_masked_again_as_it_becomes_training_data():
    """Cleaning reveals what the masker could not see in the stored form (an address escaped twice, a card cut by
    soft hyphens); the retraining data is masked after that cleaning (the review's M1)."""
    examples = feedback(
        [
            ("refund to alice@example.com please", "refund"),
            ("card 4111111111111111 lost", "lost"),
            ("write to bob&amp;#64;example.org", "refund"),  # escaped once more: a reader's cleaning decodes it
        ]
    )
    data = retraining_data(
        frozen(),
        examples,
        FeedbackConfig(holdout=0.5),
        source="toy@1 + feedback",
        secret=SECRET,
        near_duplicate_threshold=0.8,
        mask=masker(PrivacyConfig()),
    )
    kept = " ".join(pd.concat([data.train["text"], data.holdout["text"]]))
    assert "[EMAIL]" in kept and "[CARD]" in kept
    for _ in range(3):  # the training data read and cleaned again, by a later retraining or an export
        kept = clean_text(kept)
        assert "@example" not in kept and "4111" not in kept


def test_feedback_reworded_from_a_test_text_stays_out_of_training():
    """Regression: only exact copies of test texts were kept out, so a reworded test row sent as feedback was
    trained on and lifted the gate's score on the very text it had seen."""
    examples = feedback([("card never came!!", "arrival"), ("Card never, ever came", "arrival"), ("hi", "refund")])
    data = retraining_data(
        frozen(), examples, FeedbackConfig(holdout=0.0), source="x", secret=SECRET, near_duplicate_threshold=0.8
    )
    assert "card never came!!" not in set(data.train["text"])
    assert {"Card never, ever came", "hi"} <= set(data.train["text"])  # Jaccard 0.5 with the test text: kept
    assert data.report["dropped"]["feedback_near_duplicate_of_test"] == 1
    assert data.report["leakage"]["test"]["rows"] == 0


def test_held_out_feedback_stays_out_of_training():
    examples = feedback([(f"complaint {i}", "refund") for i in range(40)])
    data = retraining_data(
        frozen(), examples, FeedbackConfig(holdout=0.5), source="x", secret=SECRET, near_duplicate_threshold=0.8
    )
    held = set(data.holdout["text"])
    assert 5 < len(held) < 35
    assert not held & set(data.train["text"])
    assert data.report["feedback"]["holdout"] == len(held)


def log_feedback(config, corrections):
    log = PredictionLog(config.registry.resolved_database_url(), config.registry.home)
    log.record_trusted_senders({"key:staff"})  # as a server whose keys trust it does as it starts
    for text, predicted, right in corrections:
        prediction = LoggedPrediction(
            id=new_prediction_id(),
            created_at=datetime.now(UTC),
            model_name="toy",
            model_version=1,
            text=text,
            label=predicted,
            scores={},
        )
        log.record([prediction])
        log.add_feedback(prediction.id, corrected_label=right, sender="key:staff", trusted=True)
    log.close()


def test_retrain_trains_a_candidate_on_production_data_plus_feedback(served_on_each_database):
    config, home = served_on_each_database
    with pytest.raises(TuneloopError, match="no feedback with a label for 'toy'"):
        retrain("toy", overrides=[f"registry.home={home}"], show_progress=False)
    log_feedback(
        config,
        [(f"refund back money order {i}", "delivery", "refund") for i in range(6)]
        + [("late parcel courier please", "refund", "delivery")],
    )
    outcome = retrain(
        "toy", overrides=[f"registry.home={home}", "train.epochs=1", "name=elsewhere"], show_progress=False
    )
    registry = Registry(config.registry)
    candidate = registry.get("toy@2")
    assert outcome.run.version.ref == "toy@2" and candidate.parent == "toy@1" and candidate.stage == "candidate"
    assert candidate.config["train"]["epochs"] == 1 and candidate.config["model"]["max_length"] == 32
    parent_data, data = (
        load_prepared(registry.folder(registry.get("toy@1")).data()),
        load_prepared(registry.folder(candidate).data()),
    )
    assert data.test.equals(parent_data.test)
    assert outcome.feedback["examples"] == 7 and outcome.feedback["train"] + outcome.feedback["holdout"] == 7
    assert len(data.holdout) == outcome.feedback["holdout"]
    assert len(data.train) == len(parent_data.train) + outcome.feedback["train"]


def test_retrain_from_a_cross_validated_production(served_on_each_database, tiny_encoder):
    """Regression: a production version trained with data.kfold made retrain crash with KeyError."""
    config, home = served_on_each_database
    kfold = tiny_config(tiny_encoder, home.parent / "toy.csv", home, "data.kfold=2", "train.epochs=1")
    version = classification.run(kfold, show_progress=False).version
    Registry(config.registry).promote(version.ref)
    log_feedback(config, [("refund back money order", "delivery", "refund")])
    outcome = retrain("toy", overrides=[f"registry.home={home}", "train.epochs=1"], show_progress=False)
    assert outcome.run.version.parent == version.ref and outcome.run.cross_validation is None


def test_retraining_a_distilled_production_learns_from_the_feedback_not_the_old_teachers(
    served_on_each_database, tiny_encoder
):
    """The teachers answer the corrected texts as they did before the corrections: a retrain that kept them
    would pull the candidate back towards the mistakes the feedback fixes."""
    config, home = served_on_each_database
    student = tiny_config(tiny_encoder, home.parent / "toy.csv", home, "train.teachers=[toy@1]", "train.epochs=1")
    version = classification.run(student, show_progress=False).version
    assert version.config["train"]["teachers"] == ["toy@1"]
    Registry(config.registry).promote(version.ref)
    log_feedback(config, [("refund back money order", "delivery", "refund")])
    outcome = retrain("toy", overrides=[f"registry.home={home}", "train.epochs=1"], show_progress=False)
    assert outcome.run.version.parent == version.ref
    assert outcome.run.version.config["train"]["teachers"] == []
    assert "distillation" not in outcome.run.report
