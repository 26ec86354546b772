"""message_parts: the later Discord messages of a reply split over several

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "message_parts",
        sa.Column("discord_message_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("message_id", Id, nullable=False),
        sa.ForeignKeyConstraint(
            ["message_id"], ["messages.id"], name=op.f("fk_message_parts_message_id_messages"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("discord_message_id", name=op.f("pk_message_parts")),
    )
    op.create_index(op.f("ix_message_parts_message_id"), "message_parts", ["message_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_message_parts_message_id"), table_name="message_parts")
    op.drop_table("message_parts")
