"""Migrations on a real PostgreSQL: a new database is built on first open, and one that is behind is refused
with the command to run, which then upgrades it (several servers share it: upgrading is a decision)."""

from __future__ import annotations

import os
import uuid

import pytest
from sqlalchemy import create_engine, make_url, text
from typer.testing import CliRunner

from db.test_migrations import opened, pre_migration_home
from helpers import drop_test_database
from tuneloop.cli import app
from tuneloop.db.migrate import head_revision
from tuneloop.errors import TuneloopError

URL = os.environ.get("TUNELOOP_TEST_DATABASE_URL")
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(
        not URL,
        reason="set TUNELOOP_TEST_DATABASE_URL to a PostgreSQL database "
        "(.ci/run starts one; make postgres does it locally)",
    ),
]


@pytest.fixture()
def fresh_database():
    """A new, empty database on the test server (its user may create databases), dropped afterwards."""
    name = f"tl_{uuid.uuid4().hex[:10]}"
    admin = create_engine(URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"create database {name}"))
    yield make_url(URL).set(database=name).render_as_string(hide_password=False)
    drop_test_database(admin, name)
    admin.dispose()


def test_a_new_postgresql_database_is_built_on_first_open(fresh_database):
    with opened(fresh_database).connect() as connection:
        assert connection.execute(text("select version_num from alembic_version")).scalar_one() == head_revision()
        opened(fresh_database).dispose()


def test_a_shared_database_behind_is_refused_until_db_upgrade(fresh_database):
    pre_migration_home(fresh_database).dispose()
    with pytest.raises(TuneloopError, match="tuneloop db upgrade"):
        opened(fresh_database)
    result = CliRunner().invoke(app, ["db", "upgrade", f"registry.database_url={fresh_database}"])
    assert result.exit_code == 0, result.output
    assert "upgraded from an empty or pre-migration database" in result.output and "***" in result.output
    engine = opened(fresh_database)
    with engine.connect() as connection:
        assert connection.execute(text("select version_num from alembic_version")).scalar_one() == head_revision()
    engine.dispose()
