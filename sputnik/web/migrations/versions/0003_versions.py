"""Answer versions: messages form a tree (parent_id), a conversation shows one branch (current_id), a message
remembers which of its replies was shown last (chosen_id), and an answer keeps why it ended (finish_reason, so that
one cut off at max_tokens can be continued).

Existing chats are one straight line: each message's parent is the one before it, and the last is on show.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("parent_id", sa.Integer, nullable=True))
        batch.add_column(sa.Column("finish_reason", sa.String(16), nullable=True))
        batch.add_column(sa.Column("chosen_id", sa.Integer, nullable=True))
        batch.create_foreign_key("fk_messages_parent_id_messages", "messages", ["parent_id"], ["id"],
                                 ondelete="CASCADE")
        batch.create_index("ix_messages_parent_id", ["parent_id"])
    with op.batch_alter_table("conversations") as batch:
        batch.add_column(sa.Column("current_id", sa.Integer, nullable=True))
    op.execute("UPDATE messages SET parent_id = (SELECT p.id FROM messages AS p"
               " WHERE p.conversation_id = messages.conversation_id AND p.position < messages.position"
               " ORDER BY p.position DESC LIMIT 1)")
    op.execute("UPDATE conversations SET current_id = (SELECT m.id FROM messages AS m"
               " WHERE m.conversation_id = conversations.id ORDER BY m.position DESC LIMIT 1)")


def downgrade() -> None:
    with op.batch_alter_table("conversations") as batch:
        batch.drop_column("current_id")
    with op.batch_alter_table("messages") as batch:
        batch.drop_index("ix_messages_parent_id")
        batch.drop_constraint("fk_messages_parent_id_messages", type_="foreignkey")
        batch.drop_column("chosen_id")
        batch.drop_column("finish_reason")
        batch.drop_column("parent_id")
