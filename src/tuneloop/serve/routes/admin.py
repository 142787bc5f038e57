"""The admin API: versions and their metrics, the feedback queue, retrain and gate jobs."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.concurrency import run_in_threadpool

from tuneloop.errors import TuneloopError
from tuneloop.serve.deps import State
from tuneloop.serve.schemas import ERRORS, JobRequest
from tuneloop.serve.security import require_admin

router = APIRouter()
admin_only = [Depends(require_admin)]


@router.get("/v1/admin/models", responses=ERRORS, tags=["admin"], dependencies=admin_only)
async def all_versions(state: State) -> dict:
    """Every registered version by model name, with stage and metrics, and which version this server runs."""
    versions = await run_in_threadpool(state.registry.list)
    names: dict[str, dict] = {}
    for v in versions:
        slot = state.served.slots.get(v.name)
        entry = names.setdefault(
            v.name, {"name": v.name, "serving": slot.current.version if slot else None, "versions": []}
        )
        entry["versions"].append(
            {
                "version": v.version,
                "stage": v.stage,
                "metrics": v.metrics,
                "parent": v.parent,
                "base_model": v.base_model,
                "created_at": v.created_at.isoformat(),
            }
        )
    return {"models": list(names.values())}


@router.get("/v1/admin/feedback", responses=ERRORS, tags=["admin"], dependencies=admin_only)
async def feedback_queue(state: State, limit: int = Query(50, ge=1, le=500)) -> dict:
    """The latest feedback, newest first, with the text and the answer it is about."""
    rows = await run_in_threadpool(state.prediction_log.recent_feedback, limit)
    return {
        "items": [
            {
                "feedback_id": f.id,
                "at": f.created_at.isoformat(),
                "model": f"{p.model_name}@{p.model_version}",
                "text": p.text,
                "predicted": p.label,
                "corrected_label": f.corrected_label,
                "rating": f.rating,
                "comment": f.comment,
                "source": p.source,
            }
            for f, p in rows
        ]
    }


@router.post("/v1/admin/jobs", status_code=202, responses=ERRORS, tags=["admin"], dependencies=admin_only)
async def start_job(body: JobRequest, state: State) -> dict:
    """Start `tuneloop retrain NAME` or `tuneloop gate NAME@VERSION` in the background (one at a time)."""
    try:
        job = await run_in_threadpool(state.jobs.start, body.kind, body.target)
    except TuneloopError as exc:
        raise HTTPException(409, str(exc)) from None
    return job.describe()


@router.get("/v1/admin/jobs", responses=ERRORS, tags=["admin"], dependencies=admin_only)
async def list_jobs(state: State) -> dict:
    return {
        "jobs": [
            job.describe(tail=0) for job in sorted(state.jobs.jobs.values(), key=lambda j: j.started_at, reverse=True)
        ]
    }


@router.get("/v1/admin/jobs/{job_id}", responses=ERRORS, tags=["admin"], dependencies=admin_only)
async def job_status(job_id: str, state: State) -> dict:
    job = state.jobs.jobs.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job '{job_id}'")
    return job.describe()
