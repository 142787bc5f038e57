"""Turn feedback on predictions into labelled examples: only what was trusted or approved, latest correction
wins, conflicts reported."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tuneloop.config import FeedbackConfig, RegistryConfig
from tuneloop.data.clean import clean_text, dedup_key
from tuneloop.data.spreadsheet import spreadsheet_safe
from tuneloop.db.schema import ANONYMOUS, FeedbackRecord, PredictionRecord
from tuneloop.feedback.log import PredictionLog

EXAMPLE_COLUMNS = ["text", "label", "source", "prediction_id", "model_version", "feedback_at"]


@dataclass
class FeedbackExamples:
    """Labelled examples from feedback, one per distinct text, and what happened to the rest."""

    examples: pd.DataFrame
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        frame = self.examples.assign(feedback_at=self.examples["feedback_at"].map(lambda t: t.isoformat()))
        if path.suffix.lower() == ".jsonl":  # exact texts; only spreadsheets evaluate cells
            frame.to_json(path, orient="records", lines=True, force_ascii=False)
        else:
            frame.map(spreadsheet_safe).to_csv(path, index=False)


def proposed_label(feedback: FeedbackRecord, prediction: PredictionRecord) -> str | None:
    """The label a piece of feedback would teach: its correction, or the prediction's own label when rated up."""
    if feedback.corrected_label:
        return feedback.corrected_label
    return prediction.label if feedback.rating is not None and feedback.rating > 0 else None


def text_key(prediction: PredictionRecord) -> str:
    """Under which key feedback on this prediction's text is merged with feedback on the same text."""
    return dedup_key(clean_text(prediction.text))


def admitted(
    rows: list[tuple[FeedbackRecord, PredictionRecord]], config: FeedbackConfig
) -> tuple[list[tuple[FeedbackRecord, PredictionRecord]], dict[str, int]]:
    """The feedback allowed to teach, and counts of what was held back.

    Rejected feedback never teaches; approved feedback always does; feedback nobody reviewed teaches when its
    sender was trusted, when `use` is "all", or when `agreement` distinct keys proposed the same label for
    the same text (feedback without a key never counts: anyone can send it). Everything else waits in the review
    queue: one sender, however many times it repeats a correction, cannot teach the model on its own.
    """
    senders: dict[tuple[str, str], set[str]] = {}
    if config.agreement:
        for feedback, prediction in rows:
            label = proposed_label(feedback, prediction)
            if label is not None and feedback.review != "rejected" and feedback.sender != ANONYMOUS:
                senders.setdefault((text_key(prediction), label), set()).add(feedback.sender)

    def agreed(feedback: FeedbackRecord, prediction: PredictionRecord) -> bool:
        key = (text_key(prediction), proposed_label(feedback, prediction) or "")
        return bool(config.agreement) and len(senders.get(key, ())) >= (config.agreement or 0)

    kept, held = [], Counter[str]()
    for feedback, prediction in rows:
        if feedback.review == "rejected":
            held["rejected"] += 1
        elif feedback.review == "approved" or feedback.trusted or config.use == "all" or agreed(feedback, prediction):
            kept.append((feedback, prediction))
        else:
            held["awaiting_review"] += 1
    return kept, {"awaiting_review": held["awaiting_review"], "rejected": held["rejected"]}


def feedback_examples(
    rows: list[tuple[FeedbackRecord, PredictionRecord]], config: FeedbackConfig | None = None
) -> FeedbackExamples:
    """Examples from (feedback, prediction) pairs given oldest first, from the feedback `config` admits.

    Per prediction the latest correction counts; with no correction, an up-rating confirms the predicted
    label. Per distinct text (after cleaning, case-insensitive) the latest example wins; texts that
    received different labels are reported as conflicts.
    """
    config = config or FeedbackConfig()
    include_confirmed = config.include_confirmed
    teaching, held_back = admitted(rows, config)
    latest: dict[str, dict[str, Any]] = {}
    rated_down_without_label = set()
    for feedback, prediction in teaching:
        if feedback.corrected_label:
            latest[prediction.id] = {"label": feedback.corrected_label, "source": "corrected", "at": feedback}
        elif feedback.rating is not None and latest.get(prediction.id, {}).get("source") != "corrected":
            if feedback.rating > 0 and include_confirmed:
                latest[prediction.id] = {"label": prediction.label, "source": "confirmed", "at": feedback}
            elif feedback.rating < 0:
                latest.pop(prediction.id, None)  # "that was wrong" withdraws an earlier confirmation
                rated_down_without_label.add(prediction.id)
    predictions = {p.id: p for _, p in teaching}
    candidates = []
    for prediction_id, chosen in latest.items():
        prediction = predictions[prediction_id]
        text = clean_text(prediction.text)
        if text:
            candidates.append(
                {
                    "text": text,
                    "label": chosen["label"],
                    "source": chosen["source"],
                    "prediction_id": prediction_id,
                    "model_version": prediction.model_version,
                    "feedback_at": chosen["at"].created_at,
                    "order": chosen["at"].id,
                }
            )
    by_text: dict[str, list[dict[str, Any]]] = {}
    for candidate in sorted(candidates, key=lambda c: (c["feedback_at"], c["order"])):
        by_text.setdefault(dedup_key(candidate["text"]), []).append(candidate)
    kept, conflicts = [], []
    for group in by_text.values():
        winner = group[-1]
        labels = Counter(c["label"] for c in group)
        if len(labels) > 1:
            conflicts.append(
                {
                    "text": winner["text"],
                    "labels": dict(labels),
                    "kept_label": winner["label"],
                    "prediction_ids": [c["prediction_id"] for c in group],
                }
            )
        kept.append(winner)
    ordered = sorted(kept, key=lambda c: (c["feedback_at"], c["order"]))
    examples = pd.DataFrame(ordered, columns=pd.Index(EXAMPLE_COLUMNS))
    counts = {
        "feedback_rows": len(rows),
        **held_back,
        "examples": len(examples),
        "corrected": int((examples["source"] == "corrected").sum()),
        "confirmed": int((examples["source"] == "confirmed").sum()),
        "duplicates_merged": len(candidates) - len(kept),
        "conflicts": len(conflicts),
        "rated_down_without_label": len(rated_down_without_label - set(latest)),
    }
    return FeedbackExamples(examples=examples.reset_index(drop=True), conflicts=conflicts, counts=counts)


def labelled_texts(
    rows: list[tuple[FeedbackRecord, PredictionRecord]], label: str, config: FeedbackConfig | None = None
) -> list[str]:
    """The texts whose feedback, as far as `config` admits it, ends up with `label` (latest label per text wins):
    an assistant's reviewed "out of scope" corrections."""
    examples = feedback_examples(rows, config).examples
    return examples.loc[examples["label"] == label, "text"].tolist()


def load_feedback(registry: RegistryConfig, name: str, config: FeedbackConfig) -> FeedbackExamples:
    """The labelled examples in `name`'s feedback that `config` admits, read from the registry's database."""
    prediction_log = PredictionLog(registry.resolved_database_url(), registry.home)
    try:
        return feedback_examples(prediction_log.feedback_for(name), config)
    finally:
        prediction_log.close()
