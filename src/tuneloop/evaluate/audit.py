"""Training-label audit: which training rows are probably mislabelled, and what their label should be.

Confident learning (Northcutt et al., 2021; cleanlab's `find_label_issues`) compares each row's given label
with out-of-fold predicted probabilities: probabilities from a model that never saw the row. Here that
model is a logistic regression on the packaged sentence encoder's embeddings, one per fold of the data's
k-fold assignment (`data.kfold`, default 5), so an audit of 10k rows takes a minute on 2 cores instead
of k fine-tuning runs. Rows are ranked most suspicious first and written to an editable CSV: a person marks
the ones they confirm, and `data.exclude=FILE` leaves those out of the next training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

from tuneloop.atomic import write_text_atomically
from tuneloop.data.prepare import PreparedData
from tuneloop.data.split import kfold_assignment
from tuneloop.data.spreadsheet import spreadsheet_safe
from tuneloop.errors import TuneloopError
from tuneloop.models.embedder import SentenceEmbedder
from tuneloop.models.encoders import EncoderSource

AUDIT_FILE = "label_issues.csv"
DEFAULT_FOLDS = 5
COLUMNS = ["row", "split", "text", "label", "suggested", "label_probability", "suggested_probability", "confirmed"]


@dataclass(frozen=True)
class LabelAudit:
    issues: pd.DataFrame  # COLUMNS, most suspicious first; `confirmed` empty for a person to fill in
    summary: dict[str, Any]  # as JSON: the data report's label_audit

    def write_csv(self, path: Path) -> None:
        """The issues as CSV, whole or not at all (a person edits this file; a half-written one would lose rows),
        with texts a spreadsheet shows as text (they may be users' approved feedback)."""
        write_text_atomically(Path(path), self.issues.map(spreadsheet_safe).to_csv(index=False))


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, folds: np.ndarray, classes: int) -> np.ndarray:
    """Each row's class probabilities from a logistic regression trained on the other folds."""
    probs = np.zeros((len(labels), classes))
    for fold in np.unique(folds):
        held = folds == fold
        model = LogisticRegression(max_iter=2000, C=10.0).fit(features[~held], labels[~held])
        probs[np.ix_(held, model.classes_)] = model.predict_proba(features[held])
    return probs


def find_issues(pool: pd.DataFrame, probs: np.ndarray, labels: list[str]) -> LabelAudit:
    """Rank `pool`'s likely label errors from out-of-fold `probs` (columns in `labels` order)."""
    from cleanlab.filter import find_label_issues  # a second to import: only when auditing

    index = {label: i for i, label in enumerate(labels)}
    given = pool["label"].map(index).to_numpy()
    ranked = find_label_issues(given, probs, return_indices_ranked_by="self_confidence")
    suggested = probs[ranked].argmax(1)
    issues = pd.DataFrame(
        {
            "row": pool["row"].to_numpy()[ranked],
            "split": pool["split"].to_numpy()[ranked],
            "text": pool["text"].to_numpy()[ranked],
            "label": pool["label"].to_numpy()[ranked],
            "suggested": [labels[i] for i in suggested],
            "label_probability": probs[ranked, given[ranked]].round(4),
            "suggested_probability": probs[ranked, suggested].round(4),
            "confirmed": "",
        },
        columns=COLUMNS,
    )
    per_label = issues["label"].value_counts().to_dict()
    summary = {
        "rows_audited": len(pool),
        "flagged": len(issues),
        "share": len(issues) / max(len(pool), 1),
        "flagged_per_label": {label: int(per_label.get(label, 0)) for label in labels},
        "top": issues.head(20).drop(columns="confirmed").to_dict(orient="records"),
    }
    return LabelAudit(issues=issues, summary=summary)


def audit_training_labels(data: PreparedData, encoder: EncoderSource, k: int | None, seed: int) -> LabelAudit:
    """Audit the training and validation rows (the test split is never touched: it scores the model)."""
    k = k or DEFAULT_FOLDS
    pool = pd.concat([data.train.assign(split="train"), data.val.assign(split="val")], ignore_index=True)
    counts = pool["label"].value_counts()
    small = counts[counts < k]
    if len(small):
        listed = ", ".join(f"'{label}' ({n})" for label, n in small.items())
        raise TuneloopError(
            f"label(s) with fewer rows than the audit's {k} folds: {listed}; add rows or set data.kfold lower "
            f"(at least 2)"
        )
    folds = kfold_assignment(pool, k, seed).to_numpy()
    features = SentenceEmbedder(encoder).encode(pool["text"].tolist())
    index = {label: i for i, label in enumerate(data.labels)}
    probs = out_of_fold_probabilities(features, pool["label"].map(index).to_numpy(), folds, len(data.labels))
    audit = find_issues(pool, probs, data.labels)
    audit.summary.update(folds=k, method=f"logistic regression on {encoder.name} embeddings, out of fold")
    return audit
