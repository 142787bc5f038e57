"""Opening the database: one engine per URL per process, its schema at the revision this tuneloop expects
(SQLite in the home by default)."""

from __future__ import annotations

import functools

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import SQLAlchemyError

from tuneloop.db.migrate import ensure_current
from tuneloop.errors import TuneloopError, first_line


def _sqlite_pragmas(connection: DBAPIConnection, _record: object) -> None:
    cursor = connection.cursor()
    # WAL lets the server's log writer and a CLI command (promote, export) use the file at once; the busy
    # timeout makes a writer wait for the other instead of failing with "database is locked".
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@functools.cache
def open_database(url: str) -> Engine:
    """The process's engine for `url`, its schema brought up to date (see `migrate`); errors name the URL.

    Cached: the registry, the prediction log and the conversation store of one process share a connection
    pool instead of each opening its own (and checking the schema again).
    """
    try:
        # hide_parameters: an error's message (which reaches logs and answers) never carries users' texts.
        engine = create_engine(url, hide_parameters=True)
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _sqlite_pragmas)
        ensure_current(engine, redacted(url))
    except SQLAlchemyError as exc:
        raise TuneloopError(f"cannot open the database {redacted(url)}: {first_line(exc)}") from exc
    return engine


def redacted(url: str) -> str:
    """The URL with its password masked, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except SQLAlchemyError:
        return "(an unreadable database URL)"
