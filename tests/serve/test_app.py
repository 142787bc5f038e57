"""Every route and every error of the HTTP API, through FastAPI's TestClient on the tiny model."""

from __future__ import annotations

import gc
import json
import time
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient
from live_server import register_copy

from tuneloop.errors import TuneloopError, Unavailable
from tuneloop.feedback.log import PredictionLog
from tuneloop.registry import Registry, VersionFolder
from tuneloop.serve.app import create_app
from tuneloop.serve.security import hash_key

LABELS = {"refund", "delivery", "password"}


@pytest.fixture()
def client(served):
    config, _ = served
    with TestClient(create_app(config)) as test_client:
        yield test_client


def predict(client, *texts, headers=None, **extra):
    response = client.post("/v1/predict", json={"texts": list(texts), **extra}, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def stored(config):
    log = PredictionLog(config.registry.resolved_database_url(), config.registry.home)
    try:
        return log.count("toy"), log.feedback_for("toy")
    finally:
        log.close()


def test_predict_answers_per_text_with_ids_top_k_and_version(client):
    body = predict(client, "my parcel is late", "reset my password please", top_k=2)
    assert (body["model"], body["version"]) == ("toy", 1)
    predictions = body["predictions"]
    assert len(predictions) == 2 and len({p["prediction_id"] for p in predictions}) == 2
    for p in predictions:
        assert p["label"] in LABELS and (p["model"], p["version"]) == ("toy", 1)
        assert [k["label"] for k in p["top_k"]][0] == p["label"] and len(p["top_k"]) == 2
        assert p["top_k"][0]["score"] >= p["top_k"][1]["score"]
    assert len(predict(client, "refund")["predictions"][0]["top_k"]) == 3  # serve.top_k default


def test_predict_explains_each_texts_label_word_by_word_on_request(client):
    plain = predict(client, "please refund my money back")["predictions"][0]
    assert plain["explanation"] is None
    body = predict(client, "please refund my money back", "where is my parcel", explain=True)
    for prediction, text in zip(
        body["predictions"], ("please refund my money back", "where is my parcel"), strict=True
    ):
        explanation = prediction["explanation"]
        assert explanation["text"] == text and explanation["label"] == prediction["label"]
        assert [w["word"] for w in explanation["words"]] == text.split()
        assert [text[w["start"] : w["end"]] for w in explanation["words"]] == text.split()
        total = sum(w["score"] for w in explanation["words"])
        assert total == pytest.approx(explanation["probability"] - explanation["baseline_probability"], abs=0.05)
        assert explanation["probability"] == pytest.approx(prediction["score"], abs=1e-3)
    nothing = predict(client, " <b></b> ", explain=True)["predictions"][0]["explanation"]  # no words left
    assert nothing["words"] == [] and nothing["delta"] == pytest.approx(0.0, abs=1e-6)


def test_every_prediction_is_logged_by_shutdown(served):
    config, _ = served
    with TestClient(create_app(config)) as client:
        ids = [p["prediction_id"] for _ in range(5) for p in predict(client, "a", "refund money")["predictions"]]
    counts, _ = stored(config)
    assert counts == {"predictions": 10, "feedback": 0}
    log = PredictionLog(config.registry.resolved_database_url(), config.registry.home)
    row = log.get(ids[1])
    log.close()
    assert row.text == "refund money" and row.model_version == 1
    assert set(row.scores) == LABELS and abs(sum(row.scores.values()) - 1) < 1e-3


def test_feedback_correction_rating_and_comment_are_stored(client, served):
    config, _ = served
    first, second = predict(client, "parcel late", "password locked")["predictions"]
    # Straight after predict: the prediction may still be waiting in the log's buffer.
    response = client.post("/v1/feedback", json={"prediction_id": first["prediction_id"], "corrected_label": "refund"})
    assert response.status_code == 201, response.text
    assert response.json()["prediction_id"] == first["prediction_id"]
    assert client.post("/v1/feedback", json={"prediction_id": second["prediction_id"], "rating": 1}).status_code == 201
    assert (
        client.post("/v1/feedback", json={"prediction_id": second["prediction_id"], "comment": "good"}).status_code
        == 201
    )
    _, rows = stored(config)
    assert [(f.corrected_label, f.rating, f.comment) for f, _ in rows] == [
        ("refund", None, None),
        (None, 1, None),
        (None, None, "good"),
    ]


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"prediction_id": "nope", "rating": 1}, 404, "no prediction with id 'nope'"),
        ({"prediction_id": "ID"}, 422, "give at least one of corrected_label, rating or comment"),
        ({"prediction_id": "ID", "corrected_label": "weather"}, 422, "is not a label of toy"),
        ({"prediction_id": "ID", "rating": 5}, 422, "rating"),
        ({"prediction_id": "ID", "rating": 1, "extra": 1}, 422, "extra"),
        # The schema shows these as absent or set, never null: a null the server took for "absent" was a request
        # the document calls invalid and the server accepted (schemathesis' negative_data_rejection).
        (
            {"prediction_id": None, "turn_id": "nope", "rating": 1},
            422,
            "leave prediction_id out instead of sending null",
        ),
        ({"prediction_id": "nope", "corrected_label": None, "rating": 1}, 422, "leave corrected_label out"),
    ],
)
def test_feedback_errors(client, body, status, message):
    if body["prediction_id"] == "ID":
        body = {**body, "prediction_id": predict(client, "x")["predictions"][0]["prediction_id"]}
    response = client.post("/v1/feedback", json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"texts": []}, 422, "texts"),
        ({"texts": "just one string"}, 422, "texts"),
        ({"texts": ["a"] * 65}, 422, "at most 64"),
        ({"texts": ["a", "x" * 2001]}, 422, "texts.1 has 2001 characters"),
        ({"texts": ["a"], "model": "other"}, 404, "model 'other' is not served"),
        ({"texts": ["a"], "top_k": 0}, 422, "top_k"),
        ({"texts": ["a"], "unexpected": True}, 422, "unexpected"),
        ({"texts": ["a"] * 5, "explain": True}, 422, "at most 4 per request (serve.explain_max_texts)"),
        ({"texts": ["a"], "explain": 0}, 422, "explain: Input should be a valid boolean"),  # the schema's boolean
    ],
)
def test_predict_errors(client, body, status, message):
    response = client.post("/v1/predict", json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    assert "Traceback" not in response.text


def test_malformed_json_and_oversized_bodies(client):
    response = client.post("/v1/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and "JSON" in response.json()["detail"]
    big = json.dumps({"texts": ["a" * 1000] * 1100}).encode()
    assert client.post("/v1/predict", content=big, headers={"content-type": "application/json"}).status_code == 413

    def chunks():  # no content-length: the limit must be enforced while reading
        for _ in range(1100):
            yield b" " * 1000

    response = client.post("/v1/predict", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and "larger than" in response.json()["detail"]


def test_models_health_ready_and_metrics(client):
    models = client.get("/v1/models").json()["models"]
    assert [(m["name"], m["version"], m["stage"]) for m in models] == [("toy", 1, "production")]
    assert set(models[0]["labels"]) == LABELS and models[0]["loading_version"] is None
    assert models[0]["runtime"] == "torch"  # what its recipe's serving.runtime built it for
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"ready": True, "models": {"toy": 1}, "unavailable": {}}
    predict(client, "a", "b", "c")
    client.get("/nowhere/at/all")
    text = client.get("/metrics").text
    assert 'tuneloop_http_requests_total{method="POST",route="/v1/predict",status="200"} 1.0' in text
    assert 'tuneloop_http_requests_total{method="GET",route="unmatched",status="404"} 1.0' in text
    assert 'tuneloop_batch_size_sum{model="toy"} 3.0' in text
    assert 'tuneloop_served_version{model="toy"} 1.0' in text
    assert 'tuneloop_predictions_total{model="toy"} 3.0' in text
    assert "tuneloop_http_request_seconds_bucket" in text


def test_openapi_docs_work_offline(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "cdn." not in page.text
    script = page.text.split('src="')[1].split('"')[0]
    assert client.get(script).status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/predict", "/v1/feedback", "/v1/models", "/v1/models/{name}/promote"} <= set(paths)


def test_api_keys_scopes(served):
    config, _ = served
    config.serve.client_key_hashes = [hash_key("client-secret")]
    config.admin_keys = "admin-secret"
    with TestClient(create_app(config)) as client:
        body = {"texts": ["a"]}
        assert client.post("/v1/predict", json=body).status_code == 401
        assert client.post("/v1/predict", json=body, headers={"X-API-Key": "wrong"}).status_code == 401
        assert client.post("/v1/predict", json=body, headers={"X-API-Key": "client-secret"}).status_code == 200
        assert (
            client.post("/v1/predict", json=body, headers={"Authorization": "Bearer admin-secret"}).status_code == 200
        )
        promote = {"version": 1, "wait": True}
        response = client.post("/v1/models/toy/promote", json=promote, headers={"X-API-Key": "client-secret"})
        assert response.status_code == 403 and "needs an admin key" in response.json()["detail"]
        response = client.post("/v1/models/toy/promote", json=promote)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert (
            client.post("/v1/models/toy/promote", json=promote, headers={"X-API-Key": "admin-secret"}).status_code
            == 200
        )
        assert client.get("/healthz").status_code == 200  # probes need no key


def test_admin_keys_alone_leave_predict_and_feedback_open(served):
    config, _ = served
    config.admin_keys = "root"
    with TestClient(create_app(config)) as client:
        assert client.post("/v1/predict", json={"texts": ["a"]}).status_code == 200
        assert client.post("/v1/models/toy/promote", json={"version": 1}).status_code == 401


def test_promotion_over_http_is_off_without_an_admin_key(client):
    response = client.post("/v1/models/toy/promote", json={"version": 1})
    assert response.status_code == 403 and "admin key" in response.json()["detail"]


def test_promote_swaps_the_served_version(served):
    config, _ = served
    config.admin_keys = "root"
    second = register_copy(config)
    with TestClient(create_app(config)) as client:
        admin = {"X-API-Key": "root"}
        missing = client.post("/v1/models/toy/promote", json={"version": 9}, headers=admin)
        assert missing.status_code == 404 and "no version 9" in missing.json()["detail"]
        response = client.post("/v1/models/toy/promote", json={"version": second.version, "wait": True}, headers=admin)
        assert response.status_code == 200, response.text
        assert response.json() == {"name": "toy", "version": 2, "stage": "production", "serving_version": 2}
        assert predict(client, "refund", headers=admin)["version"] == 2
        assert client.get("/v1/models", headers=admin).json()["models"][0]["version"] == 2
        assert 'tuneloop_model_swaps_total{model="toy"} 1.0' in client.get("/metrics").text
        # Without wait: 202 at once, the switch follows in the background.
        response = client.post("/v1/models/toy/promote", json={"version": 1}, headers=admin)
        assert response.status_code == 202 and response.json()["version"] == 1
        deadline = time.monotonic() + 30
        while predict(client, "refund", headers=admin)["version"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        models = client.get("/v1/models", headers=admin).json()["models"]
        assert (models[0]["version"], models[0]["stage"]) == (1, "production")


def test_what_the_server_loaded_at_start_and_at_a_swap_is_kept_out_of_full_collections(served):
    """A full collection walked every object the server had loaded, 0.4 to 0.5 s with the interpreter lock held,
    the slowest /readyz answers of a burst (bench/burst.py); the loaded objects are frozen (gc.freeze)."""
    config, _ = served
    config.admin_keys = "root"
    second = register_copy(config)
    with TestClient(create_app(config)) as client:
        assert gc.get_freeze_count() > 0
        first = client.app.state.tuneloop.served.slots["toy"].current
        assert not any(tracked is first.model for tracked in gc.get_objects())
        response = client.post(
            "/v1/models/toy/promote", json={"version": second.version, "wait": True}, headers={"X-API-Key": "root"}
        )
        assert response.status_code == 200, response.text
        swapped_in = client.app.state.tuneloop.served.slots["toy"].current
        assert swapped_in.version == 2 and not any(tracked is swapped_in.model for tracked in gc.get_objects())


def raise_runtime_error(texts):
    raise RuntimeError("torch: out of memory")  # what a failing forward pass raises


@pytest.mark.parametrize("failure", [lambda texts: 1 / 0, raise_runtime_error])
def test_internal_errors_are_a_plain_500(served, monkeypatch, failure):
    config, _ = served
    app = create_app(config)
    slot = app.state.tuneloop.served.slots["toy"]
    monkeypatch.setattr(slot, "infer", failure)
    with TestClient(app, raise_server_exceptions=False) as client:
        slot.batcher.run_batch = slot.infer
        response = client.post("/v1/predict", json={"texts": ["a"]})
        assert response.status_code == 500
        assert response.json() == {"detail": "internal server error; the server log has the details"}
        assert "ZeroDivision" not in response.text and "torch" not in response.text
        slot.batcher.run_batch = type(slot).infer.__get__(slot)
        assert client.post("/v1/predict", json={"texts": ["a"]}).status_code == 200  # the batcher survived


def test_a_version_that_fails_to_load_is_not_promoted_and_the_old_one_keeps_serving(served, tmp_path):
    config, _ = served
    config.admin_keys = "root"
    (tmp_path / "broken" / "model").mkdir(parents=True)
    Registry(config.registry).register(
        "toy", VersionFolder(tmp_path / "broken"), base_model="tiny", data_fingerprint="x", config={}, metrics={}
    )
    with TestClient(create_app(config)) as client:
        admin = {"X-API-Key": "root"}
        response = client.post("/v1/models/toy/promote", json={"version": 2, "wait": True}, headers=admin)
        assert response.status_code == 422 and "could not be loaded, so it was not promoted" in response.text
        assert predict(client, "refund", headers=admin)["version"] == 1
        assert client.get("/readyz").status_code == 200
    assert Registry(config.registry).get("toy@production").version == 1


def test_a_server_on_its_way_down_answers_503_with_retry_after(client):
    client.app.state.tuneloop.served.slots["toy"].batcher._stopping = True  # what stop() sets first
    response = client.post("/v1/predict", json={"texts": ["refund"]})
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert "shutting down" in response.json()["detail"]


def test_work_on_the_inference_thread_reports_a_shutdown_as_such_and_its_own_errors_as_themselves(client):
    """Regression: any RuntimeError of the work itself (a torch error in an explanation, say) was reported as
    the server shutting down."""
    served = client.app.state.tuneloop.served
    run = client.portal.call  # the app's event loop

    def fails(texts):
        raise RuntimeError("a shape mismatch")

    with pytest.raises(RuntimeError, match="a shape mismatch"):
        run(served.on_inference_thread, fails, ["x"])
    served.inference.shutdown()
    with pytest.raises(Unavailable, match="shutting down"):
        run(served.on_inference_thread, len, ["x"])
    live = served.slots["toy"].current.record
    with pytest.raises(Unavailable, match="shutting down"):
        run(served.explain, live, ["refund"], [None], 4)


def test_openapi_declares_how_to_send_a_key(client):
    schemes = client.get("/openapi.json").json()["components"]["securitySchemes"]
    assert schemes["APIKeyHeader"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert schemes["HTTPBearer"]["scheme"] == "bearer"


def test_the_openapi_document_says_what_this_server_requires(served, tmp_path):
    """Keys only where the server asks for them, `model` required once several are served, the limits."""
    config, _ = served
    config.admin_keys = "root"
    config.serve.max_texts = 7
    with TestClient(create_app(config)) as client:
        document = client.get("/openapi.json").json()
        for open_route in ("/v1/predict", "/v1/feedback"):  # no client keys: they are open
            assert "security" not in document["paths"][open_route]["post"], open_route
        assert "security" not in document["paths"]["/metrics"]["get"]
        assert "security" in document["paths"]["/v1/models/{name}/promote"]["post"]
        request = document["components"]["schemas"]["PredictRequest"]
        assert request["required"] == ["texts"] and request["properties"]["texts"]["maxItems"] == 7
        assert request["if"]["properties"]["explain"] == {"const": True}
        assert request["then"]["properties"]["texts"]["maxItems"] == 4  # serve.explain_max_texts
    register_copy(config)  # a second name beside toy
    registry = Registry(config.registry)
    second = registry.register(
        "other", registry.folder(registry.get("toy@1")), base_model="tiny", data_fingerprint="x", config={}, metrics={}
    )
    registry.promote(second.ref)
    config.client_keys = "client"
    with TestClient(create_app(config)) as client:
        document = client.get("/openapi.json").json()
        assert "security" in document["paths"]["/v1/predict"]["post"]
        assert "security" in document["paths"]["/v1/feedback"]["post"]
        request = document["components"]["schemas"]["PredictRequest"]
        assert "model" in request["required"] and request["properties"]["model"]["enum"] == ["other", "toy"]
        response = client.post("/v1/predict", json={"texts": ["a"]}, headers={"X-API-Key": "client"})
        assert response.status_code == 422 and "name one in 'model'" in response.text


def test_times_carry_their_time_zone(client):
    created = client.get("/v1/models").json()["models"][0]["created_at"]
    assert datetime.fromisoformat(created).utcoffset() is not None, created


def test_predictions_rescued_by_an_earlier_run_are_imported_when_the_server_starts(served):
    from tuneloop.feedback.log import LoggedPrediction

    config, home = served
    log = PredictionLog(config.registry.resolved_database_url(), home)
    rescued = LoggedPrediction(
        id="r" * 32,
        created_at=datetime.now(UTC),
        model_name="toy",
        model_version=1,
        text="from a rescue file",
        label="refund",
        scores={"refund": 1.0},
    )
    log._rescue([rescued], "the database was unavailable at shutdown")
    log.close()
    assert list(home.glob("unsaved-predictions-*.jsonl"))
    with TestClient(create_app(config)) as client:
        sent = client.post("/v1/feedback", json={"prediction_id": rescued.id, "corrected_label": "delivery"})
        assert sent.status_code == 201, sent.text
    assert not list(home.glob("unsaved-predictions-*.jsonl"))


def test_overload_is_answered_at_once_with_503_and_retry_after(served, monkeypatch):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    config, _ = served
    config.serve.max_queue = 1
    app = create_app(config)
    slot = app.state.tuneloop.served.slots["toy"]
    release, started = threading.Event(), threading.Event()
    real_infer = slot.infer

    def blocked_infer(texts):
        started.set()
        release.wait(timeout=30)
        return real_infer(texts)

    monkeypatch.setattr(slot, "infer", blocked_infer)
    with TestClient(app) as client, ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.post, "/v1/predict", json={"texts": ["refund"]})
        assert started.wait(30)
        queued = pool.submit(client.post, "/v1/predict", json={"texts": ["parcel"]})
        while slot.batcher._queued_texts < 1:
            time.sleep(0.005)
        refused = client.post("/v1/predict", json={"texts": ["password"]})  # while the model is still busy
        assert not first.done()
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "overloaded" in refused.json()["detail"] and "serve.max_queue=1" in refused.json()["detail"]
        release.set()
        assert first.result().status_code == 200 and queued.result().status_code == 200


def test_a_production_version_that_does_not_load_leaves_the_others_served(served, tmp_path):
    """Regression: one broken production version stopped the whole server from starting."""
    config, home = served
    registry = Registry(config.registry)
    toy = registry.get("toy@1")
    copy = registry.register(
        "other", registry.folder(toy), base_model=toy.base_model, data_fingerprint="f", config={}, metrics={}
    )
    registry.promote(copy.ref)
    (tmp_path / "broken" / "model").mkdir(parents=True)
    broken = registry.register(
        "broken", VersionFolder(tmp_path / "broken"), base_model="tiny", data_fingerprint="x", config={}, metrics={}
    )
    registry.promote(broken.ref)  # straight in the registry, as a version promoted before the check existed
    with TestClient(create_app(config)) as client:
        assert predict(client, "refund", model="toy")["version"] == 1
        assert predict(client, "refund", model="other")["model"] == "other"
        refused = client.post("/v1/predict", json={"texts": ["a"], "model": "broken"})
        assert refused.status_code == 503 and "broken@1 could not be loaded" in refused.json()["detail"]
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "broken" in ready.json()["unavailable"]
        assert str(tmp_path) not in refused.text + ready.text  # why is in the server log, not in public answers
        fixed = registry.register(
            "broken", registry.folder(toy), base_model=toy.base_model, data_fingerprint="f", config={}, metrics={}
        )
        registry.promote(fixed.ref)  # the watcher notices and serves it
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the fixed version was never served"
            time.sleep(0.05)
        assert predict(client, "refund", model="broken")["version"] == 2


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "shop.internal"])
def test_an_open_server_on_a_reachable_address_refuses_to_start_unless_allowed(served, host):
    """Regression: with no client keys the server served anyone who could reach it, on any address."""
    config, _ = served
    config.serve.host = host
    with pytest.raises(TuneloopError, match=f"serve.host={host} can be reached from other machines"):
        create_app(config)
    config.client_keys = "client-secret"
    create_app(config)  # keys configured: fine
    config.client_keys = None
    config.serve.allow_open = True
    create_app(config)  # said so: fine


def test_loopback_addresses_need_no_keys(served):
    config, _ = served
    for host in ("127.0.0.1", "::1", "localhost"):
        config.serve.host = host
        create_app(config)


def test_a_405_names_every_method_of_its_path_and_a_202_is_documented(client):
    """/v1/admin/jobs has a GET route and a POST route: Starlette's 405 named only the first one's method."""
    refused = client.request("DELETE", "/v1/admin/jobs")
    assert refused.status_code == 405 and refused.headers["allow"] == "GET, POST"
    promote = client.get("/openapi.json").json()["paths"]["/v1/models/{name}/promote"]["post"]
    assert "202" in promote["responses"]
