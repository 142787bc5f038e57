"""The one SQLAlchemy database behind the registry and the prediction log (SQLite by default)."""

from __future__ import annotations

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase

from tuneloop.errors import TuneloopError


class Base(DeclarativeBase):
    pass


def _sqlite_pragmas(connection, _record) -> None:
    cursor = connection.cursor()
    # WAL lets the server's log writer and a CLI command (promote, export) use the file at once; the busy
    # timeout makes a writer wait for the other instead of failing with "database is locked".
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def open_database(url: str) -> Engine:
    """An engine with every tuneloop table created; errors name the URL."""
    try:
        engine = create_engine(url)
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _sqlite_pragmas)
        # Import for the side effect of declaring the tables on Base before create_all.
        import tuneloop.assistant.store  # noqa: F401
        import tuneloop.feedback.log  # noqa: F401
        import tuneloop.registry.store  # noqa: F401

        Base.metadata.create_all(engine)
    except SQLAlchemyError as exc:
        raise TuneloopError(f"cannot open the database {url}: {str(exc).splitlines()[0]}") from exc
    return engine
