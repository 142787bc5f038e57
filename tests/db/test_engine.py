"""How a process opens the database: what its errors may say."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy.exc import SQLAlchemyError

from db.test_migrations import opened
from tuneloop.db.schema import PredictionRecord


def test_database_errors_never_carry_the_texts_they_were_writing(tmp_path):
    """Regression: an SQL error's message listed its parameters, users' texts among them, into the log."""
    engine = opened(f"sqlite:///{tmp_path / 'r.db'}")
    row = {
        "id": "p1",
        "created_at": datetime.now(UTC),
        "model_name": "m",
        "model_version": 1,
        "text": "my card 4111 1111 1111 1111 was stolen",
        "label": "x",
        "scores": {},
        "source": "api",
    }
    with engine.begin() as connection:
        connection.execute(PredictionRecord.__table__.insert(), row)
    with pytest.raises(SQLAlchemyError) as caught, engine.begin() as connection:
        connection.execute(PredictionRecord.__table__.insert(), row)
    assert "4111" not in str(caught.value)
