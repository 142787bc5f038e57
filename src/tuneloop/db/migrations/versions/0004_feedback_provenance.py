"""Feedback provenance and review: who sent each piece of feedback, whether that sender was trusted, and an
admin's verdict, so that only trusted or approved feedback trains a model.

Feedback stored before this revision has no known sender: it becomes 'anonymous', untrusted and pending, so it
waits for review (tuneloop feedback review) instead of training unseen.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("feedback") as table:
        table.add_column(sa.Column("sender", sa.String(length=80), nullable=False, server_default="anonymous"))
        table.add_column(sa.Column("trusted", sa.Boolean(), nullable=False, server_default=sa.false()))
        table.add_column(sa.Column("review", sa.String(length=10), nullable=False, server_default="pending"))
        table.add_column(sa.Column("reviewed_by", sa.String(length=80), nullable=True))
        table.add_column(sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_feedback_sender_created_at", "feedback", ["sender", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_feedback_sender_created_at", table_name="feedback")
    with op.batch_alter_table("feedback") as table:
        for column in ("reviewed_at", "reviewed_by", "review", "trusted", "sender"):
            table.drop_column(column)
