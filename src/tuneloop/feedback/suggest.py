"""What to label next: production predictions worth a person's label, so the loop asks instead of waiting.

A person's label is worth most on a message the model was unsure of (a small margin between its two best
calibrated probabilities), that is not one of fifty near-copies of a message already chosen, and whose
predicted class the model has seen little of in training. The choice follows Cluster-Margin (Citovsky et
al., 2021) with the model's predicted classes as clusters: the most uncertain messages form a pool a few
times the budget, near-copies collapse into one, and each class's n-th message counts 1/n as much as its
first, so the budget spreads over the classes the model is confused about instead of filling up with one.
The window, the pool and the suggestions are taken in turns from each requester (an API key, or a keyless
caller's address), so one sender's flood of made-up unsure messages cannot fill a person's labelling queue.
Labels given for a suggestion are trusted feedback: they go through the same export → retrain → gate path.
"""

from __future__ import annotations

import functools
import math
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from statistics import median
from typing import Any, TypeVar

from tuneloop.config import OUT_OF_SCOPE
from tuneloop.data.clean import clean_text, dedup_key
from tuneloop.data.near_duplicates import clusters, near_duplicate_pairs
from tuneloop.data.prepare import load_prepared
from tuneloop.db.schema import PredictionRecord
from tuneloop.errors import NotFound, TuneloopError
from tuneloop.feedback.export import text_key
from tuneloop.feedback.log import PredictionLog
from tuneloop.models.classifier import HeadSpec
from tuneloop.registry import Registry

# The pool of most uncertain messages the budget is spread over, in budgets: Cluster-Margin's ratio.
POOL_BUDGETS = 3
# Near-copies at this word Jaccard or above are one message (the data stage's near-duplicate threshold).
NEAR_COPY_THRESHOLD = 0.8
# A class with few training rows lifts its messages by √(median rows / its rows), up to this factor.
MOST_RARITY_LIFT = 2.0
DEFAULT_WINDOW = 5_000


@dataclass(frozen=True)
class Suggestion:
    """A logged prediction worth a label, and why."""

    prediction_id: str
    text: str
    predicted: str
    confidence: float
    runner_up: str
    margin: float  # the two best probabilities' difference: small = unsure
    near_copies: int  # near-copies of it in the window, which it stands for (never suggested themselves)
    trained_rows: int  # training rows of the predicted class
    priority: float
    why: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def margin_of(scores: dict[str, float]) -> tuple[str, float, str, float]:
    """The best label and probability, the runner-up and its probability."""
    ranked = sorted(scores.items(), key=lambda item: item[1], reverse=True)
    best, runner_up = ranked[0], ranked[1] if len(ranked) > 1 else ("", 0.0)
    return best[0], best[1], runner_up[0], runner_up[1]


Item = TypeVar("Item")


def taking_turns(items: list[Item], requester: Callable[[Item], str | None]) -> list[Item]:
    """`items` (best first) in rounds of one from each requester, in the order of their best: a requester who sent
    a thousand takes one place a round, like one who sent one. With one requester, the order stays as it was."""
    queues: dict[str | None, deque[Item]] = {}
    for item in items:
        queues.setdefault(requester(item), deque()).append(item)
    turns: list[Item] = []
    while queues:
        for key in list(queues):
            turns.append(queues[key].popleft())
            if not queues[key]:
                del queues[key]
    return turns


def rarity_lift(trained: int, typical: float) -> float:
    return min(MOST_RARITY_LIFT, max(1.0, math.sqrt(typical / max(trained, 1))))


def suggest_labels(
    predictions: list[PredictionRecord],
    budget: int,
    trained_counts: dict[str, int],
    labelled: set[str],
) -> list[Suggestion]:
    """Up to `budget` of `predictions` (newest first) for a person to label, most useful first.

    `trained_counts` are the training rows per label of the version; `labelled` the dedup keys of texts that
    already have a label (training rows, feedback), which are never suggested again.
    """
    if budget < 1:
        raise TuneloopError("the labelling budget must be at least 1")
    newest: dict[str, PredictionRecord] = {}
    copies = Counter[str]()
    for prediction in predictions:
        key = text_key(prediction)
        if key in labelled or not key or len(prediction.scores) < 2:
            continue
        copies[key] += 1
        newest.setdefault(key, prediction)
    if not newest:
        return []
    keys = list(newest)
    texts = [clean_text(newest[key].text) for key in keys]
    typical = median(trained_counts.values()) if trained_counts else 1.0

    def priority_of(key: str) -> float:
        label, top, _, second = margin_of(newest[key].scores)
        return (1.0 - (top - second)) * rarity_lift(trained_counts.get(label, 0), typical)

    priority = {key: priority_of(key) for key in keys}

    # Near-copies: one message per cluster, its most uncertain, standing for the whole cluster.
    groups = clusters(len(keys), near_duplicate_pairs(texts, NEAR_COPY_THRESHOLD))
    grouped = {i for group in groups for i in group}
    groups += [[i] for i in range(len(keys)) if i not in grouped]
    representatives: list[tuple[str, int]] = []
    for group in groups:
        chosen = max(group, key=lambda i: priority[keys[i]])
        representatives.append((keys[chosen], sum(copies[keys[i]] for i in group) - 1))
    ranked = sorted(representatives, key=lambda item: priority[item[0]], reverse=True)
    pool = taking_turns(ranked, lambda item: newest[item[0]].requester)[: POOL_BUDGETS * budget]

    # The n-th message of a predicted class counts 1/n: the budget spreads over the classes in the pool.
    seen_in_class = Counter[str]()
    spread: list[tuple[float, Suggestion, str | None]] = []
    for key, near_copies in pool:
        prediction = newest[key]
        label, top, runner_up, second = margin_of(prediction.scores)
        seen_in_class[label] += 1
        trained = trained_counts.get(label, 0)
        reasons = [f"unsure: {label} {top:.2f} vs {runner_up} {second:.2f}"]
        if rarity_lift(trained, typical) > 1.0:
            reasons.append(f"{label} has {trained} training rows")
        if near_copies:
            reasons.append(f"stands for {near_copies} near-copies")
        suggestion = Suggestion(
            prediction_id=prediction.id,
            text=clean_text(prediction.text),
            predicted=label,
            confidence=round(top, 4),
            runner_up=runner_up,
            margin=round(top - second, 4),
            near_copies=near_copies,
            trained_rows=trained,
            priority=round(priority[key], 4),
            why="; ".join(reasons),
        )
        spread.append((suggestion.priority / seen_in_class[label], suggestion, prediction.requester))
    spread.sort(key=lambda item: item[0], reverse=True)
    return [suggestion for _, suggestion, _ in taking_turns(spread, lambda item: item[2])[:budget]]


def suggestions_for(
    name: str, registry: Registry, prediction_log: PredictionLog, budget: int, window: int = DEFAULT_WINDOW
) -> list[Suggestion]:
    """Suggestions among the latest `window` predictions of the model name, against its production version's
    training data; texts that already have feedback are left out."""
    version = registry.get(f"{name}@production")
    train = load_prepared(registry.folder(version).data()).splits["train"]
    labelled = {dedup_key(text) for text in train["text"]}
    labelled |= {text_key(prediction) for _, prediction in prediction_log.feedback_for(name)}
    predictions = prediction_log.recent_predictions_in_turns(name, window)
    if not predictions:
        raise TuneloopError(f"no predictions of {name} are logged yet: serve it, then ask again")
    trained_counts = {str(label): int(count) for label, count in train["label"].value_counts().items()}
    return suggest_labels(predictions, budget, trained_counts, labelled)


def version_labels(registry: Registry, name: str, version: int | str) -> frozenset[str]:
    """The labels of a registered version (`version` a number or a stage)."""
    return frozenset(HeadSpec.read(registry.folder(registry.get(f"{name}@{version}")).model).labels)


def registered_labels(registry: Registry) -> Callable[[PredictionRecord], frozenset[str]]:
    """The labels a person may give a prediction outside the server: its version's, production's, or
    out_of_scope (none of them: it trains as a label of its own, which an assistant turns away)."""

    @functools.cache
    def allowed_for(name: str, version: int) -> frozenset[str]:  # read once per version, not once per row
        return version_labels(registry, name, version) | version_labels(registry, name, "production") | {OUT_OF_SCOPE}

    def allowed(prediction: PredictionRecord) -> frozenset[str]:
        return allowed_for(prediction.model_name, prediction.model_version)

    return allowed


def record_labels(
    prediction_log: PredictionLog,
    model_name: str,
    labels: dict[str, str],
    sender: str,
    allowed: Callable[[PredictionRecord], frozenset[str]],
) -> int:
    """Record a person's labels for suggested predictions of `model_name` (prediction id → label) as trusted
    feedback from `sender`; every one is checked first (the prediction exists, the label is one `allowed` gives
    it), so a bad one records none. A label the sender already gave that prediction is not recorded twice (a file
    sent again)."""
    checked = []
    for prediction_id, label in labels.items():
        prediction = prediction_log.get(prediction_id)
        if prediction is None or prediction.model_name != model_name:
            raise NotFound(f"no prediction of {model_name} with id '{prediction_id}' (ids come from the suggestions)")
        if label not in allowed(prediction):
            raise TuneloopError(
                f"'{label}' is not a label of {model_name} (for {prediction_id}); "
                f"labels: {', '.join(sorted(allowed(prediction)))}"
            )
        checked.append((prediction_id, label))
    given = {
        (feedback.prediction_id, feedback.corrected_label)
        for feedback, _ in prediction_log.feedback_for_predictions([p for p, _ in checked])
        if feedback.sender == sender
    }
    fresh = [(p, label) for p, label in checked if (p, label) not in given]
    for prediction_id, label in fresh:
        prediction_log.add_feedback(prediction_id, corrected_label=label, sender=sender, trusted=True)
    return len(fresh)
