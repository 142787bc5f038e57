"""Migrations: a new database is built by them and matches the schema module; a home from before them is
recognised and kept; a database at a revision this tuneloop does not know is refused, not touched."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import IntegrityError
from typer.testing import CliRunner

from tuneloop.assistant.store import ConversationStore
from tuneloop.cli import app
from tuneloop.db import engine as db_engine
from tuneloop.db.migrate import FIRST_REVISION, head_revision
from tuneloop.db.migrate import _config as migration_config
from tuneloop.db.schema import ANONYMOUS, PRE_UPGRADE_OWNER, Base
from tuneloop.errors import TuneloopError


def opened(url: str):
    db_engine.open_database.cache_clear()  # each test opens its database afresh, as a new process would
    return db_engine.open_database(url)


def pre_migration_home(url: str):
    """A database as every home held it before migrations existed: revision 0001's tables, no revision."""
    old = create_engine(url)
    with old.begin() as connection:
        command.upgrade(migration_config(connection), FIRST_REVISION)
        connection.execute(text("drop table alembic_version"))
    return old


def add_version(connection, number: int, stage: str, promoted_at: str | None) -> None:
    connection.execute(
        text(
            "insert into model_versions (name, version, stage, base_model, data_fingerprint, config, metrics, "
            "artifact_dir, created_at, promoted_at) values ('toy', :n, :stage, 'm', 'f', '{}', '{}', 'models/toy', "
            "'2026-11-01', :at)"
        ),
        {"n": number, "stage": stage, "at": promoted_at},
    )


def test_a_new_database_is_built_by_the_migrations_and_matches_the_schema_module(tmp_path):
    engine = opened(f"sqlite:///{tmp_path / 'new.db'}")
    with engine.connect() as connection:
        context = MigrationContext.configure(connection)
        assert context.get_current_revision() == head_revision()
        assert compare_metadata(context, Base.metadata) == []  # a model change without a migration fails here


def test_a_home_from_before_migrations_keeps_its_rows_and_gets_a_revision(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = pre_migration_home(url)
    with old.begin() as connection:
        connection.execute(
            text(
                "insert into predictions (id, created_at, model_name, model_version, text, label, scores, source) "
                "values ('p1', '2026-11-01', 'toy', 1, 'hi', 'a', '{}', 'api')"
            )
        )
        # Two production rows for one name, as concurrent promotions could leave them before revision 0002.
        add_version(connection, 1, "production", "2026-11-01 10:00")
        add_version(connection, 2, "production", "2026-11-02 10:00")
    old.dispose()
    engine = opened(url)
    with engine.connect() as connection:
        assert MigrationContext.configure(connection).get_current_revision() == head_revision()
        assert connection.execute(text("select text from predictions")).scalar_one() == "hi"
        stages = dict(connection.execute(text("select version, stage from model_versions")).all())
    assert stages == {1: "archived", 2: "production"}  # the one promoted last stays production


def test_the_database_holds_at_most_one_production_version_per_name(tmp_path):
    engine = opened(f"sqlite:///{tmp_path / 'one.db'}")
    with engine.begin() as connection:
        add_version(connection, 1, "production", None)
    with pytest.raises(IntegrityError), engine.begin() as connection:
        add_version(connection, 2, "production", None)


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


OPEN_AT = """
import sys, time
from tuneloop.db import open_database
while time.time() < float(sys.argv[2]):
    time.sleep(0.001)
open_database(sys.argv[1])
"""


def test_processes_opening_a_new_home_at_once_all_get_the_whole_schema(tmp_path):
    """Review finding, reproduced: four processes opening a new SQLite home at the same moment (a server and
    a CLI command, say) failed with 'table ... already exists' or left a revision over missing tables."""
    import subprocess
    import sys
    import time

    url = f"sqlite:///{tmp_path / 'new.db'}"
    start = str(time.time() + 3)
    processes = [
        subprocess.Popen([sys.executable, "-c", OPEN_AT, url, start], stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    errors = [p.communicate(timeout=120)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0, 0], errors
    with opened(url).connect() as connection:
        assert MigrationContext.configure(connection).get_current_revision() == head_revision()
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []


def test_a_migration_cut_short_leaves_the_database_as_it_was(tmp_path, monkeypatch):
    """On SQLite every statement of a migration is one transaction: no tables without their revision."""
    from tuneloop.db import migrate

    real_upgrade = migrate.command.upgrade

    def upgrade_then_die(config, revision):
        real_upgrade(config, revision)
        raise RuntimeError("killed half-way")

    monkeypatch.setattr(migrate.command, "upgrade", upgrade_then_die)
    url = f"sqlite:///{tmp_path / 'new.db'}"
    with pytest.raises(RuntimeError, match="killed half-way"):
        migrate.upgrade(create_engine(url))
    assert inspect(create_engine(url)).get_table_names() == []


PREDICTION_P1 = (
    "insert into predictions (id, created_at, model_name, model_version, text, label, scores, source) "
    "values ('p1', '2026-11-01', 'toy', 1, 'hello', 'a', '{}', 'api')"
)


def database_at(url: str, revision: str, *statements: str) -> None:
    """The database at `url` brought to `revision` (an older tuneloop's schema) with these rows inserted."""
    old = create_engine(url)
    with old.begin() as connection:
        command.upgrade(migration_config(connection), revision)
        for statement in statements:
            connection.execute(text(statement))
    old.dispose()


def test_feedback_stored_before_provenance_waits_for_review_as_anonymous(tmp_path):
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    feedback = "insert into feedback (prediction_id, created_at, corrected_label) values ('p1', '2026-11-01', 'b')"
    database_at(url, "0003", PREDICTION_P1, feedback)
    with opened(url).connect() as connection:
        row = connection.execute(text("select sender, trusted, review, reviewed_by from feedback")).one()
    assert tuple(row) == ("anonymous", False, "pending", None)


def test_sessions_from_before_session_owners_can_no_longer_be_continued_by_anyone(tmp_path):
    """Review finding L6: revision 0005 gave the sessions stored before it (their ids chosen by clients, so
    guessable, e.g. "s1") to 'anonymous', so any caller without a key could continue them and have their turns
    recalled into its own reply."""
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    turn = (
        "insert into chat_turns (id, session_id, assistant, created_at, message, reply, lang, predicted_intent, "
        "confidence, sentiment, escalate, intent_model, intent_prediction_id, sentiment_prediction_id) values "
        "('t1', 's1', 'shop', '2026-11-01', 'my address is ...', 'ok', 'en', 'refund', 0.9, 'neutral', false, "
        "'toy@1', 'p1', 'p2')"
    )
    database_at(url, "0004", turn)
    database_at(url, "0005")
    with create_engine(url).connect() as connection:
        assert connection.execute(text("select sender from chat_turns")).scalar_one() == ANONYMOUS
    store = ConversationStore(opened(url))
    assert store.owner("s1") == PRE_UPGRADE_OWNER != ANONYMOUS


def test_feedback_trusted_before_the_trust_table_keeps_training_until_a_server_starts(tmp_path):
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    feedback = (
        "insert into feedback (prediction_id, created_at, corrected_label, sender, trusted) values "
        "('p1', '2026-11-01', 'b', 'key:staff', true), ('p1', '2026-11-02', 'a', 'key:other', false)"
    )
    database_at(url, "0005", PREDICTION_P1, feedback)
    with opened(url).connect() as connection:
        assert connection.execute(text("select sender from trusted_senders")).scalars().all() == ["key:staff"]


def test_opening_waits_for_a_lock_held_longer_than_sqlites_default_wait(tmp_path):
    """CI failure, reproduced: switching a new file to WAL ran before the busy timeout was set, so a process
    opening a home while another held the write lock (migrating it, say) for more than sqlite3's default 5 s
    failed with "database is locked"."""
    import sqlite3
    import threading

    path = tmp_path / "new.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("create table busy (x)")
    holder.execute("begin exclusive")
    releaser = threading.Timer(7.0, lambda: holder.execute("commit"))
    releaser.start()
    try:
        engine = opened(f"sqlite:///{path}")
        with engine.connect() as connection:
            assert MigrationContext.configure(connection).get_current_revision() == head_revision()
    finally:
        releaser.join()
        holder.close()
