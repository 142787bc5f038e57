"""The HTTP server: `create_app(settings)` loads what the routes need into one state object and builds the
FastAPI app; the routes live in `serve/routes/`, one module per resource."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.routing import BaseRoute, Match
from starlette.types import Scope
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from tuneloop import __version__
from tuneloop.assistant.definition import load_definition
from tuneloop.assistant.runtime import AssistantRuntime
from tuneloop.assistant.service import ChatService
from tuneloop.assistant.store import ConversationStore
from tuneloop.assistant.turn import TurnOutcome
from tuneloop.config import ServerSettings
from tuneloop.data.clean import clean_text
from tuneloop.errors import Conflict, NotFound, TooManyRequests, TuneloopError, Unavailable, first_line
from tuneloop.feedback.log import PredictionLog
from tuneloop.feedback.monitor import latest_reports
from tuneloop.feedback.retention import purge
from tuneloop.models.predictor import Predictor
from tuneloop.privacy.mask import masked_for_keeping, masker
from tuneloop.registry import Home, Registry
from tuneloop.serve.deps import ServerState
from tuneloop.serve.jobs import JobRunner
from tuneloop.serve.metrics import RequestMetrics, ServerMetrics
from tuneloop.serve.openapi import serve_live_document
from tuneloop.serve.routes import admin, chat, feedback, models, ops, pages, predict
from tuneloop.serve.security import (
    BodySizeLimit,
    KeyRing,
    SecurityHeaders,
    allowed_hosts,
    refuse_open_exposure,
)
from tuneloop.serve.slots import ServedModels
from tuneloop.serve.throttle import Throttle

log = logging.getLogger(__name__)

# What each kind of error means over HTTP; any other TuneloopError is a request the server cannot act on.
STATUS_OF = {NotFound: 404, Conflict: 409, TooManyRequests: 429, Unavailable: 503}


def _field(location: tuple[int | str, ...]) -> str:
    parts = [str(p) for p in location if p != "body"]
    return ".".join(parts) or "body"


def _install_error_handlers(app: FastAPI, routes: list[BaseRoute]) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # The inputs are not echoed back: they may be long, or private.
        errors = [{"field": _field(e["loc"]), "message": e["msg"]} for e in exc.errors()]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return JSONResponse({"detail": detail, "errors": errors}, status_code=422)

    @app.exception_handler(TuneloopError)
    async def refused(_: Request, exc: TuneloopError) -> JSONResponse:
        status = next((code for kind, code in STATUS_OF.items() if isinstance(exc, kind)), 422)
        retry_after = exc.retry_after if isinstance(exc, TooManyRequests) else 1
        headers = {"Retry-After": str(retry_after)} if status in (429, 503) else None
        return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request.scope, routes, headers.get("Allow", "")))
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers or None)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal server error; the server log has the details"}, status_code=500)


def allowed_methods(scope: Scope, routes: list[BaseRoute], named: str) -> list[str]:
    """Every method a route answers at this path, with those Starlette `named`: its 405 names only the methods of
    the first route whose path matches, and a path such as /v1/admin/jobs has one route for GET, one for POST."""
    methods = {method.strip() for method in named.split(",") if method.strip()}
    for route in routes:
        if route.matches(scope)[0] != Match.NONE:  # PARTIAL: the path matches, the method does not
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def _job_settings(config: ServerSettings) -> dict[str, list[str]]:
    """Overrides that point each kind of job subprocess at this server's registry, and gate jobs at its gate
    rules (retraining takes its recipe from the production version)."""
    # The database URL (it may hold a password) goes through the environment, not the command line.
    registry = [f"registry.home={config.registry.home.resolve()}"]
    return {
        "retrain": registry,
        "gate": registry + [f"gate.{key}={value}" for key, value in config.gate.model_dump().items()],
    }


def keep_out_of_collections() -> None:
    """Move every object alive now out of the garbage collector's reach (gc.freeze). What a server loads (models,
    tokenizers, libraries: about 640,000 objects with the demo's assistant) made each full collection take 0.4 to
    0.5 s with the interpreter lock held, every few seconds under load: the slowest /readyz answers of a burst
    (bench/burst.py). A version swapped out is still freed: loaded models hold no reference cycles, so reference
    counting frees them, frozen or not."""
    gc.collect()  # garbage of the loading is collected once, not frozen with the rest
    gc.freeze()


def _build_state(config: ServerSettings) -> ServerState:
    settings = config.serve
    registry = Registry(config.registry)
    metrics = ServerMetrics()
    runtime = AssistantRuntime(load_definition(settings.assistant), registry) if settings.assistant else None

    def swapped(loaded: Predictor) -> None:
        metrics.served_version.labels(loaded.name).set(loaded.registered_version)
        metrics.swaps.labels(loaded.name).inc()
        keep_out_of_collections()  # the new version's objects, as at start

    def prepare(loaded: Predictor) -> None:
        # A new intent version gets its own scope threshold before it answers a single chat turn.
        if runtime is not None and loaded.name == runtime.definition.intent_model:
            runtime.calibrate(loaded)

    required = (runtime.definition.intent_model, runtime.definition.sentiment_model) if runtime else ()
    served = ServedModels(
        registry, settings, on_batch=metrics.observe_batch, on_swap=swapped, prepare=prepare, required=required
    )
    served.load()
    metrics.watch_drift(lambda: latest_reports(registry.home, list(served.slots)))
    mask = masker(config.privacy)
    prediction_log = PredictionLog(
        config.registry.resolved_database_url(),
        config.registry.home,
        flush_ms=settings.log_flush_ms,
        max_backlog=settings.log_max_backlog,
        on_dropped=metrics.log_dropped.inc,
        mask=mask,
    )
    conversations = chat = None
    if runtime is not None:
        # Chat turns are kept as the prediction log keeps texts: masked so that no later cleaning reveals anything.
        keeping = partial(masked_for_keeping, mask=mask, clean=clean_text) if mask is not None else None
        conversations = ConversationStore(prediction_log.engine, keeping, prediction_log.secret)

        def counted(outcome: TurnOutcome) -> None:
            metrics.chat_turns.labels(str(outcome.escalate).lower()).inc()

        chat = ChatService(
            runtime,
            served.run,
            lambda texts: served.on_inference_thread(runtime.embedder.encode, texts),
            conversations,
            prediction_log,
            on_turn=counted,
            max_streams=settings.max_streams,
        )
    jobs = JobRunner(
        Home(config.registry.home).jobs,
        _job_settings(config),
        {"TUNELOOP_DATABASE_URL": config.registry.resolved_database_url()},
    )
    return ServerState(
        config=config,
        registry=registry,
        served=served,
        prediction_log=prediction_log,
        metrics=metrics,
        keys=KeyRing(config),
        throttle=Throttle(config.serve),
        jobs=jobs,
        chat=chat,
        conversations=conversations,
    )


async def _purge_daily(config: ServerSettings) -> None:
    """privacy.retention_days applied at start and then once a day (every replica does it; purging twice removes
    nothing more)."""
    while True:
        try:
            erased = await run_in_threadpool(purge, config.registry, config.privacy)
            if erased.removed:
                log.info("privacy: purged %d rows older than %d days", erased.removed, config.privacy.retention_days)
        except Exception as exc:  # the database may be away for a while; the next day tries again
            log.warning("privacy: the daily purge failed (%s)", first_line(exc))
        await asyncio.sleep(24 * 3600)


def create_app(config: ServerSettings) -> FastAPI:
    """Load the served models and the assistant (errors surface here, before any port is opened)."""
    refuse_open_exposure(config, KeyRing(config))
    state = _build_state(config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Rows an earlier run could not write (its database was away at shutdown) go in before new ones.
        await run_in_threadpool(state.prediction_log.import_rescued)
        # Trust is what these keys say, for feedback already stored too: a key no longer trusted stops teaching.
        await run_in_threadpool(state.prediction_log.record_trusted_senders, state.keys.trusted_senders)
        state.prediction_log.start()
        await state.served.start()
        for name, slot in state.served.slots.items():
            state.metrics.served_version.labels(name).set(slot.current.registered_version)
        keep_out_of_collections()
        purging = asyncio.create_task(_purge_daily(config)) if config.privacy.retention_days is not None else None
        try:
            yield
        finally:
            if purging is not None:
                purging.cancel()
            state.jobs.stop_all()
            await state.served.stop()  # finishes queued requests first
            if state.chat is not None:
                state.chat.runtime.generator.close()  # the local model's worker process stops with the server
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
    app.add_middleware(BodySizeLimit, max_bytes=config.serve.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=state.metrics)
    app.add_middleware(SecurityHeaders)
    # Outermost: a request naming a host this server is not (a DNS-rebinding page in a user's browser) is
    # refused before anything else sees it.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(config.serve))
    if config.serve.trusted_proxies:
        # The client's address and scheme from the proxies named, and from nobody else.
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=config.serve.trusted_proxies)
    routers = [module.router for module in (predict, feedback, models, chat, admin, ops, pages)]
    _install_error_handlers(app, [route for router in routers for route in router.routes])
    for router in routers:
        app.include_router(router)
    app.mount("/assets", StaticFiles(directory=str(pages.SERVER_WEB)), name="assets")
    app.mount("/assistant-assets", StaticFiles(directory=str(pages.ASSISTANT_WEB)), name="assistant-assets")
    serve_live_document(app, routers, state)
    return app
