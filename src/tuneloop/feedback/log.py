"""The prediction log: every served prediction and every piece of feedback on it, in the database.

Predictions are written in batches by a background thread so that the request path never waits on the
database; feedback is rare and precious, so it is committed before the request returns. A clean close
flushes everything; if the database refuses the last batch, the rows go to a JSONL file in the home
folder instead of being dropped.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from sqlalchemy import func, insert, select
from sqlalchemy.orm import sessionmaker

from tuneloop.atomic import write_text_atomically
from tuneloop.db import open_database
from tuneloop.db.schema import FeedbackRecord, PredictionRecord, utc_now
from tuneloop.errors import TuneloopError

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
        )


def new_prediction_id() -> str:
    return uuid.uuid4().hex


class PredictionLog:
    """Buffered prediction writes plus synchronous feedback writes over one database."""

    def __init__(
        self, database_url: str, home: Path, flush_ms: float = 200.0, max_batch: int = 512, max_backlog: int = 200_000
    ) -> None:
        self.engine = open_database(database_url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.home = Path(home)
        self.flush_seconds = flush_ms / 1000
        self.max_batch = max_batch
        # While the database is down rows wait in memory; past this many they are moved to a rescue file.
        self.max_backlog = max_backlog
        self._pending: list[LoggedPrediction] = []
        self._pending_lock = threading.Lock()
        self._write_lock = threading.Lock()  # one writer at a time: the thread, flush() or close()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.written = 0

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
        if backlog >= self.max_batch:
            self._wake.set()

    @property
    def backlog(self) -> int:
        with self._pending_lock:
            return len(self._pending)

    def _run(self) -> None:
        while not self._closed.is_set():
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # the writer must outlive any error: the rows are back in the buffer
                log.exception("prediction log: write failed, %d rows kept in memory", self.backlog)
                if self.backlog > self.max_backlog:
                    self._rescue(self._take_pending(), "the database stayed unavailable")
                time.sleep(min(self.flush_seconds * 5, 2.0))

    def _take_pending(self) -> list[LoggedPrediction]:
        with self._pending_lock:
            batch, self._pending = self._pending, []
        return batch

    def _insert(self, batch: list[LoggedPrediction]) -> None:
        # NUL cannot be stored in a PostgreSQL text column; it carries no meaning in a message anyway.
        rows = [{**vars(p), "text": p.text.replace("\x00", "")} for p in batch]
        with self._sessions.begin() as session:
            session.execute(insert(PredictionRecord), rows)

    def _database_answers(self) -> bool:
        try:
            with self.engine.connect() as connection:
                connection.execute(select(1))
            return True
        except Exception:
            return False

    def flush(self) -> int:
        """Write every pending prediction now; returns how many were written.

        If the batch fails while the database answers, the rows are written one by one: when only some are
        refused the fault is theirs, and they go to a rescue file so that they cannot block the rest. When
        the database does not answer, or refuses every row (a missing table, a full disk), the batch goes
        back to the buffer and the error is raised.
        """
        with self._write_lock:
            batch = self._take_pending()
            if not batch:
                return 0
            try:
                self._insert(batch)
            except Exception:
                refused = batch
                if self._database_answers():
                    refused = []
                    for prediction in batch:
                        try:
                            self._insert([prediction])
                        except Exception:
                            refused.append(prediction)
                if len(refused) == len(batch):
                    with self._pending_lock:
                        self._pending = batch + self._pending
                    raise
                self._rescue(refused, "the database refused these rows")
                batch = [p for p in batch if p not in refused]
            self.written += len(batch)
            return len(batch)

    def _rescue(self, batch: list[LoggedPrediction], why: str) -> Path | None:
        """Write rows to a new JSONL file in the home: kept for a human, never dropped. The file appears
        complete or not at all (written under another name, then renamed)."""
        if not batch:
            return None
        rescue = self.home / f"unsaved-predictions-{utc_now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}.jsonl"
        write_text_atomically(
            rescue,
            "".join(
                json.dumps({**vars(p), "created_at": p.created_at.isoformat()}, ensure_ascii=False) + "\n"
                for p in batch
            ),
        )
        log.error("prediction log: %s; %d rows saved to %s", why, len(batch), rescue)
        return rescue

    def close(self) -> None:
        """Stop the writer and flush; rows the database refuses are saved to a JSONL file."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.flush()
        except Exception:
            self._rescue(self._take_pending(), "the database was unavailable at shutdown")
        self.engine.dispose()

    def get(self, prediction_id: str) -> PredictionRecord | None:
        """A stored prediction; one still in the buffer, or in a write under way, is written first."""
        with self._sessions() as session:
            found = session.get(PredictionRecord, prediction_id)
        if found is None:
            self.flush()  # takes the write lock, so it also waits for a batch the writer thread is committing
            with self._sessions() as session:
                found = session.get(PredictionRecord, prediction_id)
        return found

    def add_feedback(
        self,
        prediction_id: str,
        corrected_label: str | None = None,
        rating: int | None = None,
        comment: str | None = None,
    ) -> FeedbackRecord:
        """Commit one piece of feedback; the prediction must exist (pending ones are flushed first)."""
        if self.get(prediction_id) is None:
            raise TuneloopError(f"no prediction with id '{prediction_id}'")
        row = FeedbackRecord(
            prediction_id=prediction_id,
            created_at=utc_now(),
            corrected_label=corrected_label,
            rating=rating,
            comment=comment,
        )
        with self._sessions.begin() as session:
            session.add(row)
        return row

    def feedback_for(self, model_name: str) -> list[tuple[FeedbackRecord, PredictionRecord]]:
        """All feedback on predictions of a model name, oldest first, with the prediction it is about."""
        self.flush()
        with self._sessions() as session:
            query = (
                select(FeedbackRecord, PredictionRecord)
                .join(PredictionRecord, FeedbackRecord.prediction_id == PredictionRecord.id)
                .where(PredictionRecord.model_name == model_name)
                .order_by(FeedbackRecord.created_at, FeedbackRecord.id)
            )
            return [(f, p) for f, p in session.execute(query)]

    def recent_feedback(self, limit: int) -> list[tuple[FeedbackRecord, PredictionRecord]]:
        """The latest feedback across all models, newest first, with the prediction it is about."""
        with self._sessions() as session:
            query = (
                select(FeedbackRecord, PredictionRecord)
                .join(PredictionRecord, FeedbackRecord.prediction_id == PredictionRecord.id)
                .order_by(FeedbackRecord.created_at.desc(), FeedbackRecord.id.desc())
                .limit(limit)
            )
            return [(f, p) for f, p in session.execute(query)]

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
