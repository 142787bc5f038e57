"""The assistant over HTTP: what it can do, and one chat turn per request (whole, or streamed)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from tuneloop.assistant.service import StoredTurn
from tuneloop.assistant.turn import TurnOutcome
from tuneloop.serve.deps import Chat, State
from tuneloop.serve.schemas import ERRORS, AssistantInfo, ChatRequest, ChatResponse, FaqSource
from tuneloop.serve.security import Caller, check_text_length, require_client

router = APIRouter(tags=["chat"])


@router.get("/v1/assistant", response_model=AssistantInfo, responses=ERRORS, dependencies=[Depends(require_client)])
async def assistant_info(chat: Chat, state: State) -> AssistantInfo:
    """What the chat page needs: the assistant's name, languages and the intents a user may pick."""
    definition = chat.runtime.definition
    intent = state.served.slot(definition.intent_model).current
    sentiment = (
        f"{definition.intent_model}:{definition.sentiment_task}@{intent.version}"
        if chat.runtime.multitask
        else state.served.slot(definition.sentiment_model).current.ref
    )
    return AssistantInfo(
        name=definition.name,
        languages=definition.languages,
        intents=[label for label in intent.labels if label != definition.scope.label],
        out_of_scope_label=definition.scope.label,
        intent_model=intent.ref,
        sentiment_model=sentiment,
    )


def chat_response(session_id: str, stored: StoredTurn) -> ChatResponse:
    outcome, turn = stored.outcome, stored.turn
    return ChatResponse(
        turn_id=turn.id,
        session_id=session_id,
        reply=outcome.reply,
        lang=outcome.lang,
        intent=outcome.intent,
        predicted_intent=outcome.predicted_intent,
        confidence=outcome.confidence,
        sentiment=outcome.sentiment,
        escalate=outcome.escalate,
        reason=outcome.reason,
        answered_from_faq=turn.faq_question is not None,
        faq_question=turn.faq_question,
        sources=[
            FaqSource(question=h.entry.question, answer=h.entry.answer, similarity=h.similarity, score=h.score)
            for h in outcome.faq
        ],
        model=turn.intent_model,
    )


def event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


@router.post(
    "/v1/chat",
    response_model=ChatResponse,
    responses={
        **ERRORS,
        200: {
            "content": {"text/event-stream": {}},
            "description": "With stream=true: Server-Sent Events — "
            "`turn` (what was understood), `token` pieces of the reply, then `done` with the whole answer "
            "and its turn_id.",
        },
    },
)
async def chat_turn(
    body: ChatRequest,
    chat: Chat,
    state: State,
    caller: Annotated[Caller, Depends(require_client)],
    stream: Annotated[bool, Query(description="Stream the reply as Server-Sent Events.")] = False,
) -> ChatResponse | StreamingResponse:
    """One turn: intent (with out-of-scope detection), sentiment, FAQ search, reply, escalation.

    The intent and sentiment models run through the server's batchers, so chat turns share forward passes
    with each other and with /v1/predict. Every turn is stored with its session (a streamed one once its
    reply is complete, or the client has gone). A session is issued by the server on a first message and
    continues only for the key that opened it (404 for any other).
    """
    check_text_length(body.message, state.config.serve.max_text_chars, "message")
    session_id = await chat.session_for(body.session_id, caller.sender)
    if not stream:
        return chat_response(session_id, await chat.reply(session_id, body.message, caller.sender, caller.requester))

    turn = await chat.stream(session_id, body.message, caller.sender, caller.requester)

    async def events() -> AsyncIterator[str]:
        async for item in turn:
            if isinstance(item, TurnOutcome):
                yield event(
                    "turn",
                    {
                        "intent": item.intent,
                        "predicted_intent": item.predicted_intent,
                        "confidence": item.confidence,
                        "sentiment": item.sentiment,
                        "escalate": item.escalate,
                        "reason": item.reason,
                        "lang": item.lang,
                    },
                )
            elif isinstance(item, str):
                yield event("token", {"text": item})
            else:
                yield event("done", chat_response(session_id, item).model_dump(mode="json"))

    # The background task runs after the response even when the client left before its first byte.
    return StreamingResponse(events(), media_type="text/event-stream", background=BackgroundTask(turn.end))
