"""Probes and metrics for whoever runs the server."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from tuneloop.serve.deps import State
from tuneloop.serve.schemas import ERRORS, ReadyResponse
from tuneloop.serve.security import require_metrics_access

router = APIRouter(tags=["ops"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "A served model is not loaded or not running."}},
)
async def readyz(state: State) -> JSONResponse:
    """Every served model is loaded and its batcher is running; `unavailable` says which is not, and why."""
    served = state.served
    body = ReadyResponse(
        ready=served.ready,
        models={n: s.current.version for n, s in served.slots.items()},
        unavailable=served.unavailable,
    )
    return JSONResponse(body.model_dump(), status_code=200 if served.ready else 503)


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **ERRORS},
    dependencies=[Depends(require_metrics_access)],
)
async def prometheus_metrics(state: State) -> Response:
    """Prometheus text format (with serve.metrics_need_key, for an admin key only)."""
    state.metrics.log_backlog.set(state.prediction_log.backlog)
    return Response(state.metrics.render(), media_type=state.metrics.content_type)
