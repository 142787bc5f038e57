"""Opening the database: one engine per URL per process, its schema at the revision this tuneloop expects
(SQLite in the home by default)."""

from __future__ import annotations

import functools
import sqlite3
import time

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import SQLAlchemyError

from tuneloop.db.migrate import ensure_current
from tuneloop.errors import TuneloopError, first_line

SQLITE_BUSY_TIMEOUT_MS = 30_000


def _sqlite_pragmas(connection: DBAPIConnection, _record: object) -> None:
    cursor = connection.cursor()
    # The busy timeout makes a writer wait for another instead of failing with "database is locked"; it comes
    # first, because switching a new file to WAL needs the lock too (and another process may be migrating it).
    # WAL lets the server's log writer and a CLI command (promote, export) use the file at once.
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    # Switching to WAL needs the file to itself, and SQLite reports a conflict there at once instead of calling
    # the busy handler (four processes opening a new home together failed this way): retried, as waiting would.
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
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
