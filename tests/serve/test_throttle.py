"""Limits on who may do what how often: feedback per untrusted sender (a rate per process, a daily quota in the
database), wrong keys per address, and /metrics behind an admin key when asked."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from tuneloop.cli import app as cli
from tuneloop.serve.app import create_app
from tuneloop.serve.security import hash_key


def send_feedback(client, headers=None):
    answer = client.post("/v1/predict", json={"texts": ["where is my parcel"]}, headers=headers)
    prediction_id = answer.json()["predictions"][0]["prediction_id"]
    sent = client.post("/v1/feedback", json={"prediction_id": prediction_id, "rating": 1}, headers=headers)
    return sent


def test_an_untrusted_sender_is_held_to_the_feedback_rate_and_a_trusted_one_is_not(served):
    config, _ = served
    config.serve.client_key_hashes = [hash_key("someone"), hash_key("staff")]
    config.serve.trusted_key_hashes = [hash_key("staff")]
    config.serve.feedback_rate_limit = "3/minute"
    with TestClient(create_app(config)) as client:
        assert [send_feedback(client, {"X-API-Key": "someone"}).status_code for _ in range(3)] == [201] * 3
        refused = send_feedback(client, {"X-API-Key": "someone"})
        assert refused.status_code == 429 and "serve.feedback_rate_limit" in refused.json()["detail"]
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert [send_feedback(client, {"X-API-Key": "staff"}).status_code for _ in range(5)] == [201] * 5


def test_the_daily_quota_is_counted_in_the_database_across_replicas(served):
    config, _ = served
    config.serve.feedback_rate_limit = None
    config.serve.feedback_daily_quota = 2
    with TestClient(create_app(config)) as first, TestClient(create_app(config)) as second:
        assert send_feedback(first).status_code == 201
        assert send_feedback(second).status_code == 201
        refused = send_feedback(first)
        assert refused.status_code == 429 and "quota (serve.feedback_daily_quota)" in refused.json()["detail"]
        assert send_feedback(second).status_code == 429  # anonymous senders share one quota


def test_wrong_keys_from_one_address_are_throttled_even_before_the_right_one(served):
    config, _ = served
    config.admin_keys = "root"
    config.serve.auth_failures_per_minute = 3
    with TestClient(create_app(config)) as client:
        for guess in ("a", "b", "c"):
            assert client.get("/v1/admin/models", headers={"X-API-Key": guess}).status_code == 401
        blocked = client.get("/v1/admin/models", headers={"X-API-Key": "root"})
        assert blocked.status_code == 429 and "serve.auth_failures_per_minute" in blocked.json()["detail"]
        assert "retry-after" in blocked.headers
        assert client.post("/v1/predict", json={"texts": ["a"]}).status_code == 200  # no key, open route: not a guess


def test_metrics_can_require_an_admin_key(served):
    config, _ = served
    config.admin_keys = "root"
    with TestClient(create_app(config)) as client:
        assert client.get("/metrics").status_code == 200  # the default: for the scraper on the same network
    config.serve.metrics_need_key = True
    with TestClient(create_app(config)) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"X-API-Key": "root"}).status_code == 200
        assert "security" in client.get("/openapi.json").json()["paths"]["/metrics"]["get"]


@pytest.mark.parametrize("rate", ["lots", "5 per fortnight"])
def test_an_unreadable_rate_is_one_clear_error(served, rate):
    _, home = served
    result = CliRunner().invoke(cli, ["serve", f"registry.home={home}", f"serve.feedback_rate_limit={rate}"])
    assert result.exit_code != 0 and "is not a rate; write N/second" in result.output, result.output


def test_a_request_naming_another_host_is_refused(served):
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 reaches a loopback server from
    the user's browser; its requests still name evil.example."""
    config, _ = served
    config.serve.allowed_hosts = []  # the default: the names of serve.host, 127.0.0.1
    app = create_app(config)
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/healthz", headers={"host": "localhost:8000"}).status_code == 200
        assert client.get("/healthz", headers={"host": "[::1]:8000"}).status_code == 200
        refused = client.post("/v1/predict", json={"texts": ["a"]}, headers={"host": "evil.example"})
        assert refused.status_code == 400 and "Invalid host header" in refused.text


@pytest.mark.parametrize(
    "host, configured, allowed",
    [
        ("127.0.0.1", [], ["127.0.0.1", "[::1]", "localhost"]),
        ("::1", [], ["127.0.0.1", "[::1]", "localhost"]),
        ("10.0.0.5", [], ["10.0.0.5"]),
        ("Api.Internal", [], ["api.internal"]),
        ("0.0.0.0", [], ["*"]),
        ("0.0.0.0", ["api.example.com"], ["api.example.com"]),
    ],
)
def test_allowed_hosts_follow_the_listening_address(host, configured, allowed):
    from tuneloop.config import ServeConfig
    from tuneloop.serve.security import allowed_hosts

    assert allowed_hosts(ServeConfig(host=host, allowed_hosts=configured)) == allowed
