"""Feedback → labelled examples: only trusted or approved feedback teaches, latest correction wins, conflicts are
reported, ratings confirm or withdraw."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd

from tuneloop.config import FeedbackConfig
from tuneloop.feedback.export import feedback_examples
from tuneloop.feedback.log import FeedbackRecord, PredictionRecord

START = datetime(2026, 1, 1, tzinfo=UTC)


class Stream:
    """(feedback, prediction) pairs in time order, as PredictionLog.feedback_for returns them."""

    def __init__(self) -> None:
        self.rows = []
        self.predictions = {}

    def predict(self, pid: str, text: str, label: str) -> None:
        self.predictions[pid] = PredictionRecord(
            id=pid, created_at=START, model_name="m", model_version=1, text=text, label=label, scores={}, source="api"
        )

    def say(
        self,
        pid: str,
        corrected_label=None,
        rating=None,
        comment=None,
        sender="key:staff",
        trusted=True,
        review="pending",
    ) -> None:
        number = len(self.rows) + 1
        feedback = FeedbackRecord(
            id=number,
            prediction_id=pid,
            created_at=START + timedelta(minutes=number),
            corrected_label=corrected_label,
            rating=rating,
            comment=comment,
            sender=sender,
            trusted=trusted,
            review=review,
        )
        self.rows.append((feedback, self.predictions[pid]))


def as_pairs(exported):
    return sorted(zip(exported.examples["text"], exported.examples["label"], exported.examples["source"], strict=True))


def test_latest_correction_of_a_prediction_wins():
    s = Stream()
    s.predict("p1", "card not arrived", "refund")
    s.say("p1", corrected_label="delivery")
    s.say("p1", corrected_label="card_arrival")
    s.say("p1", rating=1)  # a later thumbs-up does not undo the correction
    exported = feedback_examples(s.rows)
    assert as_pairs(exported) == [("card not arrived", "card_arrival", "corrected")]
    assert exported.counts["feedback_rows"] == 3 and exported.conflicts == []


def test_same_text_with_different_labels_is_a_reported_conflict_and_the_latest_wins():
    s = Stream()
    s.predict("p1", "Where is my  card?", "x")
    s.predict("p2", "where is my card?", "x")
    s.say("p2", corrected_label="card_arrival")
    s.say("p1", corrected_label="lost_card")
    exported = feedback_examples(s.rows)
    assert as_pairs(exported) == [("Where is my card?", "lost_card", "corrected")]
    [conflict] = exported.conflicts
    assert conflict["labels"] == {"card_arrival": 1, "lost_card": 1} and conflict["kept_label"] == "lost_card"
    assert exported.counts["duplicates_merged"] == 1


def test_up_ratings_confirm_down_ratings_withdraw_and_comments_alone_teach_nothing():
    s = Stream()
    s.predict("p1", "reset password", "password")
    s.predict("p2", "refund please", "delivery")
    s.predict("p3", "hello", "greeting")
    s.say("p1", rating=1)
    s.say("p2", rating=1)
    s.say("p2", rating=-1)
    s.say("p3", comment="meh")
    exported = feedback_examples(s.rows)
    assert as_pairs(exported) == [("reset password", "password", "confirmed")]
    assert exported.counts["rated_down_without_label"] == 1
    assert as_pairs(feedback_examples(s.rows, FeedbackConfig(include_confirmed=False))) == []


def test_save_csv_and_jsonl(tmp_path):
    s = Stream()
    s.predict("p1", "我的快递没到", "refund")
    s.say("p1", corrected_label="delivery")
    exported = feedback_examples(s.rows)
    exported.save(tmp_path / "f.csv")
    exported.save(tmp_path / "f.jsonl")
    assert "我的快递没到,delivery,corrected,p1" in (tmp_path / "f.csv").read_text(encoding="utf-8")
    assert '"label":"delivery"' in (tmp_path / "f.jsonl").read_text(encoding="utf-8")


def test_a_csv_export_cannot_carry_a_spreadsheet_formula(tmp_path):
    """Regression: a user's text '=HYPERLINK(...)' went into the CSV as is and ran in a spreadsheet."""
    s = Stream()
    for pid, text in [("p1", '=HYPERLINK("http://evil.example","refund")'), ("p2", "+1 card"), ("p3", "@me")]:
        s.predict(pid, text, "refund")
        s.say(pid, corrected_label="-delivery")
    exported = feedback_examples(s.rows)
    exported.save(tmp_path / "f.csv")
    exported.save(tmp_path / "f.jsonl")
    cells = pd.read_csv(tmp_path / "f.csv", dtype=str)
    assert not any(str(v).startswith(("=", "+", "-", "@")) for v in cells[["text", "label"]].to_numpy().ravel())
    assert sorted(cells["text"]) == sorted(['\'=HYPERLINK("http://evil.example","refund")', "'+1 card", "'@me"])
    exact = pd.read_json(tmp_path / "f.jsonl", lines=True)["text"]
    assert sorted(exact) == sorted(['=HYPERLINK("http://evil.example","refund")', "+1 card", "@me"])  # jsonl: exact


def test_untrusted_feedback_waits_for_review_however_often_it_is_repeated():
    s = Stream()
    for number in range(50):
        s.predict(f"p{number}", "cancel my order", "cancel_order")
        s.say(f"p{number}", corrected_label="refund", sender="key:mallory", trusted=False)
    s.predict("q", "where is my parcel", "refund")
    s.say("q", corrected_label="delivery")  # a trusted staff key
    exported = feedback_examples(s.rows)
    assert as_pairs(exported) == [("where is my parcel", "delivery", "corrected")]
    assert exported.counts["awaiting_review"] == 50


def test_approved_feedback_teaches_and_rejected_never_does_even_from_a_trusted_key():
    s = Stream()
    s.predict("p1", "cancel my order", "refund")
    s.say("p1", corrected_label="cancel_order", sender="anonymous", trusted=False, review="approved")
    s.predict("p2", "where is my parcel", "refund")
    s.say("p2", corrected_label="refund_now", review="rejected")
    exported = feedback_examples(s.rows)
    assert as_pairs(exported) == [("cancel my order", "cancel_order", "corrected")]
    assert exported.counts["rejected"] == 1
    everything = feedback_examples(s.rows, FeedbackConfig(use="all"))
    assert as_pairs(everything) == [("cancel my order", "cancel_order", "corrected")]


def test_agreement_of_distinct_senders_admits_a_correction_nobody_reviewed():
    s = Stream()
    for number, sender in enumerate(["key:a", "key:a", "key:a", "key:b"]):
        s.predict(f"p{number}", "Cancel my order", "refund")
        s.say(f"p{number}", corrected_label="cancel_order", sender=sender, trusted=False)
    assert feedback_examples(s.rows, FeedbackConfig(agreement=3)).examples.empty  # two senders, however often
    s.predict("p8", "cancel my order", "refund")
    s.say("p8", corrected_label="cancel_order", sender="anonymous", trusted=False)
    # Anyone can send without a key: a key holder plus the keyless are not two senders (the review's L4).
    assert feedback_examples(s.rows, FeedbackConfig(agreement=3)).examples.empty
    s.predict("p9", "cancel my order ", "refund")
    s.say("p9", corrected_label="cancel_order", sender="key:c", trusted=False)
    assert as_pairs(feedback_examples(s.rows, FeedbackConfig(agreement=3))) == [
        ("cancel my order", "cancel_order", "corrected")
    ]
