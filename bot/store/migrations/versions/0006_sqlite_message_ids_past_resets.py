"""messages: on SQLite, the id sequence above every conversation's reset point

0004's table copy seeds the AUTOINCREMENT sequence from max(messages.id) alone. Where `/forget-me` had
erased the newest rows after a `/reset`, that is below the reset point, and the turns stored since got ids the
context leaves out, until the ids passed it. This raises the sequence to the highest reset point where it is
lower and changes nothing otherwise.
The turns already stored at or below a reset point stay out of the context: their ids alone do not tell them
from the turns the reset was for. PostgreSQL's sequences never went back, so there this changes nothing.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op
from sqlalchemy import text

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    floor = ("max(coalesce((SELECT max(id) FROM messages), 0), "
             "coalesce((SELECT max(reset_after_id) FROM conversations), 0))")
    op.execute(text(f"UPDATE sqlite_sequence SET seq = max(seq, {floor}) WHERE name = 'messages'"))
    op.execute(text(f"INSERT INTO sqlite_sequence (name, seq) SELECT 'messages', {floor} "
                    "WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'messages')"))


def downgrade() -> None:
    """Nothing to undo: a sequence that only went up hands out no id twice."""
