"""Every table tuneloop keeps, in one place: the registry's versions and production history, the prediction
log and its feedback, the assistant's chat turns. Alembic and the stores read them from here."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

Stage = Literal["candidate", "production", "archived"]
# An admin's verdict on a piece of feedback; only approved (or trusted and not rejected) feedback trains.
Review = Literal["pending", "approved", "rejected"]
ANONYMOUS = "anonymous"  # the sender of feedback sent without a known API key
KEY_SENDER_PREFIX = "key:"  # an API key's id as a sender (serve.security.key_id); the CLI's senders are "cli:user"
# Who asked for a prediction logged before requesters were recorded (migration 0006).
UNKNOWN_REQUESTER = "unknown"
# The owner of chat sessions opened before they had owners (their ids were chosen by clients, so guessable):
# no caller is ever this sender, so nobody can continue them (migration 0006).
PRE_UPGRADE_OWNER = "pre-upgrade"


def utc_now() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A moment in UTC, time zone included when read back on every database.

    SQLite keeps no time zone and hands back naive datetimes, which JSON then shows without an offset (not an
    RFC 3339 date-time); PostgreSQL's timestamptz keeps it. Same column type (no migration), same values out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"a naive datetime ({value}) would be stored without knowing its time zone")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class ModelVersion(Base):
    """One registered version of a named model."""

    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("name", "version"),
        # At most one production version per name, whatever runs at once (migration 0002).
        Index(
            "uq_model_versions_one_production",
            "name",
            unique=True,
            sqlite_where=text("stage = 'production'"),
            postgresql_where=text("stage = 'production'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    version: Mapped[int] = mapped_column(Integer)
    stage: Mapped[Stage] = mapped_column(String(20), default="candidate")
    base_model: Mapped[str] = mapped_column(String(500))
    data_fingerprint: Mapped[str] = mapped_column(String(64))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    parent: Mapped[str | None] = mapped_column(String(220), nullable=True)
    artifact_dir: Mapped[str] = mapped_column(String(1000))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    promoted_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


class StageChange(Base):
    """One change of a model's production version: what was replaced, why, and whether it was undone.

    Rollback walks this history backwards, so it restores the version that was live before, not
    merely the previous version number.
    """

    __tablename__ = "stage_changes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    version: Mapped[int] = mapped_column(Integer)
    previous_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    kind: Mapped[str] = mapped_column(String(20))  # promote | rollback
    reason: Mapped[str] = mapped_column(String(500), default="")
    undone: Mapped[bool] = mapped_column(Boolean, default=False)
    at: Mapped[datetime] = mapped_column(UtcDateTime())


class PredictionRecord(Base):
    """One label given to one text by one model version."""

    __tablename__ = "predictions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), index=True)
    model_name: Mapped[str] = mapped_column(String(200), index=True)
    model_version: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    label: Mapped[str] = mapped_column(String(200))
    scores: Mapped[dict[str, float]] = mapped_column(JSON)
    source: Mapped[str] = mapped_column(String(20), default="api")
    # Who asked: an API key's id, or for a caller without a key a keyed digest of its address (never the address);
    # the labelling suggestions take turns between requesters, so one cannot fill them.
    requester: Mapped[str] = mapped_column(String(80), default=UNKNOWN_REQUESTER, server_default=UNKNOWN_REQUESTER)
    # A keyed digest of the text as it came (feedback.log.text_digest): what erasure finds a user's text by, since
    # `text` is masked and the same masked text may be anybody's. Null for rows stored before it existed.
    text_digest: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)


class FeedbackRecord(Base):
    """What a user said about a prediction: the right label, a rating (-1, 0, 1) and/or a comment; who said it
    (the API key's id, or anonymous), whether that key was trusted then, and an admin's review."""

    __tablename__ = "feedback"
    __table_args__ = (Index("ix_feedback_sender_created_at", "sender", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prediction_id: Mapped[str] = mapped_column(ForeignKey("predictions.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), index=True)
    corrected_label: Mapped[str | None] = mapped_column(String(200), nullable=True)
    rating: Mapped[int | None] = mapped_column(Integer, nullable=True)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    sender: Mapped[str] = mapped_column(String(80), default=ANONYMOUS, server_default=ANONYMOUS)
    trusted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    review: Mapped[Review] = mapped_column(String(10), default="pending", server_default="pending")
    reviewed_by: Mapped[str | None] = mapped_column(String(80), nullable=True)
    reviewed_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)


class ChatTurn(Base):
    """One user message and the assistant's answer, with what the assistant understood."""

    __tablename__ = "chat_turns"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: uuid.uuid4().hex)
    session_id: Mapped[str] = mapped_column(String(100), index=True)
    # The key that opened the session (its id, or anonymous): only it may continue the session.
    sender: Mapped[str] = mapped_column(String(80), default=ANONYMOUS, server_default=ANONYMOUS)
    assistant: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utc_now)
    message: Mapped[str] = mapped_column(Text)
    message_digest: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)  # as text_digest
    reply: Mapped[str] = mapped_column(Text)
    lang: Mapped[str] = mapped_column(String(8))
    intent: Mapped[str | None] = mapped_column(String(200), nullable=True)  # None: out of scope
    predicted_intent: Mapped[str] = mapped_column(String(200))
    confidence: Mapped[float] = mapped_column(Float)
    sentiment: Mapped[str] = mapped_column(String(20))
    escalate: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str | None] = mapped_column(String(200), nullable=True)
    faq_question: Mapped[str | None] = mapped_column(Text, nullable=True)
    intent_model: Mapped[str] = mapped_column(String(220))
    # No foreign keys: the predictions reach their table through the buffered log, maybe after this row.
    intent_prediction_id: Mapped[str] = mapped_column(String(32), index=True)
    sentiment_prediction_id: Mapped[str] = mapped_column(String(32))
    # The user's verdict on the reply itself (thumbs), latest wins; corrections go to the intent prediction.
    rating: Mapped[int | None] = mapped_column(Integer, nullable=True)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)


class TrustedSender(Base):
    """A sender whose feedback trains without review, as the latest server start's keys say (serve.trusted_key_hashes
    and the admin keys). Feedback counts as trusted only while its sender is here: a key no longer trusted stops its
    earlier feedback from training, which then waits for review like anyone's."""

    __tablename__ = "trusted_senders"

    sender: Mapped[str] = mapped_column(String(80), primary_key=True)
    since: Mapped[datetime] = mapped_column(UtcDateTime())


class Lease(Base):
    """Who holds a named lease (one retrain or gate per model at a time, whatever process or machine runs it)
    and until when: a holder renews it while it works, so one killed outright frees it once it expires."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(250), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    purpose: Mapped[str] = mapped_column(String(500))
    acquired_at: Mapped[datetime] = mapped_column(UtcDateTime())
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())
