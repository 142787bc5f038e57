"""Alembic migrations of tuneloop's database, shipped in the package and run by `tuneloop.db.engine`."""
