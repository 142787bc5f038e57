"""Schema migrations with Alembic: every database is brought to the schema this tuneloop expects.

An empty database is built by running the migrations from the start, a home from before migrations (its
tables, no revision) is recognised as the first revision, and a database that is behind is upgraded: a
SQLite home when it is opened (it belongs to this machine), any other database only by `tuneloop db
upgrade`, because several servers and trainers share it and an upgrade should be a decision.
"""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

from tuneloop.db.schema import Base
from tuneloop.errors import TuneloopError

# The tables of revision 0001, the schema homes had before migrations existed.
FIRST_REVISION = "0001"
# Any number: PostgreSQL's advisory lock that makes two processes opening one new database take turns.
MIGRATION_LOCK = 724_011


def _config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, built here (there is no alembic.ini); `connection` is what env.py migrates."""
    config = Config()
    config.set_main_option("script_location", str(resources.files("tuneloop.db") / "migrations"))
    config.attributes["connection"] = connection
    return config


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def head_revision() -> str:
    """The schema revision this tuneloop expects."""
    head = _scripts().get_current_head()
    if head is None:
        raise TuneloopError("the package's database migrations are missing: reinstall tuneloop")
    return head


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Bring the database to the head revision; (the revision it was at, the head)."""
    with engine.begin() as connection:
        # One process migrates at a time, and the others then find the work done (the revision is read
        # under the lock). On SQLite, BEGIN IMMEDIATE takes the write lock and makes every statement of the
        # migration one transaction (sqlite3 would otherwise commit each CREATE as it runs): a process killed
        # half-way leaves the database as it was, not tables without a revision.
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        elif engine.dialect.name == "sqlite":
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        before = current_revision(connection)
        if before is None and set(Base.metadata.tables) & set(inspect(connection).get_table_names()):
            command.stamp(_config(connection), FIRST_REVISION)  # a home from before migrations
        command.upgrade(_config(connection), "head")
    return before, head_revision()


def ensure_current(engine: Engine, shown_url: str) -> None:
    """Leave the database at the head revision, or refuse (a shared database behind it, or ahead of it)."""
    head = head_revision()
    with engine.connect() as connection:
        current = current_revision(connection)
        has_tables = bool(set(Base.metadata.tables) & set(inspect(connection).get_table_names()))
    if current == head:
        return
    known = {script.revision for script in _scripts().walk_revisions()}
    if current is not None and current not in known:
        raise TuneloopError(
            f"the database {shown_url} is at schema revision {current}, which this tuneloop does "
            f"not know (a newer version upgraded it): upgrade tuneloop"
        )
    if engine.dialect.name == "sqlite" or not has_tables:
        upgrade(engine)
        return
    raise TuneloopError(
        f"the database {shown_url} is at schema revision {current or 'none (older tuneloop)'} and "
        f"this tuneloop needs {head}: stop its servers, then run "
        f"tuneloop db upgrade registry.database_url=..."
    )
