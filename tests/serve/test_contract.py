"""The server keeps the contract its OpenAPI document states.

schemathesis generates requests from /openapi.json, valid and invalid ones, a fixed number per operation
(derandomized, so a CI run is repeatable), against a live server with two models and an assistant. No answer
may be a server error, an undocumented status or content type, a body that disagrees with its schema, a
schema-valid request refused, or a key ignored where the document asks for one.

(schemathesis' pytest plugin does not run on pytest 9, so the operations are driven here with its Python API:
`as_strategy` under hypothesis, then `call_and_validate` with every default check.)
"""

from __future__ import annotations

import contextlib

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from live_server import LiveServer
from schemathesis.core.failures import FailureGroup

from tuneloop.serve.app import create_app

pytestmark = pytest.mark.fuzz

EXAMPLES_PER_OPERATION = 20


def exchange_examples(
    operation: schemathesis.APIOperation,
    mode: schemathesis.GenerationMode,
    url: str,
    headers: dict[str, str] | None,
    failures: list[str],
) -> None:
    """Send EXAMPLES_PER_OPERATION generated requests to one operation; what fails its checks goes in `failures`."""

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        derandomize=True,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def exchange(case: schemathesis.Case) -> None:
        try:
            case.call_and_validate(base_url=url, headers=headers)
        except FailureGroup as group:
            failures.extend(
                f"{operation.label} ({mode.value}): {failure}\n  {case.as_curl_command()}"
                for failure in group.exceptions
            )

    with contextlib.suppress(Unsatisfiable):  # no invalid request exists for an operation that takes no input
        exchange()


def contract_failures(url: str, headers: dict[str, str] | None = None) -> list[str]:
    failures: list[str] = []
    for loaded in schemathesis.openapi.from_url(f"{url}/openapi.json").get_all_operations():
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            exchange_examples(loaded.ok(), mode, url, headers, failures)
    return failures


@pytest.fixture()
def two_models_and_an_assistant(assistant_setup):
    config, definition = assistant_setup
    config.serve.assistant = definition
    return config


def test_an_open_server_keeps_its_contract(two_models_and_an_assistant):
    """No client keys: predict, feedback and chat take none (and the document says so); admin needs one."""
    config = two_models_and_an_assistant
    config.admin_keys = "root"
    with LiveServer(create_app(config)) as live:
        failures = contract_failures(live.url)
    assert not failures, "\n\n".join(failures)


def test_a_keyed_server_keeps_its_contract(two_models_and_an_assistant):
    """Client and admin keys configured; requests carry the admin key, so the admin routes are exercised too."""
    config = two_models_and_an_assistant
    config.admin_keys = "root"
    config.client_keys = "client"
    with LiveServer(create_app(config)) as live:
        failures = contract_failures(live.url, headers={"X-API-Key": "root"})
    assert not failures, "\n\n".join(failures)
