"""SQLAlchemy 2 tables of the store. Alembic migrations in bot/store/migrations/ must match these exactly.

Message order is the surrogate `id` (insertion order), so the context window is one backwards range
scan of the (conversation_id, id) index: the cost depends on the window, not on how many messages
the conversation has ever stored. A reset only moves `reset_after_id`; nothing is destroyed.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ROLES = ("user", "assistant", "system")

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
IdType = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both databases (SQLite stores naive text, so we add UTC back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware datetime (e.g. datetime.now(UTC))")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map: dict[Any, Any] = {datetime: UTCDateTime}


class Conversation(Base):
    """One Discord scope (channel, thread or DM) with its reset point and its settings."""

    __tablename__ = "conversations"

    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    key: Mapped[str] = mapped_column(String(96), unique=True)
    guild_id: Mapped[int | None] = mapped_column(BigInteger)
    channel_id: Mapped[int] = mapped_column(BigInteger)
    thread_id: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Messages with id <= reset_after_id are history, not context.
    reset_after_id: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    reset_at: Mapped[datetime | None]
    default_persona: Mapped[str | None] = mapped_column(String(64))
    autorespond: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # A thread follows its parent channel's settings until a command changes one of its own.
    own_settings: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class ConversationPersona(Base):
    """An extra persona active in a conversation besides the default (role-play with several)."""

    __tablename__ = "conversation_personas"

    conversation_id: Mapped[int] = mapped_column(
        IdType, ForeignKey("conversations.id", ondelete="CASCADE"), primary_key=True
    )
    persona_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    added_at: Mapped[datetime] = mapped_column(default=utcnow)


class Message(Base):
    """One turn. Deleted turns keep their row (emptied) so a re-delivered Discord event stays a no-op."""

    __tablename__ = "messages"
    __table_args__ = (
        CheckConstraint("role IN ('user', 'assistant', 'system')", name="role"),
        Index("ix_messages_window", "conversation_id", "id"),
        # Ids only grow (SQLite would otherwise reuse the id of a deleted newest row), so a conversation's
        # reset point, "every id above N", never takes a new message for an old one.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(IdType, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(IdType, ForeignKey("conversations.id", ondelete="CASCADE"))
    discord_message_id: Mapped[int | None] = mapped_column(BigInteger, unique=True)
    author_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    author_name: Mapped[str] = mapped_column(String)
    role: Mapped[str] = mapped_column(String(16))
    persona_id: Mapped[str | None] = mapped_column(String(64))
    content: Mapped[str] = mapped_column(Text)
    reply_to_id: Mapped[int | None] = mapped_column(BigInteger, index=True)  # /forget-me clears replies to a user
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    edited_at: Mapped[datetime | None]
    deleted_at: Mapped[datetime | None]


class MessagePart(Base):
    """A later Discord message of a reply split over several (the first is the turn's own
    `discord_message_id`), so a reply to, or deletion of, any part finds the whole turn."""

    __tablename__ = "message_parts"

    discord_message_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    message_id: Mapped[int] = mapped_column(IdType, ForeignKey("messages.id", ondelete="CASCADE"), index=True)
