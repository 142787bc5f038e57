"""Conversation history: every turn of every session, in the same database as the prediction log."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import Boolean, DateTime, Engine, Float, Integer, String, Text, select
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker

from tuneloop.db import Base


class ChatTurn(Base):
    """One user message and the assistant's answer, with what the assistant understood."""

    __tablename__ = "chat_turns"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: uuid.uuid4().hex)
    session_id: Mapped[str] = mapped_column(String(100), index=True)
    assistant: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=lambda: datetime.now(UTC))
    message: Mapped[str] = mapped_column(Text)
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


class ConversationStore:
    def __init__(self, engine: Engine) -> None:
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    def add(self, turn: ChatTurn) -> ChatTurn:
        with self._sessions.begin() as session:
            session.add(turn)
        return turn

    def recent(self, session_id: str, limit: int) -> list[ChatTurn]:
        """The session's last `limit` turns, oldest first."""
        with self._sessions() as session:
            rows = session.scalars(
                select(ChatTurn)
                .where(ChatTurn.session_id == session_id)
                .order_by(ChatTurn.created_at.desc())
                .limit(limit)
            )
            return list(rows)[::-1]

    def rate(self, turn_id: str, rating: int | None, comment: str | None) -> None:
        with self._sessions.begin() as session:
            turn = session.get(ChatTurn, turn_id)
            if rating is not None:
                turn.rating = rating
            if comment:
                turn.comment = comment

    def get(self, turn_id: str) -> ChatTurn | None:
        with self._sessions() as session:
            return session.get(ChatTurn, turn_id)
