"""The HTTP server: `create_app(config)` builds a FastAPI app whose routes only validate, call the core
and shape the answer."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timezone

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from tuneloop import __version__
from tuneloop.config import TuneloopConfig
from tuneloop.data.clean import clean_text
from tuneloop.errors import TuneloopError
from tuneloop.feedback.log import LoggedPrediction, PredictionLog, new_prediction_id
from tuneloop.models.classifier import META_FILE, MODEL_DIR, softmax
from tuneloop.registry.store import Registry
from tuneloop.serve.batching import BatcherStopped
from tuneloop.serve.metrics import RequestMetrics, ServerMetrics
from tuneloop.serve.models import LoadedModel, ServedModels
from tuneloop.serve.schemas import (
    ErrorResponse,
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
from tuneloop.serve.security import BodySizeLimit, KeyRing, require_admin, require_client

log = logging.getLogger(__name__)

ERRORS = {code: {"model": ErrorResponse} for code in (401, 403, 404, 413, 422)}


def _field(location: tuple) -> str:
    parts = [str(p) for p in location if p != "body"]
    return ".".join(parts) or "body"


def _log_failed_promotion(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("promotion over HTTP failed; nothing changed: %s", task.exception())


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


def create_app(config: TuneloopConfig) -> FastAPI:
    """Load the served models (errors surface here, before any port is opened) and build the app."""
    settings = config.serve
    registry = Registry(config.registry)
    metrics = ServerMetrics()
    keys = KeyRing(settings)

    def swapped(loaded: LoadedModel) -> None:
        metrics.served_version.labels(loaded.name).set(loaded.version)
        metrics.swaps.labels(loaded.name).inc()

    served = ServedModels(registry, settings, on_batch=metrics.observe_batch, on_swap=swapped)
    served.load()
    prediction_log = PredictionLog(config.registry.resolved_database_url(), config.registry.home,
                                   flush_ms=settings.log_flush_ms)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        prediction_log.start()
        await served.start()
        for name, slot in served.slots.items():
            metrics.served_version.labels(name).set(slot.current.version)
        try:
            yield
        finally:
            await served.stop()  # finishes queued requests first
            prediction_log.close()  # then every logged prediction reaches the database

    app = FastAPIOffline(
        title="tuneloop", version=__version__, lifespan=lifespan,
        description="Classify texts with the production version of your models, send feedback on the answers, "
                    "promote versions (admin). Authenticate with `Authorization: Bearer <key>` or `X-API-Key`.")
    app.state.served = served
    app.state.prediction_log = prediction_log
    app.state.metrics = metrics
    app.state.keys = keys
    _install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)

    client_only = [Depends(require_client)]
    admin_only = [Depends(require_admin)]

    @functools.lru_cache(maxsize=256)
    def labels_of(name: str, version: int) -> frozenset[str]:
        record = registry.get(f"{name}@{version}")
        meta = json.loads((registry.artifacts(record) / MODEL_DIR / META_FILE).read_text())
        return frozenset(meta["labels"])

    @app.post("/v1/predict", response_model=PredictResponse, responses=ERRORS, tags=["predict"],
              dependencies=client_only)
    async def predict(body: PredictRequest) -> PredictResponse:
        """Classify texts with a model's production version; every prediction gets an id for feedback."""
        if len(body.texts) > settings.max_texts:
            raise HTTPException(413, f"{len(body.texts)} texts in one request; at most {settings.max_texts}: "
                                     f"split them over several requests")
        for index, text in enumerate(body.texts):
            if len(text) > settings.max_text_chars:
                raise HTTPException(422, f"texts.{index} has {len(text)} characters; at most "
                                         f"{settings.max_text_chars} (serve.max_text_chars)")
        try:
            slot = served.slot(body.model)
        except KeyError:
            raise HTTPException(404, f"model '{body.model}' is not served here; served: "
                                     f"{', '.join(served.slots)}") from None
        except TuneloopError as exc:
            raise HTTPException(422, str(exc)) from None
        try:
            live, logits = await slot.batcher.submit([clean_text(t) for t in body.texts])
        except BatcherStopped:
            raise HTTPException(503, "the server is shutting down; retry on another instance") from None
        probs = softmax(logits)
        k = min(body.top_k or settings.top_k, len(live.labels))
        now = datetime.now(timezone.utc)
        predictions, logged = [], []
        for text, row in zip(body.texts, probs):
            ranked = np.argsort(-row)[:k]
            prediction_id = new_prediction_id()
            top = [LabelScore(label=live.labels[i], score=float(row[i])) for i in ranked]
            predictions.append(TextPrediction(prediction_id=prediction_id, label=top[0].label, score=top[0].score,
                                              top_k=top, model=live.name, version=live.version))
            logged.append(LoggedPrediction(
                id=prediction_id, created_at=now, model_name=live.name, model_version=live.version, text=text,
                label=top[0].label, scores={label: round(float(p), 5) for label, p in zip(live.labels, row)}))
        prediction_log.record(logged)
        metrics.predictions.labels(live.name).inc(len(predictions))
        return PredictResponse(model=live.name, version=live.version, predictions=predictions)

    @app.post("/v1/feedback", response_model=FeedbackResponse, status_code=201, responses=ERRORS, tags=["feedback"],
              dependencies=client_only)
    async def feedback(body: FeedbackRequest) -> FeedbackResponse:
        """Correct a prediction's label and/or rate it; stored before the response is sent."""
        record = await run_in_threadpool(prediction_log.get, body.prediction_id)
        if record is None:
            raise HTTPException(404, f"no prediction with id '{body.prediction_id}' (ids come from /v1/predict)")
        if body.corrected_label is not None:
            allowed = await run_in_threadpool(labels_of, record.model_name, record.model_version)
            slot = served.slots.get(record.model_name)
            allowed = allowed | set(slot.current.labels if slot else ())
            if body.corrected_label not in allowed:
                raise HTTPException(422, f"corrected_label '{body.corrected_label}' is not a label of "
                                         f"{record.model_name}; labels: {', '.join(sorted(allowed))}")
        row = await run_in_threadpool(prediction_log.add_feedback, body.prediction_id, body.corrected_label,
                                      body.rating, body.comment)
        kind = "correction" if body.corrected_label else ("rating" if body.rating is not None else "comment")
        metrics.feedback.labels(kind).inc()
        return FeedbackResponse(feedback_id=row.id, prediction_id=row.prediction_id)

    @app.get("/v1/models", response_model=ModelsResponse, responses=ERRORS, tags=["models"], dependencies=client_only)
    async def models() -> ModelsResponse:
        """The served models: the version answering now and the one being loaded, if any."""
        infos = []
        for name, slot in served.slots.items():
            # Read again: a rollback or an archive elsewhere changes the stage of the version being served.
            record = await run_in_threadpool(registry.get, slot.current.ref)
            infos.append(ModelInfo(name=name, version=record.version, stage=record.stage, base_model=record.base_model,
                                   labels=slot.current.labels, metrics=record.metrics, created_at=record.created_at,
                                   parent=record.parent, loading_version=slot.loading))
        return ModelsResponse(models=infos)

    @app.post("/v1/models/{name}/promote", response_model=PromoteResponse, responses=ERRORS, tags=["models"],
              dependencies=admin_only)
    async def promote(name: str, body: PromoteRequest, response: Response) -> PromoteResponse:
        """Make a version production. A served model's new version is loaded first, beside the live one, and
        only then promoted and switched to; requests in flight finish on the old one. With `wait` the answer
        comes after the switch (200), otherwise at once (202)."""
        reason = "promoted over HTTP"
        try:
            target = await run_in_threadpool(registry.get, f"{name}@{body.version}")
        except TuneloopError as exc:
            raise HTTPException(404, str(exc)) from None
        slot = served.slots.get(name)
        if slot is None:
            record = await run_in_threadpool(registry.promote, target.ref, reason)
            return PromoteResponse(name=name, version=record.version, stage=record.stage, serving_version=None)
        task = asyncio.create_task(served.promote(name, body.version, reason))
        task.add_done_callback(_log_failed_promotion)
        if not body.wait:
            response.status_code = 202
            return PromoteResponse(name=name, version=target.version, stage=target.stage,
                                   serving_version=slot.current.version)
        try:
            record = await asyncio.shield(task)  # a client that hangs up does not cancel the promotion
        except Exception as exc:
            raise HTTPException(500, f"{target.ref} could not be loaded, so it was not promoted: {exc}") from None
        return PromoteResponse(name=name, version=record.version, stage=record.stage,
                               serving_version=slot.current.version)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> JSONResponse:
        """Every served model is loaded and its batcher is running."""
        body = {"ready": served.ready, "models": {n: s.current.version for n, s in served.slots.items()}}
        return JSONResponse(body, status_code=200 if served.ready else 503)

    @app.get("/metrics", tags=["ops"])
    async def prometheus_metrics() -> Response:
        """Prometheus text format."""
        metrics.log_backlog.set(prediction_log.backlog)
        return Response(metrics.render(), media_type=metrics.content_type)

    return app
