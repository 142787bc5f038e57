"""The served models, and promoting a version (which the server loads before it switches)."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool

from tuneloop.config import MODEL_NAME_PATTERN
from tuneloop.registry import ModelVersion
from tuneloop.serve.deps import State
from tuneloop.serve.schemas import ERRORS, ModelInfo, ModelsResponse, PromoteRequest, PromoteResponse
from tuneloop.serve.security import require_admin, require_client

log = logging.getLogger(__name__)
router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelsResponse, responses=ERRORS, dependencies=[Depends(require_client)])
async def models(state: State) -> ModelsResponse:
    """The served models: the version answering now and the one being loaded, if any."""
    infos = []
    for name, slot in list(state.served.slots.items()):  # a model may start being served meanwhile
        # Read again: a rollback or an archive elsewhere changes the stage of the version being served.
        record = await run_in_threadpool(state.registry.get, slot.current.ref)
        infos.append(
            ModelInfo(
                name=name,
                version=record.version,
                stage=record.stage,
                base_model=record.base_model,
                labels=slot.current.labels,
                runtime=slot.current.runtime,
                device=slot.current.device,
                metrics=record.metrics,
                created_at=record.created_at,
                parent=record.parent,
                loading_version=slot.loading,
            )
        )
    return ModelsResponse(models=infos)


def _log_failed_promotion(task: asyncio.Task[ModelVersion]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("promotion over HTTP failed; nothing changed: %s", task.exception())


@router.post(
    "/v1/models/{name}/promote",
    response_model=PromoteResponse,
    responses={
        **ERRORS,
        202: {"model": PromoteResponse, "description": "Without wait: the new version is loading; it answers soon."},
    },
    dependencies=[Depends(require_admin)],
)
async def promote(
    name: Annotated[str, PathParam(pattern=MODEL_NAME_PATTERN)], body: PromoteRequest, response: Response, state: State
) -> PromoteResponse:
    """Make a version production. A served model's new version is loaded first, beside the live one, and
    only then promoted and switched to; requests in flight finish on the old one. With `wait` the answer
    comes after the switch (200), otherwise at once (202)."""
    reason = "promoted over HTTP"
    target = await run_in_threadpool(state.registry.get, f"{name}@{body.version}")
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
    # A client that hangs up does not cancel the promotion. A version that does not load is a 422, production
    # changed meanwhile a 409 (nothing changed either way); anything else (the database away) a 500.
    record = await asyncio.shield(task)
    return PromoteResponse(name=name, version=record.version, stage=record.stage, serving_version=slot.current.version)
