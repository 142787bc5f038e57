"""Limits on who may do what how often: feedback per untrusted sender (a rate per process, a daily quota in the
database), wrong keys per address, and /metrics behind an admin key when asked."""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient
from live_server import LiveServer
from typer.testing import CliRunner

from tuneloop.cli import app as cli
from tuneloop.serve.app import create_app
from tuneloop.serve.security import hash_key, new_key


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


def test_a_keys_daily_quota_is_counted_in_the_database_across_replicas(served):
    config, _ = served
    config.client_keys = "someone"
    config.serve.feedback_rate_limit = None
    config.serve.feedback_daily_quota = 2
    key = {"X-API-Key": "someone"}
    with TestClient(create_app(config)) as first, TestClient(create_app(config)) as second:
        assert send_feedback(first, key).status_code == 201
        assert send_feedback(second, key).status_code == 201
        refused = send_feedback(first, key)
        assert refused.status_code == 429 and "quota (serve.feedback_daily_quota)" in refused.json()["detail"]
        assert send_feedback(second, key).status_code == 429


def test_keyless_senders_are_counted_by_address_not_all_together(served):
    """One keyless client that used up its allowance leaves the others theirs (the review's L4)."""
    config, _ = served
    config.serve.trusted_proxies = ["127.0.0.1"]
    config.serve.feedback_rate_limit = "2/minute"
    config.serve.feedback_daily_quota = 3
    noisy, quiet = {"X-Forwarded-For": "203.0.113.7"}, {"X-Forwarded-For": "203.0.113.8"}
    with TestClient(create_app(config), client=("127.0.0.1", 40000)) as client:
        assert [send_feedback(client, noisy).status_code for _ in range(3)] == [201, 201, 429]
        assert send_feedback(client, quiet).status_code == 201
    config.serve.feedback_rate_limit = None
    with TestClient(create_app(config), client=("127.0.0.1", 40000)) as client:
        assert [send_feedback(client, quiet).status_code for _ in range(4)] == [201, 201, 201, 429]
        assert send_feedback(client, noisy).status_code == 201


LONG_KEY = new_key()


def test_wrong_keys_from_one_address_are_throttled_and_a_right_long_key_never_is(served):
    """A fuzzer's (or a neighbour's behind the same NAT) wrong keys must not lock out the admin key (the review's
    M3: 11 of 19 operations answered mostly 429); a short key, which guessing could find, waits like a wrong one."""
    config, _ = served
    config.admin_keys = f"{LONG_KEY},root"
    config.serve.auth_failures_per_minute = 3
    with TestClient(create_app(config)) as client:
        for guess in ("a", "b", "c"):
            assert client.get("/v1/admin/models", headers={"X-API-Key": guess}).status_code == 401
        blocked = client.get("/v1/admin/models", headers={"X-API-Key": "d"})
        assert blocked.status_code == 401 and "serve.auth_failures_per_minute" in blocked.json()["detail"]
        assert 1 <= int(blocked.headers["retry-after"]) <= 60
        assert client.get("/v1/admin/models", headers={"X-API-Key": LONG_KEY}).status_code == 200
        assert client.get("/v1/admin/models", headers={"X-API-Key": "root"}).status_code == 401
        assert client.post("/v1/predict", json={"texts": ["a"]}).status_code == 200  # no key, open route: not a guess


def refused_for_guessing(answer) -> bool:
    return answer.status_code == 401 and "too many wrong API keys" in answer.json()["detail"]


def test_a_client_cannot_choose_the_address_its_wrong_keys_are_counted_by(served):
    """Through the server `tuneloop serve` runs: X-Forwarded-For from a peer that is not a trusted proxy is
    ignored, so a new header per guess does not reset the count; from a trusted proxy it names the client."""
    config, _ = served
    config.admin_keys = "root"
    config.serve.auth_failures_per_minute = 3
    with LiveServer(create_app(config)) as live, httpx.Client(base_url=live.url) as client:
        answers = [
            client.get("/v1/admin/models", headers={"X-API-Key": "guess", "X-Forwarded-For": f"198.51.100.{i}"})
            for i in range(6)
        ]
        assert [refused_for_guessing(a) for a in answers] == [False] * 3 + [True] * 3
    config.serve.trusted_proxies = ["127.0.0.0/8"]
    with LiveServer(create_app(config)) as live, httpx.Client(base_url=live.url) as client:
        for _ in range(3):
            client.get("/v1/admin/models", headers={"X-API-Key": "guess", "X-Forwarded-For": "198.51.100.1"})
        other = client.get("/v1/admin/models", headers={"X-API-Key": "guess", "X-Forwarded-For": "198.51.100.2"})
        again = client.get("/v1/admin/models", headers={"X-API-Key": "guess", "X-Forwarded-For": "198.51.100.1"})
        assert (refused_for_guessing(other), refused_for_guessing(again)) == (False, True)


def test_a_proxy_that_is_not_an_address_is_one_clear_error(served):
    _, home = served
    result = CliRunner().invoke(cli, ["serve", f"registry.home={home}", 'serve.trusted_proxies=["*"]'])
    assert result.exit_code != 0 and "is not an IP address or network" in result.output, result.output


def test_made_up_methods_share_one_metrics_series(served):
    """Each method name a client makes up must not add a series (and its memory) to /metrics (the review's M4)."""
    config, _ = served
    with TestClient(create_app(config)) as client:
        for i in range(20):
            client.request(f"PROBE{i}", "/healthz")
        client.request("GET", "/healthz")
        exported = client.get("/metrics").text
    assert "PROBE" not in exported
    assert 'method="other"' in exported and 'method="GET"' in exported


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
