"""Custom instructions per user, completion tokens per answer (usage), and untitled chats stored as "".

Revision ID: 0002
Revises: 0001
Create Date: 2025-02-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("instructions", sa.Text, nullable=True))
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("tokens", sa.Integer, nullable=True))
    # "New chat" was stored in English for everyone; an empty title is shown in the reader's language instead.
    op.execute("UPDATE conversations SET title = '' WHERE title = 'New chat'")


def downgrade() -> None:
    op.execute("UPDATE conversations SET title = 'New chat' WHERE title = ''")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("tokens")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("instructions")
