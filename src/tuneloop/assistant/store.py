"""Conversation history: every turn of every session, in the same database as the prediction log."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Engine, select
from sqlalchemy.orm import sessionmaker

from tuneloop.data.clean import clean_text
from tuneloop.db.schema import ChatTurn
from tuneloop.errors import NotFound
from tuneloop.feedback.log import text_digest


class ConversationStore:
    def __init__(self, engine: Engine, mask: Callable[[str], str] | None = None, secret: bytes | None = None) -> None:
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self.mask = mask  # privacy.mask: personal data in messages, replies and comments, replaced before storing
        self.secret = secret  # the home's privacy secret: each message keeps a digest that erasure finds it by

    def _stored(self, text: str) -> str:
        """With masking on, the cleaned text masked (cleaning would otherwise decode `alice&#64;example.com`
        into an address wherever the text is read back and cleaned)."""
        return self.mask(clean_text(text)) if self.mask is not None else text

    def add(self, turn: ChatTurn) -> ChatTurn:
        if self.secret is not None:
            turn.message_digest = text_digest(self.secret, turn.message)
        turn.message, turn.reply = self._stored(turn.message), self._stored(turn.reply)
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

    def owner(self, session_id: str) -> str | None:
        """Who opened the session (None: there is no such session)."""
        with self._sessions() as session:
            return session.scalar(select(ChatTurn.sender).where(ChatTurn.session_id == session_id).limit(1))

    def rate(self, turn_id: str, rating: int | None, comment: str | None) -> None:
        with self._sessions.begin() as session:
            turn = session.get(ChatTurn, turn_id)
            if turn is None:  # purged (privacy.retention, forget) since the caller looked it up
                raise NotFound(f"no chat turn '{turn_id}' (it may have been purged): nothing was rated")
            if rating is not None:
                turn.rating = rating
            if comment:
                turn.comment = self._stored(comment)

    def get(self, turn_id: str) -> ChatTurn | None:
        with self._sessions() as session:
            return session.get(ChatTurn, turn_id)
