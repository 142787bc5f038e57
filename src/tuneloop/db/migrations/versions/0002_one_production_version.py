"""At most one production version per model name, held by the database (a partial unique index), not by a
read before a write: two concurrent promotions could leave two production rows.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

PRODUCTION = sa.text("stage = 'production'")


def upgrade() -> None:
    # A home that already has two production rows for a name keeps the one promoted last.
    versions = sa.table(
        "model_versions",
        sa.column("id", sa.Integer),
        sa.column("name", sa.String),
        sa.column("stage", sa.String),
        sa.column("promoted_at", sa.DateTime),
    )
    connection = op.get_bind()
    rows = connection.execute(
        sa.select(versions.c.id, versions.c.name)
        .where(versions.c.stage == "production")
        .order_by(versions.c.name, versions.c.promoted_at.desc().nulls_last(), versions.c.id.desc())
    ).all()
    seen: set[str] = set()
    for row_id, name in rows:
        if name in seen:
            connection.execute(sa.update(versions).where(versions.c.id == row_id).values(stage="archived"))
        seen.add(name)
    op.create_index(
        "uq_model_versions_one_production",
        "model_versions",
        ["name"],
        unique=True,
        sqlite_where=PRODUCTION,
        postgresql_where=PRODUCTION,
    )


def downgrade() -> None:
    op.drop_index("uq_model_versions_one_production", table_name="model_versions")
