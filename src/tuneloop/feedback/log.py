"""The prediction log: every served prediction and every piece of feedback on it, in the database.

Predictions are written in batches by a background thread so that the request path never waits on the
database; feedback is rare and precious, so it is committed before the request returns. `PredictionLog`
states what is guaranteed.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path

import numpy as np
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from tuneloop.atomic import write_text_atomically
from tuneloop.data.clean import clean_text, dedup_key
from tuneloop.db import open_database
from tuneloop.db.schema import (
    ANONYMOUS,
    KEY_SENDER_PREFIX,
    UNKNOWN_REQUESTER,
    FeedbackRecord,
    PredictionRecord,
    Review,
    TrustedSender,
    utc_now,
)
from tuneloop.errors import NotFound, TuneloopError, first_line
from tuneloop.privacy.keyed import home_secret, keyed_digest
from tuneloop.privacy.mask import masked_for_keeping

log = logging.getLogger(__name__)


@dataclass
class LoggedPrediction:
    """A prediction as the log keeps it, before or after it reaches the database."""

    id: str
    created_at: datetime
    model_name: str
    model_version: int
    text: str
    label: str
    scores: dict[str, float]
    source: str = "api"
    requester: str = UNKNOWN_REQUESTER  # who asked (PredictionRecord.requester)
    text_digest: str | None = None  # set with the stored form of the text (text_digest())
    # Whether `text` already is its stored form (cleaned and masked): a row back from a failed write, or rescued.
    stored: bool = field(default=False, repr=False)

    def row(self) -> dict[str, object]:
        """The row's columns, as the predictions table and rescue files take them."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "stored"}

    @classmethod
    def of(
        cls,
        model_name: str,
        model_version: int,
        labels: list[str],
        text: str,
        probs: np.ndarray,
        source: str,
        when: datetime,
        requester: str = UNKNOWN_REQUESTER,
    ) -> LoggedPrediction:
        """A new prediction of `text`: the best label and every label's probability (rounded for storage)."""
        return cls(
            id=new_prediction_id(),
            created_at=when,
            model_name=model_name,
            model_version=model_version,
            text=text,
            label=labels[int(probs.argmax())],
            source=source,
            scores={name: round(float(p), 5) for name, p in zip(labels, probs, strict=True)},
            requester=requester,
        )


Row = tuple[FeedbackRecord, PredictionRecord]

# Rows masked and committed together: the writer takes this many at a time and masks them with no lock held, so
# a request waiting for its own row waits at most for one slice, never for the whole backlog to be masked.
SLICE_ROWS = 64

# How far back recent_predictions_in_turns looks, in windows: a requester's flood past it pushes the others out.
TURNS_SCAN = 10

# Rows per statement where many are written or deleted at once (a rescue file can hold the whole backlog,
# 200,000 rows): more bound parameters than PostgreSQL (65,535) or SQLite (32,766 in many builds) take.
ROWS_PER_STATEMENT = 2_000


def new_prediction_id() -> str:
    return uuid.uuid4().hex


# Rescue files in the home: rows the database could not take, waiting to be imported.
RESCUE_PREFIX = "unsaved-predictions-"


def _rescued_row(line: str) -> LoggedPrediction:
    row = json.loads(line)  # written in its stored form (files of older versions have no requester or digest)
    return LoggedPrediction(**{**row, "created_at": datetime.fromisoformat(row["created_at"]), "stored": True})


def text_digest(secret: bytes, text: str) -> str:
    """What names a user's text for erasure (tuneloop privacy forget) while only its masked form is kept: a keyed
    digest of the text as it came, cleaned and compared as duplicates are (case and spacing aside)."""
    return keyed_digest(secret, "text", dedup_key(clean_text(text.replace("\x00", ""))))


class PredictionLog:
    """Buffered prediction writes plus synchronous feedback writes over one database.

    What it guarantees (tested, with the server killed by SIGKILL too):
    - feedback is committed before its request is answered, and the prediction it refers to first: a
      prediction still in the buffer is written before its feedback, so acknowledged feedback is never lost
      and never points at a missing prediction;
    - a prediction without feedback waits in memory for at most one flush window (`flush_ms`) before it is
      written, so a process killed without warning loses at most that window's predictions;
    - texts are masked (privacy.mask) in slices of SLICE_ROWS with no lock held, and a request that needs its own
      rows written (a chat turn, feedback) writes only those, so a backlog of long texts never holds it up;
    - while the database is down or locked, rows wait in memory and the whole batch is retried with backoff;
      past `max_backlog` rows the oldest are moved to a rescue file in the home, and only if that file
      cannot be written either (a full disk) are rows dropped, counted in `dropped` and logged;
    - rescue files are read back into the database by `import_rescued` (at every server start, and by
      `tuneloop log import`);
    - a row the database refuses for itself (a repeated id) goes to a rescue file without holding up the rest.
    """

    def __init__(
        self,
        database_url: str,
        home: Path,
        flush_ms: float = 200.0,
        max_batch: int = 512,
        max_backlog: int = 200_000,
        on_dropped: Callable[[int], None] | None = None,
        mask: Callable[[str], str] | None = None,
    ) -> None:
        self.engine = open_database(database_url)
        self.mask = mask  # privacy.mask: personal data in texts and comments, replaced before they are kept
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.home = Path(home)
        self.secret = home_secret(self.home)
        self.flush_seconds = flush_ms / 1000
        self.max_batch = max_batch
        self.max_backlog = max_backlog
        self.on_dropped = on_dropped
        self._pending: list[LoggedPrediction] = []
        self._pending_lock = threading.Lock()
        # Ids taken from the buffer and not yet written or put back; a change is announced on `_settled`.
        self._in_flight: set[str] = set()
        self._settled = threading.Condition(self._pending_lock)
        self._shedding = False  # a shedding thread started by record() is running
        self._write_lock = threading.Lock()  # one commit at a time (masking happens before it is taken)
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.written = 0
        self.dropped = 0

    def start(self) -> PredictionLog:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
            self._thread.start()
        return self

    def record(self, predictions: list[LoggedPrediction]) -> None:
        """Queue predictions for the background writer; never blocks on the database."""
        if self._closed.is_set():
            raise TuneloopError("the prediction log is closed")
        with self._pending_lock:
            self._pending.extend(predictions)
            backlog = len(self._pending)
            shed = backlog > self.max_backlog and not self._shedding
            self._shedding = self._shedding or shed
        if backlog >= self.max_batch:
            self._wake.set()
        if shed:
            # The writer sheds between writes; while one write hangs (a database that does not answer), this
            # keeps memory bounded, off the caller's thread.
            threading.Thread(target=self._shed_now, name="prediction-log-shed", daemon=True).start()

    @property
    def backlog(self) -> int:
        with self._pending_lock:
            return len(self._pending)

    def _run(self) -> None:
        delay = self.flush_seconds
        while not self._closed.is_set():
            self._wake.wait(delay)
            self._wake.clear()
            try:
                self.flush()
                delay = self.flush_seconds
            except Exception as exc:  # the writer must outlive any error: the rows are back in the buffer
                log.warning("prediction log: write failed (%s); %d rows wait in memory", first_line(exc), self.backlog)
                delay = min(max(delay * 2, self.flush_seconds), 2.0)  # back off while the database is away
            try:
                self._shed_overflow()
            except Exception:
                log.exception("prediction log: could not shed the backlog")

    def _take(self, limit: int, ids: Collection[str] | None = None) -> list[LoggedPrediction]:
        """Up to `limit` of the oldest waiting rows (only those with these `ids`, when given), now in flight."""
        with self._pending_lock:
            if ids is None:
                batch, self._pending = self._pending[:limit], self._pending[limit:]
            else:
                batch = [p for p in self._pending if p.id in ids][:limit]
                if batch:
                    taken = {p.id for p in batch}
                    self._pending = [p for p in self._pending if p.id not in taken]
            self._in_flight.update(p.id for p in batch)
        return batch

    def _put_back(self, batch: list[LoggedPrediction]) -> None:
        with self._pending_lock:
            self._pending = batch + self._pending

    def _settle(self, batch: list[LoggedPrediction]) -> None:
        """These rows are written, rescued or back in the buffer: whoever waits for them may look again."""
        with self._settled:
            self._in_flight.difference_update(p.id for p in batch)
            self._settled.notify_all()

    def _await(self, ids: set[str]) -> None:
        """Until none of these rows is in flight (each is written, rescued, or back in the buffer)."""
        with self._settled:
            while ids & self._in_flight:
                self._settled.wait(timeout=1.0)

    def _shed_now(self) -> None:
        """Shed until the backlog is within its bound (rows recorded meanwhile included)."""
        while True:
            try:
                self._shed_overflow()
            except Exception:
                log.exception("prediction log: could not shed the backlog")
            with self._pending_lock:
                if len(self._pending) <= self.max_backlog:
                    self._shedding = False
                    return

    def _shed_overflow(self) -> None:
        """Past `max_backlog` rows, move the oldest to a rescue file (or, if it cannot be written, drop them)."""
        with self._pending_lock:
            excess = len(self._pending) - self.max_backlog
            if excess <= 0:
                return
            oldest, self._pending = self._pending[:excess], self._pending[excess:]
        self._rescue(oldest, "the database stayed unavailable")

    def _stored_text(self, text: str) -> str:
        """A text as it is written (to the database or a rescue file): without NUL, which a PostgreSQL text column
        cannot hold and which carries no meaning in a message anyway; with masking on, cleaned and then masked.
        Cleaned first because cleaning is what training reads: it decodes `alice&#64;example.com` and drops the soft
        hyphens inside a card number, so a text masked as it came would turn back into personal data in the
        training set; and so that no later cleaning reveals any (masked_for_keeping)."""
        text = text.replace("\x00", "")
        return masked_for_keeping(text, self.mask, clean_text) if self.mask is not None else text

    def _prepared(self, batch: list[LoggedPrediction]) -> list[LoggedPrediction]:
        """The rows in their stored form: text masked, and the digest that finds it for erasure."""
        return [
            p
            if p.stored
            else replace(p, text=self._stored_text(p.text), text_digest=text_digest(self.secret, p.text), stored=True)
            for p in batch
        ]

    def _insert(self, batch: list[LoggedPrediction]) -> None:
        with self._sessions.begin() as session:
            session.execute(insert(PredictionRecord), [p.row() for p in batch])

    def flush(self) -> int:
        """Write every prediction recorded before the call, in slices, and wait for slices other threads were
        writing; returns how many this call wrote.

        A batch the database cannot take (it is down, locked by another writer, a table is missing) goes
        back to the buffer whole and the error is raised: the writer retries it with backoff. Only when the
        database refuses the rows themselves (a repeated id) are they written one by one, and the refused
        ones go to a rescue file, so that they cannot block the rest.
        """
        with self._pending_lock:
            due, earlier = len(self._pending), set(self._in_flight)
        written = 0
        while due > 0 and (batch := self._take(min(SLICE_ROWS, due))):
            due -= len(batch)
            written += self._write(batch)
        self._await(earlier)
        return written

    def write_now(self, prediction_ids: Collection[str]) -> None:
        """Write these predictions before returning, and only them: those still waiting are masked and committed
        on this thread, and for those another thread is writing this waits for that one slice. A chat turn and
        feedback never pay for masking other requests' texts."""
        wanted = set(prediction_ids)
        while batch := self._take(len(wanted), wanted):
            self._write(batch)
        self._await(wanted)
        if batch := self._take(len(wanted), wanted):  # a slice that failed put them back: this thread tries once
            self._write(batch)

    def _write(self, batch: list[LoggedPrediction]) -> int:
        """Mask rows taken from the buffer (no lock held), then commit them; rows not written go back."""
        try:
            try:
                prepared = self._prepared(batch)
            except Exception:
                self._put_back(batch)
                raise
            with self._write_lock:
                return self._commit(prepared)
        finally:
            self._settle(batch)

    def _commit(self, batch: list[LoggedPrediction]) -> int:
        try:
            self._insert(batch)
        except (IntegrityError, DataError):
            written, refused = self._insert_each(batch)
            self._rescue(refused, "the database refused these rows")
            self.written += written
            return written
        except Exception:
            self._put_back(batch)
            raise
        self.written += len(batch)
        return len(batch)

    def _insert_each(self, batch: list[LoggedPrediction]) -> tuple[int, list[LoggedPrediction]]:
        """Row by row: (rows written, rows the database refused). Any other error puts the rest back."""
        written, refused = 0, []
        for index, prediction in enumerate(batch):
            try:
                self._insert([prediction])
                written += 1
            except (IntegrityError, DataError):
                refused.append(prediction)
            except Exception:
                self._put_back(batch[index:])
                self.written += written
                self._rescue(refused, "the database refused these rows")
                raise
        return written, refused

    def _rescue(self, batch: list[LoggedPrediction], why: str) -> Path | None:
        """Write rows to a new JSONL file in the home, to be imported later. The file appears complete or
        not at all; if it cannot be written (a full disk), the rows are dropped, counted and logged."""
        if not batch:
            return None
        rescue = self.home / f"{RESCUE_PREFIX}{utc_now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}.jsonl"
        lines = "".join(
            json.dumps({**p.row(), "created_at": p.created_at.isoformat()}, ensure_ascii=False) + "\n"
            for p in self._prepared(batch)
        )
        try:
            write_text_atomically(rescue, lines)
        except OSError as exc:
            self.dropped += len(batch)
            if self.on_dropped is not None:
                self.on_dropped(len(batch))
            log.error(
                "prediction log: %s, and the rescue file %s could not be written (%s): %d rows dropped",
                why,
                rescue,
                exc,
                len(batch),
            )
            return None
        log.error(
            "prediction log: %s; %d rows saved to %s (imported at the next start or by tuneloop log import)",
            why,
            len(batch),
            rescue,
        )
        return rescue

    def import_rescued(self) -> tuple[int, int]:
        """Rescue files of earlier runs, back into the database: (rows imported, files imported).

        Idempotent: rows already there are skipped, and a file is removed only after its rows are committed.
        A file the database still refuses stays where it is (and is logged)."""
        imported, files = 0, 0
        for path in sorted(self.home.glob(f"{RESCUE_PREFIX}*.jsonl")):
            try:
                rows = [_rescued_row(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
                new = []
                with self._sessions.begin() as session:  # one transaction per file, in slices of bounded size
                    for start in range(0, len(rows), ROWS_PER_STATEMENT):
                        part = rows[start : start + ROWS_PER_STATEMENT]
                        ids = [row.id for row in part]
                        there = set(session.scalars(select(PredictionRecord.id).where(PredictionRecord.id.in_(ids))))
                        fresh = [row for row in part if row.id not in there]
                        if fresh:
                            session.execute(insert(PredictionRecord), [row.row() for row in fresh])
                        new += fresh
            except (OSError, ValueError, KeyError, TypeError, SQLAlchemyError) as exc:
                log.error("prediction log: could not import %s (%s); it is kept", path, first_line(exc))
                continue
            path.unlink()
            imported += len(new)
            files += 1
        if files:
            log.info("prediction log: imported %d rows from %d rescue files", imported, files)
        return imported, files

    def close(self) -> None:
        """Stop the writer and flush; what the database will not take goes to a rescue file."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.flush()
        except Exception:
            with self._pending_lock:
                left, self._pending = self._pending, []
            self._rescue(left, "the database was unavailable at shutdown")
        self.engine.dispose()

    def get(self, prediction_id: str) -> PredictionRecord | None:
        """A stored prediction; one still in the buffer, or in a write under way, is written first."""
        with self._sessions() as session:
            found = session.get(PredictionRecord, prediction_id)
        if found is None:
            self.write_now([prediction_id])
            with self._sessions() as session:
                found = session.get(PredictionRecord, prediction_id)
        return found

    def add_feedback(
        self,
        prediction_id: str,
        corrected_label: str | None = None,
        rating: int | None = None,
        comment: str | None = None,
        sender: str = ANONYMOUS,
        trusted: bool = False,
    ) -> FeedbackRecord:
        """Commit one piece of feedback from `sender` (an API key's id, or anonymous); the prediction must exist
        (pending ones are flushed first). Untrusted feedback waits for review before it trains."""
        if self.get(prediction_id) is None:
            raise TuneloopError(f"no prediction with id '{prediction_id}'")
        row = FeedbackRecord(
            prediction_id=prediction_id,
            created_at=utc_now(),
            corrected_label=corrected_label,
            rating=rating,
            comment=self._stored_text(comment) if comment else comment,
            sender=sender,
            trusted=trusted,
            review="pending",
        )
        with self._sessions.begin() as session:
            session.add(row)
        return row

    def record_trusted_senders(self, senders: Collection[str]) -> None:
        """Make these API keys' ids the ones whose feedback trains without review (a server does it as it starts,
        with its keys): feedback of a key left out stops counting as trusted, however long ago it was sent."""
        wanted = set(senders)
        for attempt in (1, 2):  # two replicas starting at once may both add the same sender
            try:
                with self._sessions.begin() as session:
                    session.execute(delete(TrustedSender).where(TrustedSender.sender.not_in(wanted)))
                    there = set(session.scalars(select(TrustedSender.sender)))
                    session.add_all(TrustedSender(sender=sender, since=utc_now()) for sender in wanted - there)
                return
            except IntegrityError:
                if attempt == 2:
                    raise

    @staticmethod
    def _trust_now(session: Session, rows: list[Row]) -> list[Row]:
        """The rows, detached, with `trusted` as it stands now: feedback an API key sent while trusted is trusted
        only while that key still is (trusted_senders); what a person recorded with the CLI stays trusted."""
        trusted = set(session.scalars(select(TrustedSender.sender)))
        session.expunge_all()  # changed below for the caller only, never written back
        for feedback, _ in rows:
            if feedback.trusted and feedback.sender.startswith(KEY_SENDER_PREFIX) and feedback.sender not in trusted:
                feedback.trusted = False
        return rows

    def feedback_for(self, model_name: str) -> list[tuple[FeedbackRecord, PredictionRecord]]:
        """All feedback on predictions of a model name, oldest first, with the prediction it is about (trusted as it
        stands now)."""
        self.flush()
        with self._sessions() as session:
            query = (
                select(FeedbackRecord, PredictionRecord)
                .join(PredictionRecord, FeedbackRecord.prediction_id == PredictionRecord.id)
                .where(PredictionRecord.model_name == model_name)
                .order_by(FeedbackRecord.created_at, FeedbackRecord.id)
            )
            return self._trust_now(session, [(f, p) for f, p in session.execute(query)])

    def recent_predictions(
        self, model_name: str, limit: int, since: datetime | None = None, until: datetime | None = None
    ) -> list[PredictionRecord]:
        """The latest `limit` predictions of a model name (every version), newest first; only those made at or
        after `since` and before `until` when they are given. What monitoring and the labelling suggestions
        look at."""
        self.flush()
        query = select(PredictionRecord).where(PredictionRecord.model_name == model_name)
        if since is not None:
            query = query.where(PredictionRecord.created_at >= since)
        if until is not None:
            query = query.where(PredictionRecord.created_at < until)
        query = query.order_by(PredictionRecord.created_at.desc(), PredictionRecord.id).limit(limit)
        with self._sessions() as session:
            return list(session.scalars(query))

    def recent_predictions_in_turns(self, model_name: str, limit: int) -> list[PredictionRecord]:
        """Up to `limit` recent predictions of a model name, newest first, chosen in turns from each requester (each
        one's newest first) among the latest TURNS_SCAN × `limit`: one requester's flood takes its share of the
        window, not all of it. With one requester, the latest `limit`."""
        self.flush()
        latest = (
            select(PredictionRecord.id, PredictionRecord.requester, PredictionRecord.created_at)
            .where(PredictionRecord.model_name == model_name)
            .order_by(PredictionRecord.created_at.desc(), PredictionRecord.id)
            .limit(limit * TURNS_SCAN)
            .subquery()
        )
        turn = func.row_number().over(
            partition_by=latest.c.requester, order_by=(latest.c.created_at.desc(), latest.c.id)
        )
        ranked = select(latest.c.id, turn.label("turn")).subquery()
        query = (
            select(PredictionRecord)
            .join(ranked, PredictionRecord.id == ranked.c.id)
            .order_by(ranked.c.turn, PredictionRecord.created_at.desc(), PredictionRecord.id)
            .limit(limit)
        )
        with self._sessions() as session:
            chosen = list(session.scalars(query))
        return sorted(chosen, key=lambda p: (p.created_at, p.id), reverse=True)

    def feedback_for_predictions(self, prediction_ids: list[str]) -> list[tuple[FeedbackRecord, PredictionRecord]]:
        """All feedback on these predictions, oldest first, with the prediction it is about."""
        rows: list[tuple[FeedbackRecord, PredictionRecord]] = []
        with self._sessions() as session:
            for start in range(0, len(prediction_ids), ROWS_PER_STATEMENT):
                query = (
                    select(FeedbackRecord, PredictionRecord)
                    .join(PredictionRecord, FeedbackRecord.prediction_id == PredictionRecord.id)
                    .where(FeedbackRecord.prediction_id.in_(prediction_ids[start : start + ROWS_PER_STATEMENT]))
                    .order_by(FeedbackRecord.created_at, FeedbackRecord.id)
                )
                rows += [(f, p) for f, p in session.execute(query)]
            return self._trust_now(session, rows)

    def set_review(self, feedback_ids: list[int], review: Review, reviewer: str) -> int:
        """Record an admin's verdict on these feedback rows, all or none; returns how many there were."""
        if not feedback_ids:
            return 0
        with self._sessions.begin() as session:
            found = set(session.scalars(select(FeedbackRecord.id).where(FeedbackRecord.id.in_(feedback_ids))))
            missing = sorted(set(feedback_ids) - found)
            if missing:
                shown = ", ".join(map(str, missing[:10])) + (" …" if len(missing) > 10 else "")
                raise NotFound(f"no feedback with id {shown}; nothing was changed (ids come from the review queue)")
            session.execute(
                update(FeedbackRecord)
                .where(FeedbackRecord.id.in_(feedback_ids))
                .values(review=review, reviewed_by=reviewer, reviewed_at=utc_now())
            )
        return len(found)

    def feedback_count_since(self, sender: str, since: datetime) -> int:
        """How much feedback `sender` sent since then (for its daily quota)."""
        with self._sessions() as session:
            query = select(func.count(FeedbackRecord.id)).where(
                FeedbackRecord.sender == sender, FeedbackRecord.created_at >= since
            )
            return session.scalar(query) or 0

    def recent_feedback(self, limit: int) -> list[tuple[FeedbackRecord, PredictionRecord]]:
        """The latest feedback across all models, newest first, with the prediction it is about."""
        with self._sessions() as session:
            query = (
                select(FeedbackRecord, PredictionRecord)
                .join(PredictionRecord, FeedbackRecord.prediction_id == PredictionRecord.id)
                .order_by(FeedbackRecord.created_at.desc(), FeedbackRecord.id.desc())
                .limit(limit)
            )
            return self._trust_now(session, [(f, p) for f, p in session.execute(query)])

    def count(self, model_name: str | None = None) -> dict[str, int]:
        """Stored predictions and feedback rows (optionally for one model name)."""
        self.flush()
        predictions = select(func.count(PredictionRecord.id))
        feedback = select(func.count(FeedbackRecord.id)).join(PredictionRecord)
        if model_name:
            predictions = predictions.where(PredictionRecord.model_name == model_name)
            feedback = feedback.where(PredictionRecord.model_name == model_name)
        with self._sessions() as session:
            return {"predictions": session.scalar(predictions) or 0, "feedback": session.scalar(feedback) or 0}
