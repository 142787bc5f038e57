"""The assistant over HTTP on tiny models: /v1/chat, feedback on turns, the pages, the admin API."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from helpers import copy_rows, server_settings
from tuneloop.assistant.scope import ScopeThreshold, Share
from tuneloop.db.lease import model_job_lease
from tuneloop.feedback.export import feedback_examples
from tuneloop.feedback.log import PredictionLog
from tuneloop.models.reply_worker import GENERATION_NICE
from tuneloop.serve.app import create_app
from tuneloop.serve.security import hash_key, key_id

ADMIN = {"X-API-Key": "root"}


@pytest.fixture()
def chat_app(assistant_setup):
    config, definition = assistant_setup
    config.serve.assistant = definition
    config.admin_keys = "root"
    with TestClient(create_app(config)) as client:
        yield client, config


@pytest.fixture()
def chat_app_on_each_database(assistant_setup, database):
    """chat_app on SQLite, then with the registry, log and chat turns on a fresh PostgreSQL database."""
    config, definition = assistant_setup
    if database.url is not None:
        home = config.registry.home
        copy_rows(f"sqlite:///{home / 'registry.db'}", database.url)
        config = server_settings(home, f"registry.database_url={database.url}")
    config.serve.assistant = definition
    config.admin_keys = "root"
    with TestClient(create_app(config)) as client:
        yield client, config


def say(client, message, session=None, headers=None):
    """One turn; a new session unless `session` names one the server issued."""
    body = {"message": message} if session is None else {"session_id": session, "message": message}
    response = client.post("/v1/chat", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_turn_answers_with_intent_sentiment_sources_and_an_id(chat_app_on_each_database):
    client, config = chat_app_on_each_database
    info = client.get("/v1/assistant").json()
    assert info["name"] == "shop" and info["intents"] == ["delivery", "password", "refund"]
    assert info["intent_model"] == "toy@1" and info["sentiment_model"] == "mood@1"
    turn = say(client, "refund money back please")
    assert turn["turn_id"] and len(turn["session_id"]) == 32 and turn["model"] == "toy@1" and turn["lang"] == "en"
    assert turn["predicted_intent"] in info["intents"] and turn["sentiment"] in {"negative", "neutral", "positive"}
    assert turn["reply"] and len(turn["sources"]) == 2 and 0 <= turn["confidence"] <= 1  # the English entries
    assert list((config.registry.home / "assistants" / "shop" / "scope").glob("toy@1-*.json"))


def test_asking_for_a_person_and_a_run_of_anger_escalate(chat_app):
    client, _ = chat_app
    human = say(client, "can I talk to a human")
    assert human["escalate"] and human["reason"] == "asked for a person"
    assistant = client.app.state.tuneloop.chat.runtime
    assistant.thresholds["toy@1"] = None  # only the mood rule may fire in what follows
    assistant.definition.escalation.min_confidence = 0.0
    first = say(client, "angry terrible worst awful hate")
    assert first["sentiment"] == "negative" and first["reason"] is None
    assert say(client, "angry terrible worst awful hate")["reason"] is None  # a new session
    second = say(client, "useless awful terrible angry", session=first["session_id"])
    assert second["sentiment"] == "negative" and second["reason"] == "negative for 2 turns in a row"
    assert second["reply"].startswith("I'm sorry about this")


def test_feedback_on_a_turn_reaches_the_retraining_export(chat_app_on_each_database):
    client, config = chat_app_on_each_database
    turn = say(client, "where is my parcel courier late")
    sent = client.post("/v1/feedback", json={"turn_id": turn["turn_id"], "rating": -1, "corrected_label": "password"})
    assert sent.status_code == 201 and sent.json()["turn_id"] == turn["turn_id"]
    assert client.post("/v1/feedback", json={"turn_id": "nope", "rating": 1}).status_code == 404
    both = client.post("/v1/feedback", json={"turn_id": turn["turn_id"], "prediction_id": "x", "rating": 1})
    assert both.status_code == 422 and "exactly one of prediction_id or turn_id" in both.json()["detail"]
    log = PredictionLog(config.registry.resolved_database_url(), config.registry.home)
    unreviewed = feedback_examples(log.feedback_for("toy"))  # an anonymous sender: it waits for an admin
    assert unreviewed.examples.empty and unreviewed.counts["awaiting_review"] == 1
    queue = client.get("/v1/admin/feedback", headers=ADMIN).json()["items"]
    assert queue[0]["corrected_label"] == "password" and queue[0]["source"] == "chat"
    assert queue[0]["sender"] == "anonymous" and queue[0]["review"] == "pending"
    [group] = client.get("/v1/admin/review", params={"model": "toy"}, headers=ADMIN).json()["groups"]
    decision = {"model": "toy", "decision": "approve", "groups": [group["group"]]}
    assert client.post("/v1/admin/review", json=decision, headers=ADMIN).json() == {"decided": 1}
    exported = feedback_examples(log.feedback_for("toy"))
    log.close()
    assert exported.examples[["text", "label"]].values.tolist() == [["where is my parcel courier late", "password"]]


def test_the_admin_page_explains_the_label_a_chat_turn_was_given(chat_app):
    client, _ = chat_app
    turn = say(client, "where is my parcel courier late")
    client.post("/v1/feedback", json={"turn_id": turn["turn_id"], "corrected_label": "password"})
    [item] = client.get("/v1/admin/feedback", headers=ADMIN).json()["items"]
    body = {"model": item["model"], "text": item["text"], "label": item["predicted"]}
    explained = client.post("/v1/admin/explain", json=body, headers=ADMIN)
    assert explained.status_code == 200, explained.text
    explanation = explained.json()
    assert explanation["label"] == item["predicted"] and explanation["text"] == item["text"]
    assert [w["word"] for w in explanation["words"]] == item["text"].split()
    assert client.post("/v1/admin/explain", json=body).status_code in (401, 403)  # admins only
    for bad, status, message in [
        ({**body, "label": "nope"}, 404, "'nope' is not one of this model's labels"),
        ({**body, "model": "toy@99"}, 404, "'toy' has no version 99"),
    ]:
        answer = client.post("/v1/admin/explain", json=bad, headers=ADMIN)
        assert answer.status_code == status and message in answer.json()["detail"], answer.text


def test_a_stored_turn_always_has_its_predictions_in_the_database(assistant_setup):
    """Regression: a turn was committed while its two predictions waited in the log's buffer, so a crash
    right after left turns whose feedback could never find the prediction."""
    config, definition = assistant_setup
    config.serve.assistant = definition
    config.serve.log_flush_ms = 60_000  # the background writer will not get to them in this test
    with TestClient(create_app(config)) as client:
        turn = say(client, "refund money back please")
        engine = client.app.state.tuneloop.prediction_log.engine
        with engine.connect() as connection:
            stored = connection.execute(
                text("select intent_prediction_id, sentiment_prediction_id from chat_turns where id = :id"),
                {"id": turn["turn_id"]},
            ).one()
            found = connection.execute(
                text("select count(*) from predictions where id in (:a, :b)"), {"a": stored[0], "b": stored[1]}
            ).scalar()
        assert found == 2


def test_a_turn_writes_its_own_predictions_and_leaves_the_backlog_to_the_writer(assistant_setup):
    """Review finding M5: a chat turn flushed the log's whole backlog inline, masking every waiting text (up to
    64 per /v1/predict request, long number-heavy ones included) before it could answer."""
    config, definition = assistant_setup
    config.serve.assistant = definition
    config.serve.log_flush_ms = 60_000  # the background writer will not get to the backlog in this test
    with TestClient(create_app(config)) as client:
        for _ in range(3):
            predicted = client.post("/v1/predict", json={"model": "toy", "texts": ["call 555 0100 1/2/3"] * 20})
            assert predicted.status_code == 200
        prediction_log = client.app.state.tuneloop.prediction_log
        turn = say(client, "refund money back please")
        assert prediction_log.backlog == 60
        stored = client.app.state.tuneloop.conversations.get(turn["turn_id"])
        assert prediction_log.get(stored.intent_prediction_id) is not None


def test_thumbs_on_an_out_of_scope_turn_stay_on_the_turn_and_never_become_a_label(chat_app_on_each_database):
    client, config = chat_app_on_each_database
    client.app.state.tuneloop.chat.runtime.thresholds["toy@1"] = _reject_everything()
    turn = say(client, "what is the weather tomorrow")
    assert turn["intent"] is None
    sent = client.post("/v1/feedback", json={"turn_id": turn["turn_id"], "rating": 1})
    assert sent.status_code == 201 and sent.json()["feedback_id"] is None
    log = PredictionLog(config.registry.resolved_database_url(), config.registry.home)
    assert feedback_examples(log.feedback_for("toy")).examples.empty
    log.close()
    stored = client.app.state.tuneloop.conversations.get(turn["turn_id"])
    assert stored.rating == 1 and stored.intent is None


def test_an_in_scope_message_it_turned_away_and_a_person_labelled_trains_as_usual(chat_app):
    client, config = chat_app
    client.app.state.tuneloop.chat.runtime.thresholds["toy@1"] = _reject_everything()
    turn = say(client, "refund money back please", headers=ADMIN)  # a turn takes feedback from its own key only
    assert turn["intent"] is None
    sent = client.post("/v1/feedback", json={"turn_id": turn["turn_id"], "corrected_label": "refund"}, headers=ADMIN)
    assert sent.status_code == 201, sent.text
    log = PredictionLog(config.registry.resolved_database_url(), config.registry.home)
    examples = feedback_examples(log.feedback_for("toy")).examples
    log.close()
    assert list(zip(examples["text"], examples["label"], strict=True)) == [("refund money back please", "refund")]


def _reject_everything():
    return ScopeThreshold(2.0, "test", Share.of(1, 1), Share.of(1, 1), 1, 1)


def test_a_message_marked_out_of_scope_waits_for_review_then_becomes_an_out_of_scope_example(chat_app):
    client, config = chat_app
    info = client.get("/v1/assistant").json()
    assert info["out_of_scope_label"] == "out_of_scope" and "out_of_scope" not in info["intents"]
    turn = say(client, "who won the football last night")
    marked = client.post("/v1/feedback", json={"turn_id": turn["turn_id"], "corrected_label": "out_of_scope"})
    assert marked.status_code == 201, marked.text
    runtime = client.app.state.tuneloop.chat.runtime
    intent = client.app.state.tuneloop.served.slot("toy").current
    assert "who won the football last night" not in runtime.tuning_examples(intent).own  # an anonymous sender
    [group] = client.get("/v1/admin/review?model=toy", headers=ADMIN).json()["groups"]
    assert group["label"] == "out_of_scope" and group["pending"] == 1
    client.post(
        "/v1/admin/review", json={"model": "toy", "decision": "approve", "groups": [group["group"]]}, headers=ADMIN
    )
    assert "who won the football last night" in runtime.tuning_examples(intent).own


def test_an_admin_sees_the_scope_curve_and_moves_the_point_for_the_served_version(chat_app):
    client, config = chat_app
    assert client.get("/v1/admin/scope").status_code in (401, 403)
    scope = client.get("/v1/admin/scope", headers=ADMIN).json()
    assert scope["intent_model"] == "toy@1" and scope["policy"] == "at most 5% rejected" and scope["moves"] == []
    assert (
        scope["in_scope_rejected"]["low"] <= scope["in_scope_rejected"]["value"] <= scope["in_scope_rejected"]["high"]
    )
    curve = scope["curve"]
    assert [p["in_scope_rejected"] for p in curve] == sorted(p["in_scope_rejected"] for p in curve)
    strictest = curve[-1]
    moved = client.post("/v1/admin/scope", json={"threshold": strictest["threshold"]}, headers=ADMIN).json()
    assert moved["threshold"] == strictest["threshold"] and moved["moves"][-1]["by"] == key_id(hash_key("root"))
    assert moved["in_scope_rejected"]["value"] == pytest.approx(strictest["in_scope_rejected"], abs=0.01)
    turn = say(client, "refund money back please")  # the next turn answers with it
    assert client.app.state.tuneloop.chat.runtime.thresholds["toy@1"].threshold == strictest["threshold"]
    assert (turn["intent"] is None) == (turn["confidence"] < strictest["threshold"])
    back = client.post("/v1/admin/scope", json={"threshold": None}, headers=ADMIN).json()
    assert back["threshold"] == scope["threshold"] and len(back["moves"]) == 2
    for invalid in (7, False, "0.5"):  # off the curve's range, or not a number (a fuzzer's `false` was taken as 0)
        assert client.post("/v1/admin/scope", json={"threshold": invalid}, headers=ADMIN).status_code == 422


def test_pages_and_assets_are_served_without_any_outside_host(chat_app):
    client, _ = chat_app
    for path in ("/", "/admin", "/assistant-assets/chat.js", "/assets/admin.js", "/assets/style.css"):
        response = client.get(path)
        assert response.status_code == 200, path
        # The SVG namespace is a name the browser never fetches; any other URL would be a host to reach.
        text = response.text.replace('"http://www.w3.org/2000/svg"', "")
        assert "http://" not in text and "https://" not in text, path


def test_pages_forbid_framing_and_foreign_scripts_and_every_answer_carries_the_safety_headers(chat_app):
    """Regression: no page had a content-security policy or a frame rule (clickjacking the admin page)."""
    client, _ = chat_app
    for path in ("/", "/admin"):
        policy = client.get(path).headers["content-security-policy"]
        assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy, path
    for path in ("/", "/admin", "/v1/assistant", "/assets/style.css", "/nowhere"):
        headers = client.get(path).headers
        assert headers["x-content-type-options"] == "nosniff", path
        assert headers["x-frame-options"] == "DENY" and headers["referrer-policy"] == "no-referrer", path


def test_chat_limits_and_missing_assistant(chat_app, served):
    client, _ = chat_app
    too_long = client.post("/v1/chat", json={"message": "x" * 2001})
    assert too_long.status_code == 422 and "message has 2001 characters" in too_long.json()["detail"]
    assert client.post("/v1/chat", json={"message": ""}).status_code == 422
    config, _ = served
    with TestClient(create_app(config)) as plain:
        response = plain.post("/v1/chat", json={"message": "hi"})
        assert response.status_code == 404 and "no assistant is configured" in response.json()["detail"]
        assert plain.get("/").status_code == 404


def test_admin_api_lists_versions_and_runs_one_job_at_a_time(chat_app_on_each_database):
    client, _ = chat_app_on_each_database
    assert client.get("/v1/admin/models").status_code == 401
    models = {m["name"]: m for m in client.get("/v1/admin/models", headers=ADMIN).json()["models"]}
    assert models["toy"]["serving"] == 1 and models["toy"]["versions"][0]["stage"] == "production"
    started = client.post("/v1/admin/jobs", json={"kind": "retrain", "target": "toy"}, headers=ADMIN)
    assert started.status_code == 202 and started.json()["status"] == "running"
    busy = client.post("/v1/admin/jobs", json={"kind": "gate", "target": "toy@1"}, headers=ADMIN)
    assert busy.status_code == 409 and "still running" in busy.json()["detail"]
    job_id = started.json()["id"]
    deadline = time.monotonic() + 120
    while (job := client.get(f"/v1/admin/jobs/{job_id}", headers=ADMIN).json())["status"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert job["status"] == "failed" and "no feedback with a label for 'toy'" in job["log"]
    [listed] = client.get("/v1/admin/jobs", headers=ADMIN).json()["jobs"]
    assert listed["id"] == job_id and listed["log"] == ""  # the list stays small: logs come one job at a time
    bad = client.post("/v1/admin/jobs", json={"kind": "gate", "target": "--config=x.yaml"}, headers=ADMIN)
    assert bad.status_code == 422
    unknown = client.post("/v1/admin/jobs", json={"kind": "gate", "target": "toy@9"}, headers=ADMIN)
    assert unknown.status_code == 404 and len(client.get("/v1/admin/jobs", headers=ADMIN).json()["jobs"]) == 1
    with model_job_lease(client.app.state.tuneloop.registry.engine, "toy", "retrain toy (cron)"):
        elsewhere = client.post("/v1/admin/jobs", json={"kind": "gate", "target": "toy@1"}, headers=ADMIN)
    assert elsewhere.status_code == 409 and "'retrain toy (cron)'" in elsewhere.json()["detail"]


def sse(text):
    events = []
    for block in text.strip().split("\n\n"):
        name = block.split("\n")[0].removeprefix("event: ")
        events.append((name, json.loads(block.split("\n")[1].removeprefix("data: "))))
    return events


def test_a_streamed_turn_sends_what_was_understood_then_the_reply_then_the_stored_answer(chat_app_on_each_database):
    client, _ = chat_app_on_each_database
    response = client.post("/v1/chat?stream=true", json={"message": "refund money back"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse(response.text)
    assert [name for name, _ in events][0] == "turn" and events[-1][0] == "done"
    tokens = "".join(data["text"] for name, data in events if name == "token")
    done = events[-1][1]
    assert done["reply"] == tokens.strip() and done["turn_id"]
    assert client.app.state.tuneloop.conversations.get(done["turn_id"]).reply == done["reply"]


def test_a_local_language_model_writes_the_reply_and_streams_it(assistant_setup, tiny_lm):
    config, definition = assistant_setup
    definition.write_text(definition.read_text() + f"generator: {{kind: local, model: {tiny_lm}, max_new_tokens: 6}}\n")
    config.serve.assistant = definition
    with TestClient(create_app(config)) as client:
        client.app.state.tuneloop.chat.runtime.thresholds["toy@1"] = None
        client.app.state.tuneloop.chat.runtime.definition.escalation.min_confidence = 0.0
        whole = say(client, "refund money back")
        assert whole["reply"] and not whole["escalate"]
        streamed = sse(client.post("/v1/chat?stream=true", json={"message": "refund money back"}).text)
        pieces = [data["text"] for name, data in streamed if name == "token"]
        assert pieces and streamed[-1][1]["reply"] == "".join(pieces).strip()
        assert streamed[-1][1]["reply"] == whole["reply"]  # greedy: the same words either way


def test_the_local_language_model_writes_in_a_process_of_its_own_at_a_lower_priority(assistant_setup, tiny_lm):
    """Generating in the server's process starved its event loop: the model's Python held the interpreter lock
    and its threads took the cores at the server's own priority (bench/burst.py: /readyz up to half a second
    during a burst of chat turns). Replies are written by a child process, niced, which stops with the server."""
    config, definition = assistant_setup
    definition.write_text(definition.read_text() + f"generator: {{kind: local, model: {tiny_lm}, max_new_tokens: 6}}\n")
    config.serve.assistant = definition
    before = set(multiprocessing.active_children())
    with TestClient(create_app(config)) as client:
        workers = [child for child in multiprocessing.active_children() if child not in before]
        assert len(workers) == 1, "the local model runs in the server's own process"
        assert os.getpriority(os.PRIO_PROCESS, workers[0].pid) == min(19, os.nice(0) + GENERATION_NICE)
        client.app.state.tuneloop.chat.runtime.thresholds["toy@1"] = None
        assert say(client, "refund money back")["reply"]
    assert not workers[0].is_alive()


def test_a_multitask_model_gives_intent_and_sentiment_from_one_encoder_pass(assistant_setup, tiny_encoder):
    import pandas as pd

    from helpers import MOODS, toy_rows
    from tuneloop.config import load_config
    from tuneloop.registry import Registry
    from tuneloop.training import classification

    config, definition = assistant_setup
    folder = definition.parent
    pd.DataFrame(toy_rows(per_label=30, seed=8)).to_csv(folder / "intents.csv", index=False)
    nlu = load_config(
        None,
        [
            f"model.name={tiny_encoder}",
            f"registry.home={config.registry.home}",
            "name=nlu",
            "train.epochs=4",
            "train.batch_size=8",
            "train.lr=1e-3",
            "train.head_lr=1e-2",
            "model.max_length=32",
            "train.threads=1",
            "serving.runtime=torch",
            f"tasks.intent.path={folder / 'intents.csv'}",
            f"tasks.sentiment.path={folder / 'mood.csv'}",
        ],
    )
    Registry(nlu.registry).promote(classification.run(nlu, show_progress=False).version.ref)
    definition.write_text(
        definition.read_text()
        .replace("intent_model: toy", "intent_model: nlu")
        .replace("sentiment_model: mood", "sentiment_model: nlu")
    )
    config.serve.assistant = definition
    config.serve.models = ["nlu"]
    with TestClient(create_app(config)) as client:
        served = client.app.state.tuneloop.served
        assert set(served.slots) == {"nlu"}  # no separate sentiment model is loaded
        passes = []
        served.slots["nlu"].current.model.encoder.register_forward_hook(lambda *_: passes.append(1))
        info = client.get("/v1/assistant").json()
        assert info["intent_model"] == "nlu@1" and info["sentiment_model"] == "nlu:sentiment@1"
        turn = say(client, "angry terrible worst awful hate refund")
        assert passes == [1]
        assert turn["sentiment"] in MOODS and turn["predicted_intent"] in {"refund", "delivery", "password"}
        predicted = client.post("/v1/predict", json={"texts": ["refund money back"]}).json()
        top = predicted["predictions"][0]["top_k"]  # the intent task's own distribution, not all heads' columns
        assert {s["label"] for s in top} == {"refund", "delivery", "password"}
        assert sum(s["score"] for s in top) == pytest.approx(1.0, abs=1e-3)
    log = PredictionLog(config.registry.resolved_database_url(), config.registry.home)
    try:  # the intent answers under the model's name, the sentiment under NAME:TASK: feedback never mixes them
        assert log.count("nlu")["predictions"] == 2 and log.count("nlu:sentiment")["predictions"] == 1
    finally:
        log.close()


def test_streamed_replies_are_bounded_and_each_ends_its_count(chat_app):
    client, config = chat_app
    chat = client.app.state.tuneloop.chat
    body = {"message": "refund money back"}
    chat.in_progress = config.serve.max_streams  # as many replies as allowed are being streamed
    refused = client.post("/v1/chat?stream=true", json=body)
    assert refused.status_code == 503 and "serve.max_streams" in refused.json()["detail"]
    chat.in_progress = 0
    answered = client.post("/v1/chat?stream=true", json=body)
    assert answered.status_code == 200 and "event: done" in answered.text
    assert chat.in_progress == 0


def test_a_burst_of_whole_turns_is_bounded_too(chat_app):
    """Replies without streaming took no slot, and a streamed one checked its slot awaits before counting it: a
    burst of turns could take every worker thread, and every route with them (the review's M2). Past
    serve.max_streams turns in progress the others are refused at once, whole or streamed."""
    client, config = chat_app
    chat = client.app.state.tuneloop.chat
    held, planning = threading.Event(), chat.plan
    chat.plan = lambda seen: (held.wait(30), planning(seen))[1]  # every turn in progress waits here
    with ThreadPoolExecutor(config.serve.max_streams + 4) as pool:
        turns = [
            pool.submit(client.post, "/v1/chat" + ("?stream=true" if i % 2 else ""), json={"message": "refund"})
            for i in range(config.serve.max_streams + 4)
        ]
        refused = [turn.result() for turn in itertools.islice(as_completed(turns), 4)]
        assert [answer.status_code for answer in refused] == [503] * 4
        assert chat.in_progress == config.serve.max_streams
        assert client.get("/readyz").status_code == 200  # the key checks and probes never wait for a thread
        held.set()
        codes = sorted(turn.result(timeout=30).status_code for turn in turns)
    assert codes == [200] * config.serve.max_streams + [503] * 4
    assert chat.in_progress == 0


def test_a_stream_never_iterated_still_gives_its_slot_back_and_stores_its_turn(chat_app):
    """A client can leave before its response's first byte, and then the reply's generator never starts:
    the route's background task ends the turn all the same (a generator-only release would leak the slot,
    and after serve.max_streams of them every streamed reply would be a 503)."""
    client, config = chat_app
    chat = client.app.state.tuneloop.chat

    async def abandon() -> None:
        turn = await chat.stream("gone", "refund money back")
        assert chat.in_progress == 1
        await turn.end()
        await turn.end()  # idempotent: the generator's own ending may come too

    for _ in range(config.serve.max_streams + 1):
        client.portal.call(abandon)
    assert chat.in_progress == 0
    deadline = time.monotonic() + 10
    while len(client.app.state.tuneloop.conversations.recent("gone", 100)) < config.serve.max_streams + 1:
        assert time.monotonic() < deadline, "the abandoned turns were not stored"
        time.sleep(0.05)


def test_feedback_on_a_turn_comes_only_from_its_key_and_changes_nothing_when_refused(assistant_setup):
    """Any key could rate or correct another key's turn, and a correction refused with 422 had already rated the
    turn (the review's L2)."""
    config, definition = assistant_setup
    config.serve.assistant = definition
    config.client_keys = "alice,bob"
    alice, bob = {"X-API-Key": "alice"}, {"X-API-Key": "bob"}
    with TestClient(create_app(config)) as client:
        turn = say(client, "refund money back", headers=alice)
        stolen = client.post("/v1/feedback", json={"turn_id": turn["turn_id"], "rating": -1}, headers=bob)
        assert stolen.status_code == 404
        wrong = {"turn_id": turn["turn_id"], "rating": -1, "comment": "bad", "corrected_label": "no-such-label"}
        assert client.post("/v1/feedback", json=wrong, headers=alice).status_code == 422
        stored = client.app.state.tuneloop.conversations.get(turn["turn_id"])
        assert (stored.rating, stored.comment) == (None, None)
        assert (
            client.post("/v1/feedback", json={"turn_id": turn["turn_id"], "rating": 1}, headers=alice).status_code
            == 201
        )
        assert client.app.state.tuneloop.conversations.get(turn["turn_id"]).rating == 1


def test_sessions_are_issued_by_the_server_and_continue_only_for_the_key_that_opened_them(assistant_setup):
    """Regression: session ids were chosen by the client and tied to nothing, so anyone who sent another user's
    id (or guessed one like "s1") had that user's recent turns recalled into their own reply's prompt."""
    config, definition = assistant_setup
    config.serve.assistant = definition
    config.client_keys = "alice,bob"
    with TestClient(create_app(config)) as client:
        alice, bob = {"X-API-Key": "alice"}, {"X-API-Key": "bob"}
        opened = say(client, "refund money back please", headers=alice)
        session = opened["session_id"]
        assert (
            len(session) == 32
            and say(client, "and my parcel?", session=session, headers=alice)["session_id"] == session
        )
        recalled = client.app.state.tuneloop.conversations.recent(session, 10)
        assert [t.message for t in recalled] == ["refund money back please", "and my parcel?"]
        for headers, named in ((bob, session), (alice, "s1")):
            refused = client.post(
                "/v1/chat", json={"session_id": named, "message": "what did they say?"}, headers=headers
            )
            assert refused.status_code == 404 and "no chat session" in refused.json()["detail"]
        assert len(client.app.state.tuneloop.conversations.recent(session, 10)) == 2  # nothing read, nothing added
