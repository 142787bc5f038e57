"""How long users' texts are kept, and erasing one user's text, chat session or prediction everywhere tuneloop
copied it.

Texts live in four places tuneloop writes: the database (predictions, the feedback on them, chat turns), rescue
files in the home (predictions the database could not take yet), registered versions' frozen data (training splits
and the gate's feedback holdout) and training runs' folders (runs/*/data*). The first two are purged and erased
here; frozen data is what a version was trained and judged on, so it is reported, not rewritten: delete the version
or the run folder (or retrain without the text) to remove it there.

Stored texts are masked, and one masked text ("my card is [CARD]") may be many users' words, so a text is found by
the keyed digest of the text as it came, which every row keeps (feedback.log.text_digest), never by its masked form.
Rows stored before the digests existed are matched only when they hold the text itself; those holding its masked
form might be another user's, so they are kept and counted (erase them by prediction id or session).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, Delete, and_, delete, func, or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from tuneloop.atomic import write_text_atomically
from tuneloop.config import PrivacyConfig, RegistryConfig
from tuneloop.data.clean import clean_text, dedup_key
from tuneloop.data.prepare import load_prepared
from tuneloop.db import open_database
from tuneloop.db.schema import ChatTurn, FeedbackRecord, PredictionRecord, utc_now
from tuneloop.errors import NotFound, TuneloopError
from tuneloop.feedback.log import RESCUE_PREFIX, ROWS_PER_STATEMENT, text_digest
from tuneloop.privacy.keyed import home_secret
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
    runs_holding_it: list[str] = field(default_factory=list)  # run folders under runs/ whose data hold it
    # Rows stored before erasure digests existed that hold the text's masked form: perhaps another user's, kept.
    kept_unsure: int = 0

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


@dataclass(frozen=True)
class WantedText:
    """How one user's text is recognised in stored rows: by the digest of the text as it came; in rows from before
    digests, by holding the text itself (`exact`: nothing was masked out of it), while a row holding its masked form
    (`unsure`) may be anybody's."""

    digest: str
    exact: frozenset[str]
    unsure: frozenset[str]

    @classmethod
    def of(cls, text: str, home: Path, privacy: PrivacyConfig) -> WantedText:
        mask = masker(privacy)
        exact = {text, clean_text(text)}
        unsure = {mask(t) for t in exact} - exact if mask is not None else set()
        return cls(text_digest(home_secret(home), text), frozenset(exact), frozenset(unsure))

    def rows(self, text: InstrumentedAttribute[str], digest: InstrumentedAttribute[str | None]) -> ColumnElement[bool]:
        return or_(digest == self.digest, and_(digest.is_(None), text.in_(self.exact)))

    def unsure_rows(
        self, text: InstrumentedAttribute[str], digest: InstrumentedAttribute[str | None]
    ) -> ColumnElement[bool]:
        return and_(digest.is_(None), text.in_(self.unsure))

    def holds(self, row: dict[str, Any]) -> bool:
        """Whether a rescue-file row is this text (files of older versions have no digest)."""
        found = row.get("text_digest")
        return found == self.digest if found else row["text"] in self.exact


def _matching(
    session: Session, wanted: WantedText | None, session_id: str | None, prediction_id: str | None
) -> tuple[list[ChatTurn], set[str], set[str]]:
    """(chat turns, prediction ids) to erase, and stored texts to look for in frozen data."""
    if wanted is not None:
        turns = list(session.scalars(select(ChatTurn).where(wanted.rows(ChatTurn.message, ChatTurn.message_digest))))
        found = select(PredictionRecord.id).where(wanted.rows(PredictionRecord.text, PredictionRecord.text_digest))
        return turns, set(session.scalars(found)), set(wanted.exact | wanted.unsure)
    if session_id is not None:
        return list(session.scalars(select(ChatTurn).where(ChatTurn.session_id == session_id))), set(), set()
    predicted = session.get(PredictionRecord, prediction_id)
    by_turn = or_(ChatTurn.intent_prediction_id == prediction_id, ChatTurn.sentiment_prediction_id == prediction_id)
    turns = list(session.scalars(select(ChatTurn).where(by_turn)))
    return turns, {predicted.id} if predicted else set(), {predicted.text} if predicted else set()


def _unsure(session: Session, wanted: WantedText | None) -> int:
    if wanted is None or not wanted.unsure:
        return 0
    turns = select(func.count()).where(wanted.unsure_rows(ChatTurn.message, ChatTurn.message_digest))
    predictions = select(func.count()).where(wanted.unsure_rows(PredictionRecord.text, PredictionRecord.text_digest))
    return (session.scalar(turns) or 0) + (session.scalar(predictions) or 0)


def forget(
    registry: RegistryConfig,
    privacy: PrivacyConfig,
    text: str | None = None,
    session_id: str | None = None,
    prediction_id: str | None = None,
) -> Erased:
    """Erase one user's text (every prediction and chat turn it was, found by digest; the feedback on them), a chat
    session (its turns and their predictions) or one prediction (with its feedback, and the chat turn it belongs to)
    from the database and the rescue files, and name the registered versions and run folders whose frozen data
    still hold the text. Nothing matching is an error, so a typo is never taken for done."""
    if sum(given is not None for given in (text, session_id, prediction_id)) != 1:
        raise TuneloopError("give exactly one of --text, --session or --prediction")
    erased = Erased()
    wanted = WantedText.of(text, registry.home, privacy) if text is not None else None
    engine = open_database(registry.resolved_database_url())
    with Session(engine) as session, session.begin():
        turns, predictions, looked_for = _matching(session, wanted, session_id, prediction_id)
        for turn in turns:
            predictions |= {turn.intent_prediction_id, turn.sentiment_prediction_id}
            looked_for.add(turn.message)
        _delete_predictions(session, predictions, erased)
        if turns:
            erased.chat_turns = _deleted(session, delete(ChatTurn).where(ChatTurn.id.in_([t.id for t in turns])))
        erased.kept_unsure = _unsure(session, wanted)
    _rewrite_rescue_files(
        registry.home,
        lambda row: row["id"] not in predictions and not (wanted is not None and wanted.holds(row)),
        erased,
    )
    keys = {dedup_key(clean_text(t)) for t in looked_for}
    erased.versions_holding_it = versions_holding(registry, keys)
    erased.runs_holding_it = runs_holding(registry, keys)
    if not (erased.removed or erased.versions_holding_it or erased.runs_holding_it or erased.kept_unsure):
        if text is not None:
            shown = f"text {text!r}"
        elif session_id is not None:
            shown = f"chat session '{session_id}'"
        else:
            shown = f"prediction '{prediction_id}'"
        raise NotFound(f"nothing matches the {shown}: nothing was erased")
    return erased


def _holds_any(data_folders: list[Path], keys: set[str]) -> bool:
    """Whether prepared data in these folders (splits and feedback holdout) hold one of these texts (dedup keys)."""
    for data in data_folders:
        if not (data / "data_report.json").is_file():
            continue
        prepared = load_prepared(data)
        frames = [*prepared.splits.values(), *([prepared.holdout] if prepared.holdout is not None else [])]
        if any(not frame.empty and frame["text"].map(dedup_key).isin(keys).any() for frame in frames):
            return True
    return False


def runs_holding(registry: RegistryConfig, keys: set[str]) -> list[str]:
    """Training run folders (runs/NAME-STAMP) whose data (the model's own and each task's) hold one of these texts."""
    if not keys:
        return []
    runs = sorted(path for path in (Path(registry.home) / "runs").glob("*") if path.is_dir())
    return [str(run) for run in runs if _holds_any(sorted(run.glob("data*")), keys)]


def versions_holding(registry: RegistryConfig, keys: set[str]) -> list[str]:
    """Registered versions whose frozen splits or feedback holdout (the model's own and each task's) contain one of
    these texts (dedup keys)."""
    if not keys:
        return []
    store = Registry(registry)
    return [
        version.ref
        for version in store.versions()
        if _holds_any(sorted(store.folder(version).root.glob("data*")), keys)
    ]
