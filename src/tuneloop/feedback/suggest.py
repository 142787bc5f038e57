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

With the sentence encoder the version was trained from, each suggestion also lists its **similar** messages in the
window (cosine at least SIMILAR_MIN_COSINE): a person who labels the suggestion gives them the same label in one
click (label propagation that a person confirms), and a message similar to one already chosen is not chosen again,
so that the budget covers as many different requests as it can.
"""

from __future__ import annotations

import functools
import math
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from statistics import median
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from tuneloop.config import OUT_OF_SCOPE
from tuneloop.data.clean import clean_text, dedup_key
from tuneloop.data.near_duplicates import clusters, near_duplicate_pairs
from tuneloop.data.prepare import load_prepared
from tuneloop.db.schema import PredictionRecord
from tuneloop.errors import NotFound, TuneloopError
from tuneloop.feedback.export import text_key
from tuneloop.feedback.log import PredictionLog
from tuneloop.feedback.monitor import version_embedder
from tuneloop.models.classifier import HeadSpec
from tuneloop.registry import Registry

# The pool of most uncertain messages the budget is spread over, in budgets: Cluster-Margin's ratio.
POOL_BUDGETS = 3
# Near-copies at this word Jaccard or above are one message (the data stage's near-duplicate threshold).
NEAR_COPY_THRESHOLD = 0.8
# A class with few training rows lifts its messages by √(median rows / its rows), up to this factor.
MOST_RARITY_LIFT = 2.0
DEFAULT_WINDOW = 5_000
# Window messages at this cosine or above to a suggestion (the version's base sentence encoder) are listed as its
# similar messages: among 2,000 Banking77 training texts under all-MiniLM-L6-v2, nine pairs in ten this close share
# an intent (four in five at 0.75), and a person unticks the others before the label is given.
SIMILAR_MIN_COSINE = 0.8
SIMILAR_LISTED = 20  # per suggestion, the most similar first
# Texts → L2-normalised sentence vectors (feedback.monitor.version_embedder).
Embed = Callable[[list[str]], np.ndarray]


@dataclass(frozen=True)
class Similar:
    """A logged prediction close to a suggestion: a candidate for the same label, which a person confirms."""

    prediction_id: str
    text: str
    predicted: str
    similarity: float


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
    similar: tuple[Similar, ...] = ()  # messages a person may give the same label in one click

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
    embed: Embed | None = None,
) -> list[Suggestion]:
    """Up to `budget` of `predictions` (newest first) for a person to label, most useful first.

    `trained_counts` are the training rows per label of the version; `labelled` the dedup keys of texts that
    already have a label (training rows, feedback), which are never suggested again. With `embed`, a message
    similar to one chosen before is passed over and each suggestion lists its similar messages (`with_similar`).
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
    in_turns = [suggestion for _, suggestion, _ in taking_turns(spread, lambda item: item[2])]
    if embed is None:
        return in_turns[:budget]
    return with_similar(in_turns, budget, [newest[key] for key in keys], embed)


def with_similar(
    ranked: list[Suggestion], budget: int, window: list[PredictionRecord], embed: Embed
) -> list[Suggestion]:
    """The first `budget` of `ranked`, passing over those similar to one taken before them (taken last if the budget
    is not filled otherwise), each with its similar messages in `window` (one per text, none of them suggested): a
    message similar to several suggestions goes to the closest, so that one click never gives it two labels."""
    texts = {prediction.id: clean_text(prediction.text) for prediction in window}
    ids = list(texts)
    vectors = embed([texts[i] for i in ids])
    threshold = similar_threshold(vectors)
    row = {prediction_id: i for i, prediction_id in enumerate(ids)}
    taken: list[Suggestion] = []
    passed: list[Suggestion] = []
    for suggestion in ranked:
        closest_taken = max(
            (float(vectors[row[t.prediction_id]] @ vectors[row[suggestion.prediction_id]]) for t in taken), default=-1.0
        )
        (passed if closest_taken >= threshold else taken).append(suggestion)
        if len(taken) == budget:
            break
    taken += passed[: budget - len(taken)]
    chosen = [row[t.prediction_id] for t in taken]
    similarity = vectors @ vectors[chosen].T  # window × taken
    similarity[chosen] = -1.0  # a suggestion is never another's similar message
    closest = similarity.argmax(axis=1)
    predicted = {prediction.id: prediction.label for prediction in window}
    out = []
    for column, suggestion in enumerate(taken):
        members = np.flatnonzero((closest == column) & (similarity[:, column] >= threshold))
        members = members[np.argsort(-similarity[members, column])][:SIMILAR_LISTED]
        similar = tuple(
            Similar(ids[i], texts[ids[i]], predicted[ids[i]], round(float(similarity[i, column]), 4)) for i in members
        )
        out.append(replace(suggestion, similar=similar))
    return out


def similar_threshold(vectors: np.ndarray, pairs: int = 20_000) -> float:
    """SIMILAR_MIN_COSINE, or halfway from the window's typical cosine (the median of random pairs) to 1 when that is
    higher: some encoders put unrelated texts at 0.8 (e5's embeddings crowd in a narrow cone)."""
    if len(vectors) < 2:
        return SIMILAR_MIN_COSINE
    first, second = np.random.default_rng(0).integers(0, len(vectors), size=(2, pairs))
    distinct = first != second
    cosines = np.einsum("ij,ij->i", vectors[first[distinct]], vectors[second[distinct]])
    typical = float(np.median(cosines)) if len(cosines) else 0.0
    return max(SIMILAR_MIN_COSINE, (1.0 + typical) / 2)


def suggestions_for(
    name: str,
    registry: Registry,
    prediction_log: PredictionLog,
    budget: int,
    window: int = DEFAULT_WINDOW,
    similar: bool = True,
) -> list[Suggestion]:
    """Suggestions among the latest `window` predictions of the model name, against its production version's
    training data; texts that already have feedback are left out. `similar`: each lists its similar messages
    (embedding the window with the version's base encoder: a minute for 5,000 texts on two cores)."""
    version = registry.get(f"{name}@production")
    train = load_prepared(registry.folder(version).data()).splits["train"]
    labelled = {dedup_key(text) for text in train["text"]}
    labelled |= {text_key(prediction) for _, prediction in prediction_log.feedback_for(name)}
    predictions = prediction_log.recent_predictions_in_turns(name, window)
    if not predictions:
        raise TuneloopError(f"no predictions of {name} are logged yet: serve it, then ask again")
    trained_counts = {str(label): int(count) for label, count in train["label"].value_counts().items()}
    folder = registry.folder(version)
    # Keyed by the version's folder, not its ref: two homes (or a home rebuilt) can each have a toy@1.
    embed = remembered(str(folder.root.resolve()), version_embedder(folder, registry)) if similar else None
    return suggest_labels(predictions, budget, trained_counts, labelled, embed)


# Sentence vectors already computed, by (version folder, text): the admin page asks for suggestions again and again over
# a window that moves little, and embedding 5,000 texts takes a minute on two cores. Bounded: cleared when full.
_VECTORS: dict[tuple[str, str], np.ndarray] = {}
VECTORS_KEPT = 100_000


def remembered(version: str, embed: Embed) -> Embed:
    """`embed`, computing only the texts it has not seen for `version` (its folder) before."""

    def embed_new(texts: list[str]) -> np.ndarray:
        # Read into a local dict first: another request (the server's thread pool) may clear the cache meanwhile.
        known = {t: _VECTORS[(version, t)] for t in dict.fromkeys(texts) if (version, t) in _VECTORS}
        new = [t for t in dict.fromkeys(texts) if t not in known]
        if new:
            known.update(zip(new, embed(new), strict=True))
            if len(_VECTORS) + len(new) > VECTORS_KEPT:
                _VECTORS.clear()
            _VECTORS.update({(version, t): known[t] for t in new})
        return np.stack([known[t] for t in texts]) if texts else np.zeros((0, 1))

    return embed_new


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


SUGGESTION_COLUMNS = ["prediction_id", "text", "predicted", "confidence", "runner_up", "why"]


def suggestions_frame(chosen: list[Suggestion]) -> pd.DataFrame:
    """The suggestions as a table to fill in (`tuneloop feedback suggest --out`): an empty label column, and below
    each suggestion its similar messages, whose same_as names it."""
    rows: list[dict[str, Any]] = []
    for suggestion in chosen:
        rows.append({**{c: suggestion.to_dict()[c] for c in SUGGESTION_COLUMNS}, "same_as": "", "label": ""})
        rows += [
            {
                "prediction_id": near.prediction_id,
                "text": near.text,
                "predicted": near.predicted,
                "why": f"similar ({near.similarity:.2f}) to {suggestion.prediction_id}",
                "same_as": suggestion.prediction_id,
                "label": "",
            }
            for near in suggestion.similar
        ]
    return pd.DataFrame(rows, columns=pd.Index([*SUGGESTION_COLUMNS, "same_as", "label"]))


def labels_from_frame(frame: pd.DataFrame, similar: bool, source: str) -> dict[str, str]:
    """prediction id → label from a filled-in suggestions table; with `similar`, a row without a label of its own
    takes the label of the row its same_as names (label propagation a person confirmed by keeping the row)."""
    if not {"prediction_id", "label"} <= set(frame.columns):
        raise TuneloopError(f"{source} needs prediction_id and label columns (as tuneloop feedback suggest writes)")
    ids, given = frame["prediction_id"].str.strip(), frame["label"].str.strip()
    labels = {i: label for i, label in zip(ids, given, strict=True) if label}
    if similar and "same_as" in frame.columns:
        for i, label, same_as in zip(ids, given, frame["same_as"].str.strip(), strict=True):
            if not label and same_as in labels:
                labels.setdefault(i, labels[same_as])
    return labels
