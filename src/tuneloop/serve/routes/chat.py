"""The assistant over HTTP: one chat turn per request."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from tuneloop.assistant.runtime import AssistantRuntime
from tuneloop.assistant.store import ChatTurn
from tuneloop.assistant.turn import TurnOutcome
from tuneloop.data.clean import clean_text
from tuneloop.models.classifier import softmax
from tuneloop.serve.deps import Assistant, ServerState, State
from tuneloop.serve.models import LoadedModel
from tuneloop.serve.routes.predict import check_text_length, classify, logged
from tuneloop.serve.schemas import ERRORS, AssistantInfo, ChatRequest, ChatResponse, FaqSource
from tuneloop.serve.security import require_client

router = APIRouter()


@router.get(
    "/v1/assistant",
    response_model=AssistantInfo,
    responses=ERRORS,
    tags=["chat"],
    dependencies=[Depends(require_client)],
)
async def assistant_info(assistant: Assistant, state: State) -> AssistantInfo:
    """What the chat page needs: the assistant's name, languages and the intents a user may pick."""
    definition = assistant.definition
    intent = state.served.slots[definition.intent_model].current
    sentiment = (
        f"{definition.intent_model}:{definition.sentiment_task}@{intent.version}"
        if assistant.multitask
        else state.served.slots[definition.sentiment_model].current.ref
    )
    return AssistantInfo(
        name=definition.name,
        languages=definition.languages,
        intents=intent.labels,
        intent_model=intent.ref,
        sentiment_model=sentiment,
    )


async def embed(state: ServerState, assistant: AssistantRuntime, text: str) -> np.ndarray:
    try:
        return await asyncio.get_running_loop().run_in_executor(
            state.served.inference, assistant.embedder.encode, [text]
        )
    except RuntimeError:  # the inference thread is closed: the server is stopping
        raise HTTPException(503, "the server is shutting down; retry on another instance") from None


@dataclass
class Understood:
    """A message after the forward passes, with the session's recent turns."""

    text: str
    intent: LoadedModel
    intent_logits: np.ndarray
    sentiment: LoadedModel
    sentiment_logits: np.ndarray
    vector: np.ndarray
    recent: list[ChatTurn]


async def understand(body: ChatRequest, assistant: AssistantRuntime, state: ServerState) -> Understood:
    check_text_length(body.message, state.config.serve.max_text_chars, "message")
    definition = assistant.definition
    text = clean_text(body.message)
    passes = [classify(state.served.slots[definition.intent_model], [text])]
    if not assistant.multitask:  # a multi-task intent model gives the sentiment in the same pass
        passes.append(classify(state.served.slots[definition.sentiment_model], [text]))
    vectors, recent, (intent, rows), *sentiment_output = await asyncio.gather(
        embed(state, assistant, text),
        run_in_threadpool(state.conversations.recent, body.session_id, assistant.turns_to_recall),
        *passes,
    )
    intent_logits, sentiment, sentiment_logits = assistant.split(intent, rows, next(iter(sentiment_output), None))
    return Understood(text, intent, intent_logits[0], sentiment, sentiment_logits[0], vectors[0], recent)


def plan(assistant: AssistantRuntime, seen: Understood) -> TurnOutcome:
    return assistant.plan(
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
    body: ChatRequest, assistant: AssistantRuntime, state: ServerState, seen: Understood, outcome: TurnOutcome
) -> ChatResponse:
    """Log both predictions, store the turn, and shape the answer."""
    now = datetime.now(UTC)
    intent_record = logged(seen.intent, body.message, softmax(seen.intent_logits), "chat", now)
    sentiment_record = logged(seen.sentiment, body.message, softmax(seen.sentiment_logits), "chat", now)
    state.prediction_log.record([intent_record, sentiment_record])
    faq_question = outcome.faq_answer.entry.question if outcome.faq_answer else None
    turn = await run_in_threadpool(
        state.conversations.add,
        ChatTurn(
            session_id=body.session_id,
            assistant=assistant.definition.name,
            message=body.message,
            reply=outcome.reply,
            lang=outcome.lang,
            intent=outcome.intent,
            predicted_intent=outcome.predicted_intent,
            confidence=outcome.confidence,
            sentiment=outcome.sentiment,
            escalate=outcome.escalate,
            reason=outcome.reason,
            faq_question=faq_question,
            intent_model=seen.intent.ref,
            intent_prediction_id=intent_record.id,
            sentiment_prediction_id=sentiment_record.id,
        ),
    )
    state.metrics.chat_turns.labels(str(outcome.escalate).lower()).inc()
    return ChatResponse(
        turn_id=turn.id,
        session_id=body.session_id,
        reply=outcome.reply,
        lang=outcome.lang,
        intent=outcome.intent,
        predicted_intent=outcome.predicted_intent,
        confidence=outcome.confidence,
        sentiment=outcome.sentiment,
        escalate=outcome.escalate,
        reason=outcome.reason,
        answered_from_faq=faq_question is not None,
        faq_question=faq_question,
        sources=[
            FaqSource(question=h.entry.question, answer=h.entry.answer, similarity=h.similarity, score=h.score)
            for h in outcome.faq
        ],
        model=seen.intent.ref,
    )


def event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


@router.post(
    "/v1/chat",
    response_model=ChatResponse,
    responses={
        **ERRORS,
        200: {
            "content": {"text/event-stream": {}},
            "description": "With stream=true: Server-Sent Events — `turn` (what was "
            "understood), `token` pieces of the reply, then `done` with the whole answer and its turn_id.",
        },
    },
    tags=["chat"],
    dependencies=[Depends(require_client)],
)
async def chat(
    body: ChatRequest,
    assistant: Assistant,
    state: State,
    stream: Annotated[bool, Query(description="Stream the reply as Server-Sent Events.")] = False,
):
    """One turn: intent (with out-of-scope detection), sentiment, FAQ search, reply, escalation.

    The intent and sentiment models run through the server's batchers, so chat turns share forward passes
    with each other and with /v1/predict; the FAQ embedding runs on the same inference thread. Every turn
    is stored with its session (a streamed one once its reply is complete).
    """
    seen = await understand(body, assistant, state)
    outcome = await run_in_threadpool(plan, assistant, seen)
    if not stream:
        if outcome.request is not None:
            outcome.reply = await run_in_threadpool(assistant.generator.generate, outcome.request)
        return await record(body, assistant, state, seen, outcome)

    async def events() -> AsyncIterator[str]:
        pieces = [outcome.reply] if outcome.request is None else assistant.generator.stream(outcome.request)
        iterator, words, recorded = iter(pieces), [], False
        try:
            yield event(
                "turn",
                {
                    "intent": outcome.intent,
                    "predicted_intent": outcome.predicted_intent,
                    "confidence": outcome.confidence,
                    "sentiment": outcome.sentiment,
                    "escalate": outcome.escalate,
                    "reason": outcome.reason,
                    "lang": outcome.lang,
                },
            )
            while (piece := await run_in_threadpool(next, iterator, None)) is not None:
                words.append(piece)
                yield event("token", {"text": piece})
            outcome.reply = "".join(words).strip()
            answer = await record(body, assistant, state, seen, outcome)
            recorded = True
            yield event("done", answer.model_dump(mode="json"))
        finally:
            if not recorded:  # the client went away mid-reply: stop generating, but keep the turn
                with contextlib.suppress(ValueError, AttributeError):
                    iterator.close()
                outcome.reply = "".join(words).strip() or outcome.reply
                asyncio.get_running_loop().create_task(record(body, assistant, state, seen, outcome))

    return StreamingResponse(events(), media_type="text/event-stream")
