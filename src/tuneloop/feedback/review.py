"""The review queue: feedback that may not train until an admin approves it, grouped by text and proposed label,
so that a thousand copies of one correction are one decision, and who sent them is in plain view."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from tuneloop.data.clean import clean_text
from tuneloop.db.schema import FeedbackRecord, PredictionRecord
from tuneloop.errors import NotFound, TuneloopError
from tuneloop.feedback.export import proposed_label, text_key
from tuneloop.feedback.log import PredictionLog

Decision = Literal["approve", "reject"]
# How poisoning looks, flagged in the queue: one sender repeating the same correction this often, or proposing
# the same label for this many different texts (a trigger word planted across many messages).
REPEATS_FLAGGED = 3
ONE_LABEL_TEXTS_FLAGGED = 20

Rows = list[tuple[FeedbackRecord, PredictionRecord]]


@dataclass
class ReviewGroup:
    """Feedback proposing one label for one text (after cleaning, case-insensitive)."""

    group: str  # a stable id: the same text and label keep it across calls
    text: str
    label: str
    kind: Literal["corrected", "confirmed"]
    predicted: str  # what the model said, most often
    count: int
    pending: int
    senders: dict[str, int]
    trusted_senders: list[str]
    feedback_ids: list[int]
    first_at: datetime
    last_at: datetime
    flags: list[str] = field(default_factory=list)


def group_id(model: str, key: str, label: str) -> str:
    return hashlib.sha256(f"{model}\0{key}\0{label}".encode()).hexdigest()[:12]


def review_groups(model: str, rows: Rows) -> list[ReviewGroup]:
    """Every text-and-label group of `model`'s feedback that proposes a label, most feedback first, flagged
    where it looks like poisoning: one sender repeating itself, or a label that disagrees with other feedback."""
    grouped: dict[tuple[str, str], list[tuple[FeedbackRecord, PredictionRecord]]] = {}
    for feedback, prediction in rows:
        label = proposed_label(feedback, prediction)
        if label is not None:
            grouped.setdefault((text_key(prediction), label), []).append((feedback, prediction))
    labels_of_text = Counter(key for key, _ in grouped)
    texts_per_sender_label = Counter(
        (sender, label) for (_, label), members in grouped.items() for sender in {f.sender for f, _ in members}
    )
    groups = []
    for (key, label), members in grouped.items():
        senders = Counter(feedback.sender for feedback, _ in members)
        pending = [f for f, _ in members if f.review == "pending" and not f.trusted]
        flags = []
        top_sender, top_count = senders.most_common(1)[0]
        if top_count >= REPEATS_FLAGGED:
            flags.append(f"{top_sender} sent it {top_count} times")
        if labels_of_text[key] > 1:
            flags.append("other feedback gives this text another label")
        for sender in senders:
            texts = texts_per_sender_label[(sender, label)]
            if texts >= ONE_LABEL_TEXTS_FLAGGED:
                flags.append(f"{sender} proposed {label} for {texts} different texts")
        groups.append(
            ReviewGroup(
                group=group_id(model, key, label),
                text=clean_text(members[-1][1].text),
                label=label,
                kind="corrected" if any(f.corrected_label for f, _ in members) else "confirmed",
                predicted=Counter(p.label for _, p in members).most_common(1)[0][0],
                count=len(members),
                pending=len(pending),
                senders=dict(senders.most_common()),
                trusted_senders=sorted({f.sender for f, _ in members if f.trusted}),
                feedback_ids=[f.id for f, _ in members],
                first_at=min(f.created_at for f, _ in members),
                last_at=max(f.created_at for f, _ in members),
                flags=flags,
            )
        )
    return sorted(groups, key=lambda g: (-g.pending, -g.count, g.text))


def review_queue(model: str, rows: Rows) -> list[ReviewGroup]:
    """The groups that hold feedback waiting for a decision (neither reviewed nor from a trusted key)."""
    return [group for group in review_groups(model, rows) if group.pending]


def selected_feedback(model: str, rows: Rows, groups: list[str] | None = None, sender: str | None = None) -> list[int]:
    """Feedback ids of `model` in these groups and/or from this sender; an unknown group or a sender with no
    feedback is an error, so a typo never quietly decides nothing."""
    chosen: set[int] = set()
    if groups:
        known = {group.group: group for group in review_groups(model, rows)}
        unknown = [g for g in groups if g not in known]
        if unknown:
            raise NotFound(f"no feedback group {', '.join(unknown)} for {model} (groups come from the review queue)")
        for name in groups:
            chosen.update(known[name].feedback_ids)
    if sender:
        sent = {feedback.id for feedback, _ in rows if feedback.sender == sender}
        if not sent:
            raise NotFound(f"no feedback on {model} from '{sender}'")
        chosen.update(sent)
    return sorted(chosen)


def decide(
    prediction_log: PredictionLog,
    model: str,
    decision: Decision,
    reviewer: str,
    groups: list[str] | None = None,
    feedback_ids: list[int] | None = None,
    sender: str | None = None,
) -> int:
    """Approve or reject feedback by group, by id and/or by sender, all or nothing; returns the rows decided."""
    if not (groups or feedback_ids or sender):
        raise TuneloopError("say which feedback to decide on: groups, feedback ids or a sender")
    rows = prediction_log.feedback_for(model) if (groups or sender) else []
    ids = set(selected_feedback(model, rows, groups, sender)) | set(feedback_ids or [])
    return prediction_log.set_review(sorted(ids), "approved" if decision == "approve" else "rejected", reviewer)
