"""The assistant over HTTP: one chat turn per request, and the chat page."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from importlib import resources

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse

from tuneloop.assistant.store import ChatTurn
from tuneloop.data.clean import clean_text
from tuneloop.models.classifier import softmax
from tuneloop.serve.deps import Assistant, State
from tuneloop.serve.routes.predict import check_text_length, classify, logged
from tuneloop.serve.schemas import ERRORS, AssistantInfo, ChatRequest, ChatResponse, FaqSource
from tuneloop.serve.security import require_client

router = APIRouter()


def page(name: str) -> str:
    return resources.files("tuneloop.assistant").joinpath("web", name).read_text(encoding="utf-8")


@router.get("/", include_in_schema=False)
async def chat_page(_: Assistant) -> HTMLResponse:
    return HTMLResponse(page("chat.html"))


@router.get("/v1/assistant", response_model=AssistantInfo, responses=ERRORS, tags=["chat"],
            dependencies=[Depends(require_client)])
async def assistant_info(assistant: Assistant, state: State) -> AssistantInfo:
    """What the chat page needs: the assistant's name, languages and the intents a user may pick."""
    definition = assistant.definition
    intent = state.served.slots[definition.intent_model].current
    return AssistantInfo(name=definition.name, languages=definition.languages, intents=intent.labels,
                         intent_model=intent.ref, sentiment_model=state.served.slots[definition.sentiment_model]
                         .current.ref)


@router.post("/v1/chat", response_model=ChatResponse, responses=ERRORS, tags=["chat"],
             dependencies=[Depends(require_client)])
async def chat(body: ChatRequest, assistant: Assistant, state: State) -> ChatResponse:
    """One turn: intent (with out-of-scope detection), sentiment, FAQ search, reply, escalation.

    The intent and sentiment models and the FAQ embedding run through the server's batchers, so chat turns
    share forward passes with each other and with /v1/predict; every turn is stored with its session.
    """
    check_text_length(body.message, state.config.serve.max_text_chars, "message")
    definition = assistant.definition
    text = clean_text(body.message)
    loop = asyncio.get_running_loop()
    (intent, intent_logits), (sentiment, sentiment_logits), vectors, recent = await asyncio.gather(
        classify(state.served.slots[definition.intent_model], [text]),
        classify(state.served.slots[definition.sentiment_model], [text]),
        loop.run_in_executor(state.served.inference, assistant.embedder.encode, [text]),
        run_in_threadpool(state.conversations.recent, body.session_id, definition.history_turns))
    outcome = await run_in_threadpool(
        assistant.decide, text, intent, intent_logits[0], sentiment, sentiment_logits[0], vectors[0],
        [t.sentiment for t in recent], [(t.message, t.reply) for t in recent])
    now = datetime.now(timezone.utc)
    intent_record = logged(intent, body.message, softmax(intent_logits[0]), "chat", now)
    sentiment_record = logged(sentiment, body.message, softmax(sentiment_logits[0]), "chat", now)
    state.prediction_log.record([intent_record, sentiment_record])
    best = outcome.faq[0].entry.question if outcome.answered_from_faq else None
    turn = await run_in_threadpool(state.conversations.add, ChatTurn(
        session_id=body.session_id, assistant=definition.name, message=body.message, reply=outcome.reply,
        lang=outcome.lang, intent=outcome.intent, predicted_intent=outcome.predicted_intent,
        confidence=outcome.confidence, sentiment=outcome.sentiment, escalate=outcome.escalate, reason=outcome.reason,
        faq_question=best, intent_model=intent.ref, intent_prediction_id=intent_record.id,
        sentiment_prediction_id=sentiment_record.id))
    state.metrics.chat_turns.labels(str(outcome.escalate).lower()).inc()
    return ChatResponse(
        turn_id=turn.id, session_id=body.session_id, reply=outcome.reply, lang=outcome.lang, intent=outcome.intent,
        predicted_intent=outcome.predicted_intent, confidence=outcome.confidence, sentiment=outcome.sentiment,
        escalate=outcome.escalate, reason=outcome.reason, answered_from_faq=outcome.answered_from_faq,
        sources=[FaqSource(question=h.entry.question, answer=h.entry.answer, similarity=h.similarity, score=h.score)
                 for h in outcome.faq],
        model=intent.ref)
