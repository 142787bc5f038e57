"""NAME@VERSION references in a config (model.name, sft.model, generator.model) are resolved by the registry
the command was given, never by one built from the home folder alone."""

from __future__ import annotations

from typer.testing import CliRunner

from tuneloop.cli import app

runner = CliRunner()


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


def test_a_registered_encoder_is_found_in_the_configured_database(tiny_overrides, database, tmp_path):
    # SQLite: a database file outside the home; PostgreSQL: a fresh database for this test alone.
    url = database.url or f"sqlite:///{tmp_path / 'elsewhere.db'}"
    _train_twice_on_a_database_outside_the_home(tiny_overrides, url, "base", "derived")
