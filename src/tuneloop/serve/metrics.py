"""Prometheus metrics of one server: requests and latency per route, batch sizes, the live versions."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """A private collector registry per app, so several apps (tests, benchmarks) never collide."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tuneloop_http_requests_total",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tuneloop_http_request_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "tuneloop_batch_size", "Texts per forward pass", ["model"], buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.batch_seconds = Histogram(
            "tuneloop_batch_seconds",
            "Time of one batched forward pass",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.served_version = Gauge(
            "tuneloop_served_version", "Version number answering for each model", ["model"], registry=self.registry
        )
        self.swaps = Counter(
            "tuneloop_model_swaps_total", "Hot swaps to a new production version", ["model"], registry=self.registry
        )
        self.predictions = Counter("tuneloop_predictions_total", "Texts classified", ["model"], registry=self.registry)
        self.feedback = Counter(
            "tuneloop_feedback_total", "Feedback received, by kind", ["kind"], registry=self.registry
        )
        self.chat_turns = Counter(
            "tuneloop_chat_turns_total",
            "Assistant turns, by whether they escalated",
            ["escalated"],
            registry=self.registry,
        )
        self.log_backlog = Gauge(
            "tuneloop_prediction_log_backlog", "Predictions waiting to be written", registry=self.registry
        )
        self.log_dropped = Counter(
            "tuneloop_prediction_log_dropped",
            "Predictions dropped because neither the database nor a rescue file could take them",
            registry=self.registry,
        )

    def observe_batch(self, model: str, size: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(size)
        self.batch_seconds.labels(model).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """ASGI middleware counting and timing requests by route template (never by raw path)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def send_and_remember(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_remember)
        finally:
            route = scope.get("route")
            # Unmatched paths share one label so a scanner cannot blow up the series count.
            name = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(name, scope["method"], str(status[0])).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - started)
