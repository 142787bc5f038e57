"""Chat sessions belong to the key that opened them: each turn records its sender, and only that sender may
continue the session. Turns stored before this revision belong to 'anonymous'.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("chat_turns") as table:
        table.add_column(sa.Column("sender", sa.String(length=80), nullable=False, server_default="anonymous"))


def downgrade() -> None:
    with op.batch_alter_table("chat_turns") as table:
        table.drop_column("sender")
