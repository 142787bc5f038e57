"""The HTTP server: `create_app(config)` loads what the routes need into one state object and builds the
FastAPI app; the routes live in `serve/routes/`, one module per resource."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from tuneloop import __version__
from tuneloop.assistant.definition import load_definition
from tuneloop.assistant.runtime import AssistantRuntime
from tuneloop.assistant.store import ConversationStore
from tuneloop.config import TuneloopConfig
from tuneloop.feedback.log import PredictionLog
from tuneloop.registry.store import Registry
from tuneloop.serve.deps import ServerState
from tuneloop.serve.jobs import JobRunner
from tuneloop.serve.metrics import RequestMetrics, ServerMetrics
from tuneloop.serve.models import LoadedModel, ServedModels
from tuneloop.serve.routes import admin, chat, ops, pages, predict
from tuneloop.serve.security import BodySizeLimit, KeyRing

log = logging.getLogger(__name__)


def _field(location: tuple) -> str:
    parts = [str(p) for p in location if p != "body"]
    return ".".join(parts) or "body"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # The inputs are not echoed back: they may be long, or private.
        errors = [{"field": _field(e["loc"]), "message": e["msg"]} for e in exc.errors()]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return JSONResponse({"detail": detail, "errors": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal server error; the server log has the details"}, status_code=500)


def _job_settings(config: TuneloopConfig) -> list[str]:
    """Overrides that point a job subprocess at this server's registry and gate rules (and nothing else:
    retraining takes its recipe from the production version)."""
    # The database URL (it may hold a password) goes through the environment, not the command line.
    settings = [f"registry.home={config.registry.home.resolve()}"]
    return settings + [f"gate.{key}={value}" for key, value in config.gate.model_dump().items()]


def _build_state(config: TuneloopConfig) -> ServerState:
    settings = config.serve
    registry = Registry(config.registry)
    metrics = ServerMetrics()
    assistant = None
    if settings.assistant is not None:
        assistant = AssistantRuntime(load_definition(settings.assistant), registry)

    def swapped(loaded: LoadedModel) -> None:
        metrics.served_version.labels(loaded.name).set(loaded.version)
        metrics.swaps.labels(loaded.name).inc()

    def prepare(loaded: LoadedModel) -> None:
        # A new intent version gets its own scope threshold before it answers a single chat turn.
        if assistant is not None and loaded.name == assistant.definition.intent_model:
            assistant.calibrate(loaded)

    required = (assistant.definition.intent_model, assistant.definition.sentiment_model) if assistant else ()
    served = ServedModels(
        registry, settings, on_batch=metrics.observe_batch, on_swap=swapped, prepare=prepare, required=required
    )
    served.load()
    prediction_log = PredictionLog(
        config.registry.resolved_database_url(), config.registry.home, flush_ms=settings.log_flush_ms
    )
    conversations = ConversationStore(prediction_log.engine) if assistant is not None else None
    return ServerState(
        config=config,
        registry=registry,
        served=served,
        prediction_log=prediction_log,
        metrics=metrics,
        keys=KeyRing(settings),
        jobs=JobRunner(
            config.registry.home / "jobs",
            _job_settings(config),
            {"TUNELOOP_DATABASE_URL": config.registry.resolved_database_url()},
        ),
        assistant=assistant,
        conversations=conversations,
    )


def create_app(config: TuneloopConfig) -> FastAPI:
    """Load the served models and the assistant (errors surface here, before any port is opened)."""
    state = _build_state(config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.prediction_log.start()
        await state.served.start()
        for name, slot in state.served.slots.items():
            state.metrics.served_version.labels(name).set(slot.current.version)
        try:
            yield
        finally:
            state.jobs.stop_all()
            await state.served.stop()  # finishes queued requests first
            state.prediction_log.close()  # then every logged prediction reaches the database

    app = FastAPIOffline(
        title="tuneloop",
        version=__version__,
        lifespan=lifespan,
        description="Classify texts with the production version of your models, chat with the assistant, send "
        "feedback on the answers, promote versions (admin). Authenticate with `Authorization: Bearer "
        "<key>` or `X-API-Key`.",
    )
    app.state.tuneloop = state
    _install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=config.serve.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=state.metrics)
    for router in (predict.router, chat.router, admin.router, ops.router, pages.router):
        app.include_router(router)
    app.mount("/assets", StaticFiles(directory=str(pages.WEB)), name="assets")
    return app
