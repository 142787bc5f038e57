"""Probes and metrics for whoever runs the server."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from tuneloop.serve.deps import State

router = APIRouter(tags=["ops"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: State) -> JSONResponse:
    """Every served model is loaded and its batcher is running; `unavailable` says which is not, and why."""
    served = state.served
    body = {
        "ready": served.ready,
        "models": {n: s.current.version for n, s in served.slots.items()},
        "unavailable": served.unavailable,
    }
    return JSONResponse(body, status_code=200 if served.ready else 503)


@router.get("/metrics")
async def prometheus_metrics(state: State) -> Response:
    """Prometheus text format."""
    state.metrics.log_backlog.set(state.prediction_log.backlog)
    return Response(state.metrics.render(), media_type=state.metrics.content_type)
