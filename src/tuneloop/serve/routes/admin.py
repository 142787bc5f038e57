"""The admin API: versions and their metrics, the feedback and its review queue, retrain and gate jobs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.concurrency import run_in_threadpool

from tuneloop.assistant.service import ChatService
from tuneloop.config import MODEL_NAME_PATTERN
from tuneloop.data.clean import clean_text
from tuneloop.db.lease import model_job_running
from tuneloop.errors import Conflict, NotFound, TuneloopError
from tuneloop.feedback import review, suggest
from tuneloop.models.predictor import Predictor
from tuneloop.serve.deps import Chat, State
from tuneloop.serve.jobs import Job
from tuneloop.serve.schemas import (
    ERRORS,
    AdminModel,
    AdminModelsResponse,
    AdminVersion,
    ExplainRequest,
    FeedbackItem,
    FeedbackQueue,
    JobInfo,
    JobRequest,
    JobsResponse,
    LabelsRequest,
    LabelsResponse,
    ReviewDecisionRequest,
    ReviewDecisionResponse,
    ReviewGroupInfo,
    ReviewQueueResponse,
    ScopeInfo,
    ScopeMoveRequest,
    SuggestionInfo,
    SuggestionsResponse,
    TextExplanation,
)
from tuneloop.serve.security import Caller, check_text_length, require_admin

router = APIRouter(tags=["admin"], dependencies=[Depends(require_admin)])


def job_info(job: Job, tail: int = 4000) -> JobInfo:
    return JobInfo(
        id=job.id,
        kind=job.kind,
        target=job.target,
        status=job.status,
        exit_code=job.exit_code,
        started_at=job.started_at,
        finished_at=job.finished_at,
        log=job.log_tail(tail),
    )


@router.get("/v1/admin/models", response_model=AdminModelsResponse, responses=ERRORS)
async def all_versions(state: State) -> AdminModelsResponse:
    """Every registered version by model name, with stage and metrics, and which version this server runs."""
    names: dict[str, AdminModel] = {}
    for v in await run_in_threadpool(state.registry.versions):
        slot = state.served.slots.get(v.name)
        entry = names.setdefault(
            v.name, AdminModel(name=v.name, serving=slot.current.version if slot else None, versions=[])
        )
        entry.versions.append(
            AdminVersion(
                version=v.version,
                stage=v.stage,
                metrics=v.metrics,
                parent=v.parent,
                base_model=v.base_model,
                created_at=v.created_at,
            )
        )
    return AdminModelsResponse(models=list(names.values()))


@router.get("/v1/admin/feedback", response_model=FeedbackQueue, responses=ERRORS)
async def feedback_queue(state: State, limit: int = Query(50, ge=1, le=500)) -> FeedbackQueue:
    """The latest feedback, newest first, with the text and the answer it is about."""
    rows = await run_in_threadpool(state.prediction_log.recent_feedback, limit)
    return FeedbackQueue(
        items=[
            FeedbackItem(
                feedback_id=f.id,
                at=f.created_at,
                model=f"{p.model_name}@{p.model_version}",
                text=p.text,
                predicted=p.label,
                corrected_label=f.corrected_label,
                rating=f.rating,
                comment=f.comment,
                source=p.source,
                sender=f.sender,
                trusted=f.trusted,
                review=f.review,
            )
            for f, p in rows
        ]
    )


@router.get("/v1/admin/review", response_model=ReviewQueueResponse, responses=ERRORS)
async def review_queue(
    state: State,
    model: str = Query(pattern=MODEL_NAME_PATTERN, description="Model name."),
    limit: int = Query(100, ge=1, le=1000),
) -> ReviewQueueResponse:
    """Feedback that waits for a decision before it may train, grouped by text and proposed label, most first,
    with who sent it and flags where it looks like poisoning."""
    rows = await run_in_threadpool(state.prediction_log.feedback_for, model)
    groups = review.review_queue(model, rows)[:limit]
    return ReviewQueueResponse(model=model, groups=[ReviewGroupInfo(**vars(group)) for group in groups])


@router.post("/v1/admin/review", response_model=ReviewDecisionResponse, responses=ERRORS)
async def decide_on_feedback(
    body: ReviewDecisionRequest, state: State, caller: Annotated[Caller, Depends(require_admin)]
) -> ReviewDecisionResponse:
    """Approve or reject feedback by group, id or sender, all or nothing (an unknown one is a 404, nothing
    changed). Rejected feedback never trains, whoever sent it."""
    decided = await run_in_threadpool(
        review.decide,
        state.prediction_log,
        body.model,
        body.decision,
        caller.sender,
        body.groups,
        body.feedback_ids,
        body.sender,
    )
    return ReviewDecisionResponse(decided=decided)


@router.get("/v1/admin/suggestions", response_model=SuggestionsResponse, responses=ERRORS)
async def suggestions(
    state: State,
    model: str = Query(pattern=MODEL_NAME_PATTERN, description="Model name."),
    budget: int = Query(20, ge=1, le=1000, description="How many predictions to suggest."),
    window: int = Query(suggest.DEFAULT_WINDOW, ge=1, le=100_000, description="Latest predictions looked at."),
) -> SuggestionsResponse:
    """Production predictions worth a label, most useful first: unsure, not near-copies of each other, from
    classes with little training data. Labels given for them (POST /v1/admin/labels) are trusted feedback."""
    chosen = await run_in_threadpool(
        suggest.suggestions_for, model, state.registry, state.prediction_log, budget, window
    )
    production = await run_in_threadpool(state.registry.get, f"{model}@production")
    labels = await run_in_threadpool(state.labels_of, model, production.version)
    out_of_scope = state.out_of_scope_label(model)
    return SuggestionsResponse(
        model=model,
        labels=sorted(labels - {out_of_scope}),
        out_of_scope_label=out_of_scope,
        suggestions=[SuggestionInfo(**s.to_dict()) for s in chosen],
    )


@router.post("/v1/admin/labels", response_model=LabelsResponse, responses=ERRORS)
async def give_labels(
    body: LabelsRequest, state: State, caller: Annotated[Caller, Depends(require_admin)]
) -> LabelsResponse:
    """Labels for suggested predictions, recorded as trusted feedback from this admin: all or none (an unknown
    prediction is a 404, a label the model does not have a 422)."""
    recorded = await run_in_threadpool(
        suggest.record_labels, state.prediction_log, body.model, body.labels, caller.sender, state.allowed_labels
    )
    return LabelsResponse(recorded=recorded)


@router.post("/v1/admin/jobs", response_model=JobInfo, status_code=202, responses=ERRORS)
async def start_job(body: JobRequest, state: State) -> JobInfo:
    """Start `tuneloop retrain NAME` or `tuneloop gate NAME@VERSION` in the background (one at a time)."""
    target = await run_in_threadpool(state.registry.get, body.target)  # unknown: a 404 now, not a failed job
    # The job takes the model's lease itself; a job elsewhere (another replica, cron) is a 409 here at once.
    running = await run_in_threadpool(model_job_running, state.registry.engine, target.name)
    if running:
        raise Conflict(f"{running} is working on {target.name}; start this once it has finished")
    return job_info(await run_in_threadpool(state.jobs.start, body.kind, body.target))


@router.get("/v1/admin/jobs", response_model=JobsResponse, responses=ERRORS)
async def list_jobs(state: State) -> JobsResponse:
    """Every job this server started, newest first (without their output)."""
    jobs = sorted(state.jobs.jobs.values(), key=lambda j: j.started_at, reverse=True)
    return JobsResponse(jobs=[job_info(job, tail=0) for job in jobs])


@router.get("/v1/admin/jobs/{job_id}", response_model=JobInfo, responses=ERRORS)
async def job_status(job_id: str, state: State) -> JobInfo:
    """One job: its state and the end of its output."""
    job = state.jobs.jobs.get(job_id)
    if job is None:
        raise NotFound(f"no job '{job_id}'")
    return job_info(job)


def scope_info(chat: ChatService, intent: Predictor) -> ScopeInfo:
    threshold, scope = chat.runtime.calibrate(intent), chat.runtime.definition.scope
    return ScopeInfo.model_validate(
        {
            **threshold.to_dict(),
            "intent_model": intent.ref,
            "max_in_scope_rejected": scope.max_in_scope_rejected,
            "min_out_of_scope_caught": scope.min_out_of_scope_caught,
            "moves": chat.runtime.moves(intent.ref),
        }
    )


@router.get("/v1/admin/scope", response_model=ScopeInfo, responses=ERRORS)
async def assistant_scope(chat: Chat, state: State) -> ScopeInfo:
    """The assistant's out-of-scope operating point for the intent version it serves: what it is expected to
    turn away and catch (with intervals), the whole curve, and where admins moved it."""
    intent = state.served.slot(chat.runtime.definition.intent_model).current
    return await run_in_threadpool(scope_info, chat, intent)


@router.post("/v1/admin/scope", response_model=ScopeInfo, responses=ERRORS)
async def move_scope(
    body: ScopeMoveRequest, chat: Chat, state: State, caller: Annotated[Caller, Depends(require_admin)]
) -> ScopeInfo:
    """Move the served intent version's operating point to a point of its curve (null: back to the policy's),
    recorded with who and when; the next chat turn answers with it."""
    intent = state.served.slot(chat.runtime.definition.intent_model).current
    await run_in_threadpool(chat.runtime.move, intent, body.threshold, caller.sender)
    return await run_in_threadpool(scope_info, chat, intent)


@router.post("/v1/admin/explain", response_model=TextExplanation, responses=ERRORS)
async def explain_text(body: ExplainRequest, state: State) -> TextExplanation:
    """Word attributions (Integrated Gradients) of a label for a text: why a version answered what it did,
    for a prediction or chat turn on the admin page. Nothing is logged."""
    settings = state.config.serve
    if not settings.explain_max_texts:
        raise TuneloopError("explanations are turned off on this server (serve.explain_max_texts=0)")
    check_text_length(body.text, settings.max_text_chars, "text")
    text = clean_text(body.text)
    version = await run_in_threadpool(
        state.registry.get, body.model if "@" in body.model else f"{body.model}@production"
    )
    (explained,) = await state.served.explain(version, [text], [body.label], settings.explain_steps)
    return TextExplanation.model_validate(explained.as_dict())
