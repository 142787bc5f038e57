"""Two `tuneloop serve` processes on one registry and log, under load: a promotion reaches both within their
poll interval (plus the new version's load), no request fails during the switch, prediction ids are unique
across replicas and every one is stored. On PostgreSQL (the set-up for several machines) and SQLite."""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import pytest
from live_server import ServerProcess, register_copy
from sqlalchemy import func, select

from tuneloop.db import open_database
from tuneloop.db.schema import PredictionRecord
from tuneloop.registry import Registry

pytestmark = pytest.mark.faults

POLL_SECONDS = 0.5


def load(url: str, answers: list[tuple[str, int, str | None]], stop: threading.Event) -> None:
    """Predict in a loop; (replica, status, version or None) per answer, and a dropped connection as status 0."""
    with httpx.Client(base_url=url, timeout=30) as http:
        while not stop.is_set():
            try:
                response = http.post("/v1/predict", json={"texts": ["refund money", "parcel late"]})
            except httpx.TransportError:
                answers.append((url, 0, None))
                continue
            body = response.json() if response.status_code == 200 else {}
            answers.append((url, response.status_code, body.get("version")))
            for prediction in body.get("predictions", []):
                answers.append((url, -1, prediction["prediction_id"]))  # -1: a prediction id, kept for the count


def test_a_promotion_reaches_every_replica_under_load_without_a_failed_request(served_on_each_database):
    config, home = served_on_each_database
    database_url = config.registry.resolved_database_url()
    overrides = [
        f"registry.home={home}",
        f"registry.database_url={database_url}",
        f"serve.reload_poll_seconds={POLL_SECONDS}",
        "serve.log_flush_ms=50",
    ]
    candidate = register_copy(config)
    answers: list[tuple[str, int, str | None]] = []
    stop = threading.Event()
    with ServerProcess(*overrides) as first, ServerProcess(*overrides) as second:
        clients = [threading.Thread(target=load, args=(replica.url, answers, stop)) for replica in (first, second) * 2]
        for client in clients:
            client.start()
        try:
            time.sleep(1.5)
            Registry(config.registry).promote(candidate.ref, replacing=1)
            promoted_at = time.monotonic()
            switched: dict[str, float] = {}
            while len(switched) < 2 and time.monotonic() - promoted_at < 60:
                for replica in (first, second):
                    if replica.url not in switched and httpx.get(replica.url + "/readyz").json()["models"] == {
                        "toy": 2
                    }:
                        switched[replica.url] = time.monotonic() - promoted_at
                time.sleep(0.05)
            time.sleep(1.0)  # load on the new version too
        finally:
            stop.set()
            for client in clients:
                client.join(timeout=60)
    assert len(switched) == 2, f"only {switched} switched to toy@2 within 60 s"
    # Polling, then loading the new version beside the live one: seconds on the tiny model, not minutes.
    assert max(switched.values()) < POLL_SECONDS + 10, switched

    statuses = Counter(status for _, status, _ in answers if status != -1)
    assert set(statuses) == {200}, statuses  # no failed request, no dropped connection, across the switch
    versions = {replica: {v for r, s, v in answers if r == replica and s == 200} for replica in (first.url, second.url)}
    assert versions == {first.url: {1, 2}, second.url: {1, 2}}, versions
    ids = [pid for _, status, pid in answers if status == -1]
    assert len(ids) == len(set(ids)) > 100  # unique across the two replicas
    with open_database(database_url).connect() as connection:
        stored = connection.scalar(
            select(func.count()).select_from(PredictionRecord).where(PredictionRecord.id.in_(ids))
        )
    assert stored == len(ids)  # both replicas stopped cleanly: every prediction reached the shared log
