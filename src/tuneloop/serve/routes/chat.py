"""The assistant over HTTP: one chat turn per request."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import numpy as np
from fastapi import APIRouter, Depends, HTTPException
from fastapi.concurrency import run_in_threadpool

from tuneloop.assistant.runtime import AssistantRuntime
from tuneloop.assistant.store import ChatTurn
from tuneloop.data.clean import clean_text
from tuneloop.models.classifier import softmax
from tuneloop.serve.deps import Assistant, ServerState, State
from tuneloop.serve.routes.predict import check_text_length, classify, logged
from tuneloop.serve.schemas import ERRORS, AssistantInfo, ChatRequest, ChatResponse, FaqSource
from tuneloop.serve.security import require_client

router = APIRouter()


@router.get("/v1/assistant", response_model=AssistantInfo, responses=ERRORS, tags=["chat"],
            dependencies=[Depends(require_client)])
async def assistant_info(assistant: Assistant, state: State) -> AssistantInfo:
    """What the chat page needs: the assistant's name, languages and the intents a user may pick."""
    definition = assistant.definition
    intent = state.served.slots[definition.intent_model].current
    return AssistantInfo(name=definition.name, languages=definition.languages, intents=intent.labels,
                         intent_model=intent.ref, sentiment_model=state.served.slots[definition.sentiment_model]
                         .current.ref)


async def embed(state: ServerState, assistant: AssistantRuntime, text: str) -> np.ndarray:
    try:
        return await asyncio.get_running_loop().run_in_executor(state.served.inference, assistant.embedder.encode,
                                                                 [text])
    except RuntimeError:  # the inference thread is closed: the server is stopping
        raise HTTPException(503, "the server is shutting down; retry on another instance") from None


@router.post("/v1/chat", response_model=ChatResponse, responses=ERRORS, tags=["chat"],
             dependencies=[Depends(require_client)])
async def chat(body: ChatRequest, assistant: Assistant, state: State) -> ChatResponse:
    """One turn: intent (with out-of-scope detection), sentiment, FAQ search, reply, escalation.

    The intent and sentiment models run through the server's batchers, so chat turns share forward passes
    with each other and with /v1/predict; the FAQ embedding runs on the same inference thread. Every turn
    is stored with its session.
    """
    check_text_length(body.message, state.config.serve.max_text_chars, "message")
    definition = assistant.definition
    text = clean_text(body.message)
    (intent, intent_logits), (sentiment, sentiment_logits), vectors, recent = await asyncio.gather(
        classify(state.served.slots[definition.intent_model], [text]),
        classify(state.served.slots[definition.sentiment_model], [text]),
        embed(state, assistant, text),
        run_in_threadpool(state.conversations.recent, body.session_id, assistant.turns_to_recall))
    outcome = await run_in_threadpool(
        assistant.decide, text, intent, intent_logits[0], sentiment, sentiment_logits[0], vectors[0],
        [t.sentiment for t in recent], [(t.message, t.reply) for t in recent])
    now = datetime.now(timezone.utc)
    intent_record = logged(intent, body.message, softmax(intent_logits[0]), "chat", now)
    sentiment_record = logged(sentiment, body.message, softmax(sentiment_logits[0]), "chat", now)
    state.prediction_log.record([intent_record, sentiment_record])
    faq_question = outcome.faq_answer.entry.question if outcome.faq_answer else None
    turn = await run_in_threadpool(state.conversations.add, ChatTurn(
        session_id=body.session_id, assistant=definition.name, message=body.message, reply=outcome.reply,
        lang=outcome.lang, intent=outcome.intent, predicted_intent=outcome.predicted_intent,
        confidence=outcome.confidence, sentiment=outcome.sentiment, escalate=outcome.escalate, reason=outcome.reason,
        faq_question=faq_question, intent_model=intent.ref, intent_prediction_id=intent_record.id,
        sentiment_prediction_id=sentiment_record.id))
    state.metrics.chat_turns.labels(str(outcome.escalate).lower()).inc()
    return ChatResponse(
        turn_id=turn.id, session_id=body.session_id, reply=outcome.reply, lang=outcome.lang, intent=outcome.intent,
        predicted_intent=outcome.predicted_intent, confidence=outcome.confidence, sentiment=outcome.sentiment,
        escalate=outcome.escalate, reason=outcome.reason, answered_from_faq=faq_question is not None,
        faq_question=faq_question,
        sources=[FaqSource(question=h.entry.question, answer=h.entry.answer, similarity=h.similarity, score=h.score)
                 for h in outcome.faq],
        model=intent.ref)
