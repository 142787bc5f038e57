"""Feedback on an answer: the right label, a rating, a comment."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool

from tuneloop.errors import NotFound, TuneloopError
from tuneloop.serve.deps import State
from tuneloop.serve.schemas import ERRORS, FeedbackRequest, FeedbackResponse
from tuneloop.serve.security import Caller, require_client

router = APIRouter(tags=["feedback"])


@router.post(
    "/v1/feedback",
    response_model=FeedbackResponse,
    status_code=201,
    responses=ERRORS,
)
async def feedback(
    body: FeedbackRequest, state: State, caller: Annotated[Caller, Depends(require_client)]
) -> FeedbackResponse:
    """Correct a prediction's (or a chat turn's intent) label and/or rate it; stored before the answer, with the
    sender's key id. Unless that key is trusted, it trains a model only once an admin approves it, and its sender
    is held to serve.feedback_rate_limit and serve.feedback_daily_quota (429 past them)."""
    await run_in_threadpool(state.throttle.count_feedback, caller, state.prediction_log)
    turn, conversations = None, state.conversations
    if body.turn_id is not None:
        turn = await run_in_threadpool(conversations.get, body.turn_id) if conversations else None
        # Another key's turn is "not found", as its session is: feedback would change what that user said.
        if turn is None or turn.sender != caller.sender:
            raise NotFound(f"no chat turn with id '{body.turn_id}' from this key (ids come from /v1/chat)")
        prediction_id = turn.intent_prediction_id
    else:
        prediction_id = body.prediction_id or ""  # the request's validator makes sure one of the two is given
    record = await run_in_threadpool(state.prediction_log.get, prediction_id)
    if record is None:
        raise NotFound(f"no prediction with id '{prediction_id}' (ids come from /v1/predict)")
    if body.corrected_label is not None:
        allowed = await run_in_threadpool(state.allowed_labels, record)
        if body.corrected_label not in allowed:
            raise TuneloopError(
                f"corrected_label '{body.corrected_label}' is not a label of {record.model_name}; "
                f"labels: {', '.join(sorted(allowed))}"
            )
    rating = body.rating
    if turn is not None and conversations is not None:  # written only once the whole request is known to be good
        await run_in_threadpool(conversations.rate, turn.id, body.rating, body.comment)
        if turn.intent is None:
            # Thumbs on an out-of-scope turn judge the hand-over, not the intent the model guessed: a thumbs-up
            # there must never become a "confirmed" training label for that guess.
            rating = None
            if body.corrected_label is None:
                state.metrics.feedback.labels("rating").inc()
                return FeedbackResponse(feedback_id=None, prediction_id=prediction_id, turn_id=turn.id)
    row = await run_in_threadpool(
        state.prediction_log.add_feedback,
        prediction_id,
        body.corrected_label,
        rating,
        body.comment,
        caller.sender,
        caller.trusted,
    )
    kind = "correction" if body.corrected_label else ("rating" if body.rating is not None else "comment")
    state.metrics.feedback.labels(kind).inc()
    return FeedbackResponse(feedback_id=row.id, prediction_id=row.prediction_id, turn_id=body.turn_id)
