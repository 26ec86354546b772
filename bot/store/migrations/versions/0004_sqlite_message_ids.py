"""messages: on SQLite, ids that are never handed out twice (AUTOINCREMENT)

Without it SQLite gives a new row the id of a deleted newest row: after `/reset` and `/forget-me`
a new message could get an id at or below the reset point and silently drop out of the context.
PostgreSQL's sequences never reuse ids, so there this revision changes nothing.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _recreate_messages(autoincrement: bool) -> None:
    """SQLite cannot alter a table's id column: copy the table (env.py keeps foreign keys off meanwhile)."""
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table("messages", recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}):
        pass


def upgrade() -> None:
    _recreate_messages(True)


def downgrade() -> None:
    _recreate_messages(False)
