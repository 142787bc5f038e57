"""What the prediction log promises, held to under a real crash: clients loop predict → feedback against
`tuneloop serve` in its own process, the server is killed with SIGKILL mid-run and started again, and then
every acknowledged feedback, and the prediction it is about, must be in the database. Predictions without
feedback may be lost, but only those answered within one flush window before the kill. On SQLite and
PostgreSQL."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest
from live_server import ServerProcess
from sqlalchemy import select

from tuneloop.db import open_database
from tuneloop.db.schema import FeedbackRecord, PredictionRecord

pytestmark = pytest.mark.faults

FLUSH_MS = 200


@dataclass
class Acknowledged:
    predictions: dict[str, float] = field(default_factory=dict)  # id → when its 200 arrived
    feedback: set[str] = field(default_factory=set)  # prediction ids whose feedback got 201
    failures: list[str] = field(default_factory=list)  # answers that were neither success nor a dropped connection
    lock: threading.Lock = field(default_factory=threading.Lock)


def client_loop(url: str, seen: Acknowledged, stop: threading.Event, with_feedback: bool = True) -> None:
    """predict → feedback in a loop; without feedback, predictions only (those rely on the background writer)."""
    with httpx.Client(base_url=url, timeout=10) as http:
        while not stop.is_set():
            try:
                answer = http.post("/v1/predict", json={"texts": ["my parcel is late"]})
                if answer.status_code != 200:
                    seen.failures.append(f"predict {answer.status_code}")
                    continue
                prediction_id = answer.json()["predictions"][0]["prediction_id"]
                with seen.lock:
                    seen.predictions[prediction_id] = time.monotonic()
                if not with_feedback:
                    continue
                answer = http.post("/v1/feedback", json={"prediction_id": prediction_id, "corrected_label": "delivery"})
                if answer.status_code == 201:
                    with seen.lock:
                        seen.feedback.add(prediction_id)
                else:
                    seen.failures.append(f"feedback {answer.status_code}")
            except httpx.TransportError:  # the server is down: what the kill does
                time.sleep(0.05)


def test_acknowledged_feedback_survives_sigkill_and_the_server_answers_again(served_on_each_database):
    config, home = served_on_each_database
    database_url = config.registry.resolved_database_url()
    overrides = [
        f"registry.home={home}",
        f"registry.database_url={database_url}",
        f"serve.log_flush_ms={FLUSH_MS}",
        "serve.feedback_rate_limit=null",  # the clients are one anonymous sender; this is about durability
    ]
    seen, stop = Acknowledged(), threading.Event()
    first = ServerProcess(*overrides).start()
    clients = [
        threading.Thread(target=client_loop, args=(first.url, seen, stop, with_feedback))
        for with_feedback in (True, True, True, False, False)
    ]
    for client in clients:
        client.start()
    try:
        time.sleep(3)
        first.kill()
        killed_at = time.monotonic()
        second = ServerProcess(*overrides, port=first.port).start()  # the clients find it on the same port
        before = len(seen.feedback)
        time.sleep(2)
        assert len(seen.feedback) > before, "the restarted server answered no feedback"
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=30)
        first.stop()
    second.stop()

    engine = open_database(database_url)
    with engine.connect() as connection:
        stored = set(connection.scalars(select(PredictionRecord.id).where(PredictionRecord.id.in_(seen.predictions))))
        with_feedback = set(connection.scalars(select(FeedbackRecord.prediction_id)))
    assert seen.failures == []
    assert len(seen.feedback) > 20
    assert seen.feedback <= with_feedback, "acknowledged feedback was lost"
    assert seen.feedback <= stored, "a prediction that has acknowledged feedback was lost"  # (and the foreign key)
    lost = {pid: killed_at - at for pid, at in seen.predictions.items() if pid not in stored}
    # Only predictions answered within one flush window (plus scheduling slack) before the kill may be lost;
    # none answered by the restarted server (a negative age), which was stopped cleanly.
    assert all(0 <= age < FLUSH_MS / 1000 + 1.0 for age in lost.values()), lost
    without_feedback = set(seen.predictions) - seen.feedback
    assert len(without_feedback & stored) > 20  # the background writer stored predictions nobody asked about
