"""Turn feedback on predictions into labelled examples: latest correction wins, conflicts reported."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tuneloop.config import RegistryConfig
from tuneloop.data.clean import clean_text, dedup_key
from tuneloop.db.schema import FeedbackRecord, PredictionRecord
from tuneloop.feedback.log import PredictionLog

EXAMPLE_COLUMNS = ["text", "label", "source", "prediction_id", "model_version", "feedback_at"]
# A cell starting with one of these is a formula to a spreadsheet (CSV injection): users' texts are not.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> Any:
    """A text a spreadsheet shows as text: a leading ' before a formula start (OWASP's advice)."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


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


def feedback_examples(
    rows: list[tuple[FeedbackRecord, PredictionRecord]], include_confirmed: bool = True
) -> FeedbackExamples:
    """Examples from (feedback, prediction) pairs given oldest first.

    Per prediction the latest correction counts; with no correction, an up-rating confirms the predicted
    label. Per distinct text (after cleaning, case-insensitive) the latest example wins; texts that
    received different labels are reported as conflicts.
    """
    latest: dict[str, dict[str, Any]] = {}
    rated_down_without_label = set()
    for feedback, prediction in rows:
        if feedback.corrected_label:
            latest[prediction.id] = {"label": feedback.corrected_label, "source": "corrected", "at": feedback}
        elif feedback.rating is not None and latest.get(prediction.id, {}).get("source") != "corrected":
            if feedback.rating > 0 and include_confirmed:
                latest[prediction.id] = {"label": prediction.label, "source": "confirmed", "at": feedback}
            elif feedback.rating < 0:
                latest.pop(prediction.id, None)  # "that was wrong" withdraws an earlier confirmation
                rated_down_without_label.add(prediction.id)
    predictions = {p.id: p for _, p in rows}
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
        "examples": len(examples),
        "corrected": int((examples["source"] == "corrected").sum()),
        "confirmed": int((examples["source"] == "confirmed").sum()),
        "duplicates_merged": len(candidates) - len(kept),
        "conflicts": len(conflicts),
        "rated_down_without_label": len(rated_down_without_label - set(latest)),
    }
    return FeedbackExamples(examples=examples.reset_index(drop=True), conflicts=conflicts, counts=counts)


def load_feedback(registry: RegistryConfig, name: str, include_confirmed: bool = True) -> FeedbackExamples:
    """The labelled examples in `name`'s feedback, read from the registry's database."""
    prediction_log = PredictionLog(registry.resolved_database_url(), registry.home)
    try:
        return feedback_examples(prediction_log.feedback_for(name), include_confirmed)
    finally:
        prediction_log.close()
