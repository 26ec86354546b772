"""initial: conversations, their extra personas, messages

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "conversations",
        sa.Column("id", Id, nullable=False),
        sa.Column("key", sa.String(length=96), nullable=False),
        sa.Column("guild_id", sa.BigInteger(), nullable=True),
        sa.Column("channel_id", sa.BigInteger(), nullable=False),
        sa.Column("thread_id", sa.BigInteger(), nullable=True),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("reset_after_id", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("reset_at", Timestamp, nullable=True),
        sa.Column("default_persona", sa.String(length=64), nullable=True),
        sa.Column("autorespond", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conversations")),
        sa.UniqueConstraint("key", name=op.f("uq_conversations_key")),
    )
    op.create_table(
        "conversation_personas",
        sa.Column("conversation_id", Id, nullable=False),
        sa.Column("persona_id", sa.String(length=64), nullable=False),
        sa.Column("added_at", Timestamp, nullable=False),
        sa.ForeignKeyConstraint(
            ["conversation_id"], ["conversations.id"],
            name=op.f("fk_conversation_personas_conversation_id_conversations"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("conversation_id", "persona_id", name=op.f("pk_conversation_personas")),
    )
    op.create_table(
        "messages",
        sa.Column("id", Id, nullable=False),
        sa.Column("conversation_id", Id, nullable=False),
        sa.Column("discord_message_id", sa.BigInteger(), nullable=True),
        sa.Column("author_id", sa.BigInteger(), nullable=True),
        sa.Column("author_name", sa.String(), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("persona_id", sa.String(length=64), nullable=True),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("reply_to_id", sa.BigInteger(), nullable=True),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("edited_at", Timestamp, nullable=True),
        sa.Column("deleted_at", Timestamp, nullable=True),
        sa.CheckConstraint("role IN ('user', 'assistant', 'system')", name=op.f("ck_messages_role")),
        sa.ForeignKeyConstraint(
            ["conversation_id"], ["conversations.id"],
            name=op.f("fk_messages_conversation_id_conversations"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_messages")),
        sa.UniqueConstraint("discord_message_id", name=op.f("uq_messages_discord_message_id")),
    )
    op.create_index("ix_messages_window", "messages", ["conversation_id", "id"])
    op.create_index(op.f("ix_messages_author_id"), "messages", ["author_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_messages_author_id"), table_name="messages")
    op.drop_index("ix_messages_window", table_name="messages")
    op.drop_table("messages")
    op.drop_table("conversation_personas")
    op.drop_table("conversations")
