"""Alembic's environment: the connection comes from tuneloop (never from an alembic.ini), the target is the
one schema module."""

from __future__ import annotations

from alembic import context

from tuneloop.db.schema import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
