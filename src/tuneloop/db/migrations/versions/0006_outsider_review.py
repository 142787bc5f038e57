"""The second security review's schema changes:

- chat sessions opened before sessions had owners had ids their clients chose (guessable), and revision 0005 gave
  them to 'anonymous', so any caller without a key could continue them and read their turns back through the
  reply: they now belong to 'pre-upgrade', which no caller is. A keyless chat in progress at the upgrade starts a
  new session (the chat page does so by itself);
- trust is decided when feedback is exported, not when it was sent: `trusted_senders` holds the senders the
  latest server start trusts, seeded here with every sender of trusted feedback so that nothing changes until a
  server starts with its keys;
- predictions record who asked (`requester`), so the labelling suggestions can take turns between requesters;
- predictions and chat turns keep a keyed digest of the text as it came (`text_digest`, `message_digest`), so
  erasure finds one user's rows, not every row whose masked text is the same.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("predictions") as table:
        table.add_column(sa.Column("requester", sa.String(length=80), nullable=False, server_default="unknown"))
        table.add_column(sa.Column("text_digest", sa.String(length=64), nullable=True))
    op.create_index("ix_predictions_text_digest", "predictions", ["text_digest"])
    with op.batch_alter_table("chat_turns") as table:
        table.add_column(sa.Column("message_digest", sa.String(length=64), nullable=True))
    op.create_index("ix_chat_turns_message_digest", "chat_turns", ["message_digest"])
    op.execute("UPDATE chat_turns SET sender = 'pre-upgrade' WHERE sender = 'anonymous'")
    op.create_table(
        "trusted_senders",
        sa.Column("sender", sa.String(length=80), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sender"),
    )
    op.execute(
        "INSERT INTO trusted_senders (sender, since) "
        "SELECT sender, MIN(created_at) FROM feedback WHERE trusted GROUP BY sender"
    )


def downgrade() -> None:
    op.drop_table("trusted_senders")
    op.execute("UPDATE chat_turns SET sender = 'anonymous' WHERE sender = 'pre-upgrade'")
    op.drop_index("ix_chat_turns_message_digest", table_name="chat_turns")
    with op.batch_alter_table("chat_turns") as table:
        table.drop_column("message_digest")
    op.drop_index("ix_predictions_text_digest", table_name="predictions")
    with op.batch_alter_table("predictions") as table:
        table.drop_column("text_digest")
        table.drop_column("requester")
