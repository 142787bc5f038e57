"""How long users' texts are kept, and erasing one text or one chat session everywhere tuneloop copied it.

Texts live in three places tuneloop writes: the database (predictions, the feedback on them, chat turns),
rescue files in the home (predictions the database could not take yet), and registered versions' frozen data
(training splits and the gate's feedback holdout). The first two are purged and erased here; a version's frozen
data is what that version was trained and judged on, so it is reported, not rewritten: delete the version (or
retrain without the text) to remove it there.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, Delete, delete, select
from sqlalchemy.orm import Session

from tuneloop.atomic import write_text_atomically
from tuneloop.config import PrivacyConfig, RegistryConfig
from tuneloop.data.clean import clean_text, dedup_key
from tuneloop.data.prepare import load_prepared
from tuneloop.db import open_database
from tuneloop.db.schema import ChatTurn, FeedbackRecord, PredictionRecord, utc_now
from tuneloop.errors import NotFound, TuneloopError
from tuneloop.feedback.log import RESCUE_PREFIX, ROWS_PER_STATEMENT
from tuneloop.privacy.mask import masker
from tuneloop.registry import Registry


@dataclass
class Erased:
    """What was removed, and where the text still is."""

    predictions: int = 0
    feedback: int = 0
    chat_turns: int = 0
    rescued_rows: int = 0
    versions_holding_it: list[str] = field(default_factory=list)

    @property
    def removed(self) -> int:
        return self.predictions + self.feedback + self.chat_turns + self.rescued_rows


def _deleted(session: Session, statement: Delete) -> int:
    """Rows a DELETE removed."""
    return cast(CursorResult[Any], session.execute(statement)).rowcount


def _delete_predictions(session: Session, prediction_ids: set[str], erased: Erased) -> None:
    ids = sorted(prediction_ids)
    for start in range(0, len(ids), ROWS_PER_STATEMENT):
        part = ids[start : start + ROWS_PER_STATEMENT]
        erased.feedback += _deleted(session, delete(FeedbackRecord).where(FeedbackRecord.prediction_id.in_(part)))
        erased.predictions += _deleted(session, delete(PredictionRecord).where(PredictionRecord.id.in_(part)))


def _rewrite_rescue_files(home: Path, keep: Callable[[dict[str, Any]], bool], erased: Erased) -> None:
    """Drop rescue-file rows `keep` refuses (a callable on the row dict); a file left empty is removed."""
    for path in sorted(Path(home).glob(f"{RESCUE_PREFIX}*.jsonl")):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        kept = [row for row in rows if keep(row)]
        if len(kept) == len(rows):
            continue
        erased.rescued_rows += len(rows) - len(kept)
        if kept:
            write_text_atomically(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept))
        else:
            path.unlink()


def purge(registry: RegistryConfig, privacy: PrivacyConfig, now: datetime | None = None) -> Erased:
    """Remove what is older than privacy.retention_days: predictions (with their feedback), chat turns, and
    rescued rows waiting in the home."""
    if privacy.retention_days is None:
        raise TuneloopError(
            "privacy.retention_days is not set, so nothing is old enough to purge: set it (e.g. "
            "privacy.retention_days=90) in the server's config or as an override"
        )
    cutoff = (now or utc_now()) - timedelta(days=privacy.retention_days)
    erased = Erased()
    engine = open_database(registry.resolved_database_url())
    with Session(engine) as session, session.begin():
        old = set(session.scalars(select(PredictionRecord.id).where(PredictionRecord.created_at < cutoff)))
        _delete_predictions(session, old, erased)
        erased.chat_turns = _deleted(session, delete(ChatTurn).where(ChatTurn.created_at < cutoff))
    _rewrite_rescue_files(registry.home, lambda row: datetime.fromisoformat(row["created_at"]) >= cutoff, erased)
    return erased


def forget(
    registry: RegistryConfig, privacy: PrivacyConfig, text: str | None = None, session_id: str | None = None
) -> Erased:
    """Erase a text (every prediction of it, the feedback on them, chat turns saying it) or a chat session (its
    turns and their predictions) from the database and the rescue files, and name the registered versions whose
    frozen data still hold the text. Nothing matching is an error, so a typo is never taken for done."""
    if (text is None) == (session_id is None):
        raise TuneloopError("give exactly one of --text or --session")
    erased = Erased()
    engine = open_database(registry.resolved_database_url())
    mask = masker(privacy)
    # Stored texts were masked as they were written: look for the text as it was stored, and as given.
    wanted = set()
    if text is not None:
        wanted = {text, mask(text) if mask else text}
    with Session(engine) as session, session.begin():
        if text is not None:
            turns = list(session.scalars(select(ChatTurn).where(ChatTurn.message.in_(wanted))))
            predictions = set(session.scalars(select(PredictionRecord.id).where(PredictionRecord.text.in_(wanted))))
        else:
            turns = list(session.scalars(select(ChatTurn).where(ChatTurn.session_id == session_id)))
            predictions = set()
        for turn in turns:
            predictions |= {turn.intent_prediction_id, turn.sentiment_prediction_id}
            wanted.add(turn.message)
        _delete_predictions(session, predictions, erased)
        if turns:
            erased.chat_turns = _deleted(session, delete(ChatTurn).where(ChatTurn.id.in_([t.id for t in turns])))
    _rewrite_rescue_files(registry.home, lambda row: row["text"] not in wanted and row["id"] not in predictions, erased)
    keys = {dedup_key(clean_text(t)) for t in wanted}
    erased.versions_holding_it = versions_holding(registry, keys)
    if not erased.removed and not erased.versions_holding_it:
        what = f"text {text!r}" if text is not None else f"chat session '{session_id}'"
        raise NotFound(f"nothing matches the {what}: nothing was erased")
    return erased


def versions_holding(registry: RegistryConfig, keys: set[str]) -> list[str]:
    """Registered versions whose frozen splits or feedback holdout contain one of these texts (dedup keys)."""
    if not keys:
        return []
    store = Registry(registry)
    holding = []
    for version in store.versions():
        data = store.folder(version).data()
        if not (data / "data_report.json").is_file():
            continue
        prepared = load_prepared(data)
        frames = [*prepared.splits.values(), *([prepared.holdout] if prepared.holdout is not None else [])]
        if any(not frame.empty and frame["text"].map(dedup_key).isin(keys).any() for frame in frames):
            holding.append(version.ref)
    return holding
