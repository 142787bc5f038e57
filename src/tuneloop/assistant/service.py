"""A chat turn as a server runs it: the models' passes fanned out at once, the session's recent turns, the
reply generated whole or streamed, and the turn stored with its two logged predictions.

The server hands in how to run a model (its micro-batchers) and the embedder (on its inference thread), so
chat turns share forward passes with each other and with /v1/predict; the HTTP route only shapes answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import numpy as np
from starlette.concurrency import run_in_threadpool

from tuneloop.assistant.runtime import AssistantRuntime
from tuneloop.assistant.store import ConversationStore
from tuneloop.assistant.turn import TurnOutcome
from tuneloop.data.clean import clean_text
from tuneloop.db.schema import ANONYMOUS, UNKNOWN_REQUESTER, ChatTurn, utc_now
from tuneloop.errors import NotFound, Unavailable
from tuneloop.feedback.log import LoggedPrediction, PredictionLog
from tuneloop.models.classifier import softmax
from tuneloop.models.predictor import Predictor

log = logging.getLogger(__name__)

# (model name, cleaned texts) → the version that answered and its logits rows, all tasks' columns.
Classify = Callable[[str, list[str]], Awaitable[tuple[Predictor, np.ndarray]]]
# cleaned texts → unit vectors for the FAQ search.
Embed = Callable[[list[str]], Awaitable[np.ndarray]]


@dataclass
class Understood:
    """A message after the forward passes, with the session's recent turns."""

    text: str
    intent: Predictor
    intent_logits: np.ndarray
    sentiment: Predictor
    sentiment_logits: np.ndarray
    vector: np.ndarray
    recent: list[ChatTurn]


@dataclass
class StoredTurn:
    """A finished turn: what was decided and said, and the row it is kept in (its id is the turn id)."""

    outcome: TurnOutcome
    turn: ChatTurn


class ChatService:
    def __init__(
        self,
        runtime: AssistantRuntime,
        classify: Classify,
        embed: Embed,
        conversations: ConversationStore,
        prediction_log: PredictionLog,
        on_turn: Callable[[TurnOutcome], None] | None = None,
        max_streams: int | None = None,
    ) -> None:
        """`max_streams`: most turns answered at once, whole or streamed (a generating LM holds a thread and the
        CPU for seconds); more are refused with Unavailable at once, before any work."""
        self.runtime = runtime
        self.classify = classify
        self.embed = embed
        self.conversations = conversations
        self.prediction_log = prediction_log
        self.on_turn = on_turn
        self.max_streams = max_streams
        self.in_progress = 0  # turns between take_slot() and release_slot(); one event loop, so no lock

    def take_slot(self) -> None:
        """Count one more turn in progress, or refuse it (503) when max_streams are: checked and counted with no
        await between, so a burst cannot pass the check together."""
        if self.max_streams is not None and self.in_progress >= self.max_streams:
            raise Unavailable(f"{self.in_progress} chat turns are being answered (serve.max_streams); retry shortly")
        self.in_progress += 1

    def release_slot(self) -> None:
        self.in_progress -= 1

    async def session_for(self, session_id: str | None, sender: str) -> str:
        """The session a turn belongs to: a new one (its id made here, unguessable) when none is named, else the
        named one if `sender` opened it. Another sender's session is "not found", never read: its turns would
        reach the reply generator's prompt."""
        if session_id is None:
            return uuid.uuid4().hex
        if await run_in_threadpool(self.conversations.owner, session_id) != sender:
            raise NotFound(
                f"no chat session '{session_id}' opened with this key: leave session_id out to start one "
                "(its id comes back in the answer)"
            )
        return session_id

    async def understand(self, session_id: str, message: str) -> Understood:
        """Intent (and sentiment, unless the intent model has a sentiment head), the FAQ embedding and the
        session's recent turns, all at once."""
        text = clean_text(message)
        vectors, recent, (intent, rows), sentiment_output = await asyncio.gather(
            self.embed([text]),
            run_in_threadpool(self.conversations.recent, session_id, self.runtime.turns_to_recall),
            self.classify(self.runtime.definition.intent_model, [text]),
            self._sentiment_pass(text),
        )
        intent_logits, sentiment, sentiment_logits = self.runtime.split(intent, rows, sentiment_output)
        return Understood(text, intent, intent_logits[0], sentiment, sentiment_logits[0], vectors[0], recent)

    async def _sentiment_pass(self, text: str) -> tuple[Predictor, np.ndarray] | None:
        """The sentiment model's output; none for a multi-task intent model, which gives it in the same pass."""
        if self.runtime.multitask:
            return None
        return await self.classify(self.runtime.definition.sentiment_model, [text])

    def plan(self, seen: Understood) -> TurnOutcome:
        return self.runtime.plan(
            seen.text,
            seen.intent,
            seen.intent_logits,
            seen.sentiment,
            seen.sentiment_logits,
            seen.vector,
            [t.sentiment for t in seen.recent],
            [(t.message, t.reply) for t in seen.recent],
        )

    async def record(
        self,
        session_id: str,
        message: str,
        seen: Understood,
        outcome: TurnOutcome,
        sender: str,
        requester: str = UNKNOWN_REQUESTER,
    ) -> StoredTurn:
        """Log both predictions and store the turn, the predictions committed first: a turn in the database
        always has its predictions, so feedback on it after a crash never finds them missing. Only this turn's
        rows are written here; the rest of the log's backlog is the writer thread's."""
        now = utc_now()
        intent_record, sentiment_record = (
            LoggedPrediction.of(
                model.name, model.registered_version, model.labels, message, softmax(logits), "chat", now, requester
            )
            for model, logits in ((seen.intent, seen.intent_logits), (seen.sentiment, seen.sentiment_logits))
        )
        self.prediction_log.record([intent_record, sentiment_record])
        await run_in_threadpool(self.prediction_log.write_now, [intent_record.id, sentiment_record.id])
        turn = await run_in_threadpool(
            self.conversations.add,
            ChatTurn(
                session_id=session_id,
                sender=sender,
                assistant=self.runtime.definition.name,
                message=message,
                reply=outcome.reply,
                lang=outcome.lang,
                intent=outcome.intent,
                predicted_intent=outcome.predicted_intent,
                confidence=outcome.confidence,
                sentiment=outcome.sentiment,
                escalate=outcome.escalate,
                reason=outcome.reason,
                faq_question=outcome.faq_answer.entry.question if outcome.faq_answer else None,
                intent_model=seen.intent.ref,
                intent_prediction_id=intent_record.id,
                sentiment_prediction_id=sentiment_record.id,
            ),
        )
        if self.on_turn is not None:
            self.on_turn(outcome)
        return StoredTurn(outcome, turn)

    async def reply(
        self, session_id: str, message: str, sender: str = ANONYMOUS, requester: str = UNKNOWN_REQUESTER
    ) -> StoredTurn:
        """One whole turn: understood, decided, the reply generated, stored."""
        self.take_slot()
        try:
            seen = await self.understand(session_id, message)
            outcome = await run_in_threadpool(self.plan, seen)
            if outcome.request is not None:
                outcome.reply = await run_in_threadpool(self.runtime.generator.generate, outcome.request)
            return await self.record(session_id, message, seen, outcome, sender, requester)
        finally:
            self.release_slot()

    async def stream(
        self, session_id: str, message: str, sender: str = ANONYMOUS, requester: str = UNKNOWN_REQUESTER
    ) -> StreamedTurn:
        """The turn as it happens (see StreamedTurn). Understanding and deciding happen before this returns,
        so their errors come before any answer is streamed."""
        self.take_slot()
        try:
            seen = await self.understand(session_id, message)
            outcome = await run_in_threadpool(self.plan, seen)
        except BaseException:
            self.release_slot()
            raise
        return StreamedTurn(self, session_id, message, seen, outcome, sender, requester)


class StreamedTurn:
    """A streamed turn holds the slot its service took for it (`take_slot`) from creation until `end()`.

    Iterating it gives the decision (a TurnOutcome), then pieces of the reply (str), then the stored turn. A
    client that goes away mid-reply stops the generation, and the turn is still stored with what was said
    so far. `end()` is idempotent and runs when the iteration finishes; the HTTP route also runs it after
    the response, because a client that leaves before the first byte means the iteration never starts, and
    the slot must come back all the same.
    """

    def __init__(
        self,
        service: ChatService,
        session_id: str,
        message: str,
        seen: Understood,
        outcome: TurnOutcome,
        sender: str = ANONYMOUS,
        requester: str = UNKNOWN_REQUESTER,
    ):
        self.service, self.session_id, self.message, self.seen, self.outcome = (
            service,
            session_id,
            message,
            seen,
            outcome,
        )
        self.sender, self.requester = sender, requester
        self.words: list[str] = []
        self.pieces: Iterator[str] | None = None
        self.recorded = self.ended = False

    def __aiter__(self) -> AsyncIterator[TurnOutcome | str | StoredTurn]:
        return self._events()

    async def _events(self) -> AsyncIterator[TurnOutcome | str | StoredTurn]:
        outcome, generator = self.outcome, self.service.runtime.generator
        self.pieces = iter([outcome.reply] if outcome.request is None else generator.stream(outcome.request))
        try:
            yield outcome
            while (piece := await run_in_threadpool(next, self.pieces, None)) is not None:
                self.words.append(piece)
                yield piece
            outcome.reply = "".join(self.words).strip()
            stored = await self.service.record(
                self.session_id, self.message, self.seen, outcome, self.sender, self.requester
            )
            self.recorded = True
            yield stored
        finally:
            self._end()

    async def end(self) -> None:
        self._end()

    def _end(self) -> None:
        if self.ended:
            return
        self.ended = True
        self.service.release_slot()
        if self.recorded:
            return
        if self.pieces is not None:
            with contextlib.suppress(ValueError, AttributeError):
                self.pieces.close()  # type: ignore[attr-defined]  # a generator stops its model thread when closed
        self.outcome.reply = "".join(self.words).strip() or self.outcome.reply
        task = asyncio.get_running_loop().create_task(
            self.service.record(self.session_id, self.message, self.seen, self.outcome, self.sender, self.requester)
        )
        task.add_done_callback(_log_failed_record)


def _log_failed_record(task: asyncio.Task[StoredTurn]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("an interrupted chat turn could not be stored: %s", task.exception())
