"""Prometheus metrics of one server: requests and latency per route, batch sizes, the live versions."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Methods counted by name; any other (a client may send any token as its method) is counted as "other", so a
# scanner cannot add a series, and its memory, per request.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})
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

    def watch_drift(self, reports: Callable[[], Mapping[str, Mapping[str, Any]]]) -> None:
        """Export the drift gauges from these reports (model name → the latest report's figures)."""
        self.registry.register(DriftCollector(reports))

    def observe_batch(self, model: str, size: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(size)
        self.batch_seconds.labels(model).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


# The drift figures exported from the latest `tuneloop monitor` report of each served model: name, help, key.
DRIFT_GAUGES = (
    ("tuneloop_drift_label_psi", "Population stability index of the predicted labels against training", "label_psi"),
    ("tuneloop_drift_confidence_psi", "Population stability index of the confidences", "confidence_psi"),
    ("tuneloop_drift_window_confidence", "Mean confidence over the monitored window", "window_confidence"),
    (
        "tuneloop_drift_unfamiliar_share",
        "Share of the window below the reference's 5th percentile of confidence",
        "unfamiliar_share",
    ),
    (
        "tuneloop_drift_domain_auc",
        "AUC of a classifier telling the window's texts from training's (0.5: alike)",
        "domain_auc",
    ),
)


class DriftCollector(Collector):
    """Gauges read, at each scrape, from the latest monitoring report of every served model (`tuneloop monitor`
    writes them; a cron job keeps them fresh), so every replica exports the same figures."""

    def __init__(self, reports: Callable[[], Mapping[str, Mapping[str, Any]]]) -> None:
        self.reports = reports

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            reports = self.reports()
        except Exception:  # a scrape must never fail because a report file is being replaced or is unreadable
            logging.getLogger(__name__).exception("could not read the monitoring reports")
            reports = {}
        for metric, documentation, key in DRIFT_GAUGES:
            family = GaugeMetricFamily(metric, documentation, labels=["model"])
            for model, report in reports.items():
                if isinstance(report.get(key), int | float):
                    family.add_metric([model], float(report[key]))
            yield family
        flagged = GaugeMetricFamily("tuneloop_drift_flags", "Drift flags raised by the latest report", labels=["model"])
        advice = GaugeMetricFamily(
            "tuneloop_drift_recommendation", "1 for the latest report's recommendation", labels=["model", "action"]
        )
        checked = GaugeMetricFamily(
            "tuneloop_drift_window_end_seconds", "When the latest monitored window ended", labels=["model"]
        )
        for model, report in reports.items():
            flagged.add_metric([model], float(len(report.get("flags", []))))
            advice.add_metric([model, str(report.get("recommendation", ""))], 1.0)
            if isinstance(report.get("window_end_seconds"), int | float):
                checked.add_metric([model], float(report["window_end_seconds"]))
        yield from (flagged, advice, checked)


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
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
            self.metrics.requests.labels(name, method, str(status[0])).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - started)
