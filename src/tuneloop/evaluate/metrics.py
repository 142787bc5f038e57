"""Classification metrics from labels and predicted probabilities: numbers in the report's types, no plotting."""

from __future__ import annotations

from collections import Counter

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from tuneloop.evaluate.schema import (
    Calibration,
    CalibrationBin,
    ClassScores,
    Confusion,
    LabelSuspects,
    SplitScores,
    Suspect,
)

# How far below the first in-scope score it keeps a rejection threshold stays at most: further than scores of the
# same text differ between batches, close enough not to let in messages scored lower.
SCORE_MARGIN = 1e-4
# The score of a message whose answer is an out-of-scope label: turned away whatever the threshold (below any
# probability or cosine).
REJECTED_SCORE = -2.0


def threshold_rejecting(in_scope: np.ndarray, share: float) -> float:
    """The highest confidence threshold that turns away at most `share` of the in-scope scores (a message is
    turned away when its score is below the threshold): the operating point of an out-of-scope boundary.

    Scores at REJECTED_SCORE are turned away anyway and spend the share first; the threshold stays above them.
    """
    ordered = np.sort(np.asarray(in_scope, dtype=float))
    anyway = int((ordered <= REJECTED_SCORE).sum())
    allowed = max(anyway, int(np.floor(share * len(ordered) + 1e-9)))
    if allowed >= len(ordered):
        return float(np.nextafter(max(ordered[-1], REJECTED_SCORE), np.inf))
    # Halfway between the last score turned away and the first kept: a message scored a hair differently in
    # another batch (padding changes the last digits) stays on the side it was tuned on.
    below = ordered[allowed - 1] if allowed else ordered[0] - 2 * SCORE_MARGIN
    return float(max((below + ordered[allowed]) / 2, ordered[allowed] - SCORE_MARGIN))


def calibration(confidence: np.ndarray, correct: np.ndarray, bins: int) -> Calibration:
    """Expected calibration error with equal-width confidence bins, plus the bins for a reliability diagram."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    rows = []
    ece = 0.0
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > low) & (confidence <= high)
        if not inside.any():
            rows.append(CalibrationBin(low=float(low), high=float(high), count=0, confidence=None, accuracy=None))
            continue
        conf, acc = float(confidence[inside].mean()), float(correct[inside].mean())
        ece += inside.mean() * abs(conf - acc)
        rows.append(
            CalibrationBin(low=float(low), high=float(high), count=int(inside.sum()), confidence=conf, accuracy=acc)
        )
    return Calibration(ece=float(ece), bins=rows)


def label_suspects(
    true_ids: np.ndarray,
    predicted: np.ndarray,
    top: np.ndarray,
    labels: list[str],
    texts: list[str],
    confidence: float,
    listed: int,
) -> LabelSuspects:
    """Rows whose given label the model contradicts (`predicted`, with probability `top`) with at least
    `confidence`, most confident first.

    On real data many such rows are labelling mistakes rather than model errors (in a sample of
    waimai_10k's test errors over a quarter were plainly mislabelled), so the report lists them for a person to
    check instead of counting every one against the model.
    """
    suspect = np.flatnonzero((predicted != true_ids) & (top >= confidence))
    ranked = suspect[np.argsort(-top[suspect], kind="stable")]
    return LabelSuspects(
        confidence=confidence,
        count=int(len(suspect)),
        share=float(len(suspect) / max(len(true_ids), 1)),
        rows=[
            Suspect(
                text=texts[i],
                label=labels[true_ids[i]],
                predicted=labels[predicted[i]],
                probability=float(top[i]),
            )
            for i in ranked[:listed]
        ],
    )


def classification_metrics(
    true_ids: np.ndarray,
    probs: np.ndarray,
    labels: list[str],
    texts: list[str],
    bins: int = 15,
    top_confusions: int = 10,
    examples_per_confusion: int = 3,
    suspect_confidence: float = 0.9,
    suspects_listed: int = 20,
) -> SplitScores:
    """Accuracy, macro/weighted P/R/F1, per-class table, confusion matrix, calibration, top confusions and
    the rows whose label looks wrong."""
    predicted = probs.argmax(1)
    top = probs.max(1)
    ids = list(range(len(labels)))
    p, r, f, support = precision_recall_fscore_support(true_ids, predicted, labels=ids, zero_division=0)
    summary = {}
    for average in ("macro", "weighted"):
        ap, ar, af, _ = precision_recall_fscore_support(
            true_ids, predicted, labels=ids, average=average, zero_division=0
        )
        summary.update({f"{average}_precision": float(ap), f"{average}_recall": float(ar), f"{average}_f1": float(af)})
    matrix = confusion_matrix(true_ids, predicted, labels=ids)
    pairs = Counter((int(t), int(q)) for t, q in zip(true_ids, predicted, strict=True) if t != q)
    confusions = []
    for (t, q), count in pairs.most_common(top_confusions):
        examples = [texts[i] for i in np.flatnonzero((true_ids == t) & (predicted == q))[:examples_per_confusion]]
        confusions.append(Confusion(true=labels[t], predicted=labels[q], count=count, examples=examples))
    return SplitScores(
        n=int(len(true_ids)),
        accuracy=float(accuracy_score(true_ids, predicted)),
        **summary,
        per_class=[
            ClassScores(
                label=labels[i], precision=float(p[i]), recall=float(r[i]), f1=float(f[i]), support=int(support[i])
            )
            for i in ids
        ],
        confusion_matrix=matrix.tolist(),
        calibration=calibration(top, predicted == true_ids, bins),
        top_confusions=confusions,
        label_suspects=label_suspects(true_ids, predicted, top, labels, texts, suspect_confidence, suspects_listed),
    )
