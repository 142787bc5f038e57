"""Classify texts with a model's production version."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends

from tuneloop.data.clean import clean_text
from tuneloop.errors import TuneloopError
from tuneloop.feedback.log import LoggedPrediction
from tuneloop.models.classifier import softmax
from tuneloop.serve.deps import State
from tuneloop.serve.schemas import (
    ERRORS,
    LabelScore,
    PredictRequest,
    PredictResponse,
    TextExplanation,
    TextPrediction,
)
from tuneloop.serve.security import Caller, check_text_length, require_client

router = APIRouter(tags=["predict"])


@router.post("/v1/predict", response_model=PredictResponse, responses=ERRORS)
async def predict(
    body: PredictRequest, state: State, caller: Annotated[Caller, Depends(require_client)]
) -> PredictResponse:
    """Classify texts with a model's production version; every prediction gets an id for feedback."""
    settings = state.config.serve
    if len(body.texts) > settings.max_texts:  # the document's maxItems: a validation error like any other
        raise TuneloopError(
            f"{len(body.texts)} texts in one request; at most {settings.max_texts} (serve.max_texts): "
            "split them over several requests"
        )
    if body.explain and len(body.texts) > settings.explain_max_texts:
        raise TuneloopError(
            f"{len(body.texts)} texts with explain: true; at most {settings.explain_max_texts} per request "
            "(serve.explain_max_texts): explain a few texts at a time"
            if settings.explain_max_texts
            else "explanations are turned off on this server (serve.explain_max_texts=0)"
        )
    for index, text in enumerate(body.texts):
        check_text_length(text, settings.max_text_chars, f"texts.{index}")
    cleaned = [clean_text(t) for t in body.texts]
    live, rows = await state.served.run(body.model, cleaned)
    probs = softmax(live.own_logits(rows))
    k = min(body.top_k or settings.top_k, len(live.labels))
    now = datetime.now(UTC)
    records = [
        LoggedPrediction.of(live.name, live.registered_version, live.labels, text, row, "api", now, caller.requester)
        for text, row in zip(body.texts, probs, strict=True)
    ]
    explanations: list[TextExplanation | None] = [None] * len(cleaned)
    if body.explain:
        answered: list[str | None] = [live.labels[i] for i in probs.argmax(1)]
        version = live.record or state.registry.get(live.ref)
        explained = await state.served.explain(version, cleaned, answered, settings.explain_steps)
        explanations = [TextExplanation.model_validate(e.as_dict()) for e in explained]
    predictions = []
    for record, row, explanation in zip(records, probs, explanations, strict=True):
        top = [LabelScore(label=live.labels[i], score=float(row[i])) for i in np.argsort(-row)[:k]]
        predictions.append(
            TextPrediction(
                prediction_id=record.id,
                label=top[0].label,
                score=top[0].score,
                top_k=top,
                model=live.name,
                version=live.registered_version,
                explanation=explanation,
            )
        )
    state.prediction_log.record(records)
    state.metrics.predictions.labels(live.name).inc(len(predictions))
    return PredictResponse(model=live.name, version=live.registered_version, predictions=predictions)
