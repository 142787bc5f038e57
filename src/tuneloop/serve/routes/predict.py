"""Classify texts, take feedback on the answers, list and promote models."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Response
from fastapi.concurrency import run_in_threadpool

from tuneloop.data.clean import clean_text
from tuneloop.errors import TuneloopError
from tuneloop.feedback.log import LoggedPrediction, new_prediction_id
from tuneloop.models.classifier import softmax
from tuneloop.serve.batching import BatcherStopped
from tuneloop.serve.deps import State
from tuneloop.serve.models import LoadedModel, ModelSlot
from tuneloop.serve.schemas import (
    ERRORS,
    FeedbackRequest,
    FeedbackResponse,
    LabelScore,
    ModelInfo,
    ModelsResponse,
    PredictRequest,
    PredictResponse,
    PromoteRequest,
    PromoteResponse,
    TextPrediction,
)
from tuneloop.serve.security import require_admin, require_client

log = logging.getLogger(__name__)
router = APIRouter()


def check_text_length(text: str, limit: int, field: str) -> None:
    if len(text) > limit:
        raise HTTPException(422, f"{field} has {len(text)} characters; at most {limit} (serve.max_text_chars)")


async def classify(slot: ModelSlot, texts: list[str]) -> tuple[LoadedModel, np.ndarray]:
    """Logits from the slot's batcher; a server on its way down answers 503."""
    try:
        return await slot.batcher.submit([clean_text(t) for t in texts])
    except BatcherStopped:
        raise HTTPException(503, "the server is shutting down; retry on another instance") from None


def logged(live: LoadedModel, text: str, probs: np.ndarray, source: str, when: datetime) -> LoggedPrediction:
    label = live.labels[int(probs.argmax())]
    return LoggedPrediction(
        id=new_prediction_id(),
        created_at=when,
        model_name=live.name,
        model_version=live.version,
        text=text,
        label=label,
        source=source,
        scores={name: round(float(p), 5) for name, p in zip(live.labels, probs, strict=True)},
    )


@router.post(
    "/v1/predict",
    response_model=PredictResponse,
    responses=ERRORS,
    tags=["predict"],
    dependencies=[Depends(require_client)],
)
async def predict(body: PredictRequest, state: State) -> PredictResponse:
    """Classify texts with a model's production version; every prediction gets an id for feedback."""
    settings = state.config.serve
    if len(body.texts) > settings.max_texts:
        raise HTTPException(
            413,
            f"{len(body.texts)} texts in one request; at most {settings.max_texts}: split them over several requests",
        )
    for index, text in enumerate(body.texts):
        check_text_length(text, settings.max_text_chars, f"texts.{index}")
    try:
        slot = state.served.slot(body.model)
    except KeyError:
        raise HTTPException(
            404, f"model '{body.model}' is not served here; served: {', '.join(state.served.slots)}"
        ) from None
    except TuneloopError as exc:
        raise HTTPException(422, str(exc)) from None
    live, rows = await classify(slot, body.texts)
    probs = softmax(live.own_logits(rows))
    k = min(body.top_k or settings.top_k, len(live.labels))
    now = datetime.now(UTC)
    records = [logged(live, text, row, "api", now) for text, row in zip(body.texts, probs, strict=True)]
    predictions = []
    for record, row in zip(records, probs, strict=True):
        top = [LabelScore(label=live.labels[i], score=float(row[i])) for i in np.argsort(-row)[:k]]
        predictions.append(
            TextPrediction(
                prediction_id=record.id,
                label=top[0].label,
                score=top[0].score,
                top_k=top,
                model=live.name,
                version=live.version,
            )
        )
    state.prediction_log.record(records)
    state.metrics.predictions.labels(live.name).inc(len(predictions))
    return PredictResponse(model=live.name, version=live.version, predictions=predictions)


@router.post(
    "/v1/feedback",
    response_model=FeedbackResponse,
    status_code=201,
    responses=ERRORS,
    tags=["feedback"],
    dependencies=[Depends(require_client)],
)
async def feedback(body: FeedbackRequest, state: State) -> FeedbackResponse:
    """Correct a prediction's (or a chat turn's intent) label and/or rate it; stored before the answer."""
    prediction_id, rating = body.prediction_id, body.rating
    if body.turn_id is not None:
        turn = await run_in_threadpool(state.conversations.get, body.turn_id) if state.conversations else None
        if turn is None:
            raise HTTPException(404, f"no chat turn with id '{body.turn_id}' (ids come from /v1/chat)")
        await run_in_threadpool(state.conversations.rate, turn.id, body.rating, body.comment)
        prediction_id = turn.intent_prediction_id
        if turn.intent is None:
            # Thumbs on an out-of-scope turn judge the hand-over, not the intent the model guessed: a thumbs-up
            # there must never become a "confirmed" training label for that guess.
            rating = None
            if body.corrected_label is None:
                state.metrics.feedback.labels("rating").inc()
                return FeedbackResponse(feedback_id=None, prediction_id=prediction_id, turn_id=turn.id)
    record = await run_in_threadpool(state.prediction_log.get, prediction_id)
    if record is None:
        raise HTTPException(404, f"no prediction with id '{prediction_id}' (ids come from /v1/predict)")
    if body.corrected_label is not None:
        allowed = await run_in_threadpool(state.labels_of, record.model_name, record.model_version)
        slot = state.served.slots.get(record.model_name)
        allowed = allowed | set(slot.current.labels if slot else ())
        if body.corrected_label not in allowed:
            raise HTTPException(
                422,
                f"corrected_label '{body.corrected_label}' is not a label of "
                f"{record.model_name}; labels: {', '.join(sorted(allowed))}",
            )
    row = await run_in_threadpool(
        state.prediction_log.add_feedback, prediction_id, body.corrected_label, rating, body.comment
    )
    kind = "correction" if body.corrected_label else ("rating" if body.rating is not None else "comment")
    state.metrics.feedback.labels(kind).inc()
    return FeedbackResponse(feedback_id=row.id, prediction_id=row.prediction_id, turn_id=body.turn_id)


@router.get(
    "/v1/models",
    response_model=ModelsResponse,
    responses=ERRORS,
    tags=["models"],
    dependencies=[Depends(require_client)],
)
async def models(state: State) -> ModelsResponse:
    """The served models: the version answering now and the one being loaded, if any."""
    infos = []
    for name, slot in state.served.slots.items():
        # Read again: a rollback or an archive elsewhere changes the stage of the version being served.
        record = await run_in_threadpool(state.registry.get, slot.current.ref)
        infos.append(
            ModelInfo(
                name=name,
                version=record.version,
                stage=record.stage,
                base_model=record.base_model,
                labels=slot.current.labels,
                metrics=record.metrics,
                created_at=record.created_at,
                parent=record.parent,
                loading_version=slot.loading,
            )
        )
    return ModelsResponse(models=infos)


def _log_failed_promotion(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("promotion over HTTP failed; nothing changed: %s", task.exception())


@router.post(
    "/v1/models/{name}/promote",
    response_model=PromoteResponse,
    responses=ERRORS,
    tags=["models"],
    dependencies=[Depends(require_admin)],
)
async def promote(name: str, body: PromoteRequest, response: Response, state: State) -> PromoteResponse:
    """Make a version production. A served model's new version is loaded first, beside the live one, and
    only then promoted and switched to; requests in flight finish on the old one. With `wait` the answer
    comes after the switch (200), otherwise at once (202)."""
    reason = "promoted over HTTP"
    try:
        target = await run_in_threadpool(state.registry.get, f"{name}@{body.version}")
    except TuneloopError as exc:
        raise HTTPException(404, str(exc)) from None
    slot = state.served.slots.get(name)
    if slot is None:
        record = await run_in_threadpool(state.registry.promote, target.ref, reason)
        return PromoteResponse(name=name, version=record.version, stage=record.stage, serving_version=None)
    task = asyncio.create_task(state.served.promote(name, body.version, reason))
    task.add_done_callback(_log_failed_promotion)
    if not body.wait:
        response.status_code = 202
        return PromoteResponse(
            name=name, version=target.version, stage=target.stage, serving_version=slot.current.version
        )
    try:
        record = await asyncio.shield(task)  # a client that hangs up does not cancel the promotion
    except Exception as exc:
        raise HTTPException(500, f"{target.ref} could not be loaded, so it was not promoted: {exc}") from None
    return PromoteResponse(name=name, version=record.version, stage=record.stage, serving_version=slot.current.version)
