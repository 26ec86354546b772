"""conversations.own_settings: a thread follows its parent channel's settings until it has its own

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Threads that already changed a setting keep it: any non-default value counts as their own.
    op.add_column("conversations", sa.Column("own_settings", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.execute(
        "UPDATE conversations SET own_settings = TRUE WHERE thread_id IS NOT NULL AND ("
        "default_persona IS NOT NULL OR autorespond OR "
        "id IN (SELECT conversation_id FROM conversation_personas))"
    )


def downgrade() -> None:
    with op.batch_alter_table("conversations") as batch:
        batch.drop_column("own_settings")
