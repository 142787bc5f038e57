"""Migrations: a new database is built by them and matches the schema module; a home from before them is
recognised and kept; a database at a revision this tuneloop does not know is refused, not touched."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from typer.testing import CliRunner

from tuneloop.cli import app
from tuneloop.db import engine as db_engine
from tuneloop.db.migrate import head_revision
from tuneloop.db.schema import Base
from tuneloop.errors import TuneloopError


def opened(url: str):
    db_engine.open_database.cache_clear()  # each test opens its database afresh, as a new process would
    return db_engine.open_database(url)


def test_a_new_database_is_built_by_the_migrations_and_matches_the_schema_module(tmp_path):
    engine = opened(f"sqlite:///{tmp_path / 'new.db'}")
    with engine.connect() as connection:
        context = MigrationContext.configure(connection)
        assert context.get_current_revision() == head_revision()
        assert compare_metadata(context, Base.metadata) == []  # a model change without a migration fails here


def test_a_home_from_before_migrations_keeps_its_rows_and_gets_a_revision(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = create_engine(url)
    Base.metadata.create_all(old)  # what every home held before migrations existed
    with old.begin() as connection:
        connection.execute(
            text(
                "insert into predictions (id, created_at, model_name, model_version, text, label, "
                "scores, source) values ('p1', '2026-11-01', 'toy', 1, 'hi', 'a', '{}', 'api')"
            )
        )
    old.dispose()
    engine = opened(url)
    with engine.connect() as connection:
        assert MigrationContext.configure(connection).get_current_revision() == head_revision()
        assert connection.execute(text("select text from predictions")).scalar_one() == "hi"


def test_a_database_at_an_unknown_revision_is_refused_and_left_alone(tmp_path):
    url = f"sqlite:///{tmp_path / 'newer.db'}"
    opened(url)
    with create_engine(url).begin() as connection:
        connection.execute(text("update alembic_version set version_num = 'f00d'"))
    with pytest.raises(TuneloopError, match="revision f00d, which this tuneloop does not know"):
        opened(url)
    with create_engine(url).connect() as connection:
        assert connection.execute(text("select version_num from alembic_version")).scalar_one() == "f00d"
        assert "model_versions" in inspect(connection).get_table_names()


def test_db_upgrade_command_reports_the_revision(tmp_path):
    result = CliRunner().invoke(app, ["db", "upgrade", f"registry.home={tmp_path}"])
    assert result.exit_code == 0, result.output
    assert f"at schema revision {head_revision()}" in result.output
