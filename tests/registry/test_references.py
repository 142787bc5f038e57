"""NAME@VERSION references in a config (model.name, sft.model, generator.model) are resolved by the registry
the command was given, never by one built from the home folder alone."""

from __future__ import annotations

import os
import uuid

import pytest
from typer.testing import CliRunner

from tuneloop.cli import app

runner = CliRunner()
POSTGRES_URL = os.environ.get("TUNELOOP_TEST_DATABASE_URL")


def _train_twice_on_a_database_outside_the_home(tiny_overrides, database_url: str, base: str, derived: str) -> None:
    on_that_database = [*tiny_overrides, f"registry.database_url={database_url}"]
    first = runner.invoke(app, ["train", *on_that_database, f"name={base}"])
    assert first.exit_code == 0, first.output
    assert runner.invoke(app, ["models", "show", f"{base}@1", f"registry.database_url={database_url}"]).exit_code == 0
    # The home's own SQLite file knows nothing of the base model: only the configured database does.
    second = runner.invoke(
        app,
        [
            "train",
            *[o for o in on_that_database if not o.startswith("model.name=")],
            f"model.name={base}@1",
            f"name={derived}",
        ],
    )
    assert second.exit_code == 0, second.output
    shown = runner.invoke(app, ["models", "show", f"{derived}@1", f"registry.database_url={database_url}"])
    assert f'"base_model": "{base}@1"' in shown.output


def test_a_registered_encoder_is_found_in_the_configured_database(tiny_overrides, tmp_path):
    _train_twice_on_a_database_outside_the_home(
        tiny_overrides, f"sqlite:///{tmp_path / 'elsewhere.db'}", "base", "derived"
    )


@pytest.mark.postgres
@pytest.mark.skipif(
    not POSTGRES_URL,
    reason="set TUNELOOP_TEST_DATABASE_URL to a PostgreSQL database "
    "(.ci/run starts one; make postgres does it locally)",
)
def test_a_registered_encoder_is_found_in_a_postgresql_registry(tiny_overrides):
    # Names no other run uses: the database is shared between test runs.
    suffix = uuid.uuid4().hex[:8]
    _train_twice_on_a_database_outside_the_home(tiny_overrides, POSTGRES_URL, f"base-{suffix}", f"derived-{suffix}")
