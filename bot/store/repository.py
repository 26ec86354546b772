"""ConversationStore: the only code that reads or writes conversation history and channel settings.

Every method is one short transaction. Appends are idempotent on the Discord message id (an INSERT ..
ON CONFLICT DO NOTHING), so a re-delivered gateway event or a retried write never duplicates a turn.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Row, Select, delete, func, select, text, union_all, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from bot.lru import LRU
from bot.store.db import Sessions, make_engine, unavailable_on_open
from bot.store.keys import ConversationKey
from bot.store.models import ROLES, Conversation, ConversationPersona, Message, MessagePart, utcnow
from bot.text_safety import storable


@dataclass(frozen=True)
class StoredMessage:
    """A stored turn, detached from the database session."""

    id: int
    conversation_key: str
    discord_message_id: int | None
    author_id: int | None
    author_name: str
    role: str
    persona_id: str | None
    content: str
    reply_to_id: int | None
    created_at: datetime
    edited_at: datetime | None
    deleted_at: datetime | None

SETTINGS_CACHE_SIZE = 10_000  # conversations whose settings one store keeps in memory


@dataclass(frozen=True)
class ChannelSettings:
    """What a channel (or thread, or DM) has chosen; None/empty means "use the bot's defaults"."""

    default_persona: str | None = None
    personas: list[str] = field(default_factory=list)
    autorespond: bool = False
    inherited: bool = False  # a thread showing its parent channel's settings


def _stored(message: Message | Row[Any], key: str) -> StoredMessage:
    return StoredMessage(
        id=message.id,
        conversation_key=key,
        discord_message_id=message.discord_message_id,
        author_id=message.author_id,
        author_name=message.author_name,
        role=message.role,
        persona_id=message.persona_id,
        content=message.content,
        reply_to_id=message.reply_to_id,
        created_at=message.created_at,
        edited_at=message.edited_at,
        deleted_at=message.deleted_at,
    )


def _live_turns(key: ConversationKey) -> Select[Any]:
    """Undeleted turns of one conversation since its reset point, newest first, as plain rows: one
    round trip and no ORM objects to build.

    The conversation's id and reset point are scalar subqueries, which both databases evaluate once
    and then use as constants of a backward range scan of the window index. (A join instead lets
    PostgreSQL walk the newest messages of every conversation until it reaches this one's.)
    """
    conversation = Conversation.key == key.as_str()
    return (
        select(*Message.__table__.columns)
        .where(
            Message.conversation_id == select(Conversation.id).where(conversation).scalar_subquery(),
            Message.id > select(Conversation.reset_after_id).where(conversation).scalar_subquery(),
            Message.deleted_at.is_(None),
        )
        .order_by(Message.id.desc())
    )


def _by_discord_id(discord_message_id: int) -> ColumnElement[bool]:
    """The turn a Discord message belongs to: its first message, or a later part of a split reply.

    A UNION of two index lookups: written as `discord_message_id = X OR id IN (...)`, PostgreSQL
    scans the whole messages table (20 ms at 200k rows) on every Discord delete event.
    """
    first = select(Message.id).where(Message.discord_message_id == discord_message_id)
    part = select(MessagePart.message_id).where(MessagePart.discord_message_id == discord_message_id)
    return Message.id.in_(union_all(first, part))


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


@contextlib.contextmanager
def _alembic_quiet() -> Iterator[None]:
    """Alembic logs a dozen INFO lines on a bot's start (its plugins, its DDL mode, each step), where the
    store's own line ("database schema upgraded ...") says what happened; its warnings still show."""
    alembic_log = logging.getLogger("alembic")
    level = alembic_log.level
    alembic_log.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        alembic_log.setLevel(level)


class ConversationStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sessions = Sessions(engine)
        self._insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        # Channel settings as get_settings last read them, most recently used last. Every message reads
        # them (2 queries, 4 in a thread) and only the settings commands change them, through this object:
        # shard processes split guilds, so no other process writes this one's channels. A write bumps
        # the generation, so a read that overlapped it is not cached.
        self._settings_cache: LRU[ConversationKey, ChannelSettings] = LRU(SETTINGS_CACHE_SIZE)
        self._settings_generation = 0

    @classmethod
    async def open(cls, database_url: str, *, migrate: bool = False) -> ConversationStore:
        """A store on `database_url`; with migrate=True, upgrade the schema to head first. A database that
        cannot be opened or upgraded raises StoreUnavailable."""
        with unavailable_on_open(database_url):
            if migrate:
                with _alembic_quiet():  # importing Alembic logs too
                    from bot.store.migrate import upgrade_async

                    await upgrade_async(database_url)
            return cls(make_engine(database_url))

    async def close(self) -> None:
        """Dispose of the engine (and its pooled connections) this store was given."""
        await self.engine.dispose()

    async def ping(self) -> bool:
        """True when the database answers a trivial query (for /readyz)."""
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            return True
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            return False

    # -- conversations ---------------------------------------------------------------------------

    async def _conversation(self, session: AsyncSession, key: ConversationKey) -> Conversation | None:
        return await session.scalar(select(Conversation).where(Conversation.key == key.as_str()))

    async def _conversation_id(self, session: AsyncSession, key: ConversationKey) -> int:
        """The conversation's id, creating its row on first use (safe when many tasks race)."""
        found = await session.scalar(select(Conversation.id).where(Conversation.key == key.as_str()))
        if found is not None:
            return found
        created = await session.scalar(
            self._insert(Conversation)
            .values(key=key.as_str(), guild_id=key.guild_id, channel_id=key.channel_id, thread_id=key.thread_id)
            .on_conflict_do_nothing(index_elements=["key"])
            .returning(Conversation.id)
        )
        if created is not None:
            return created
        return (await session.scalars(select(Conversation.id).where(Conversation.key == key.as_str()))).one()

    # -- messages ----------------------------------------------------------------------------------

    async def append(
        self,
        key: ConversationKey,
        *,
        discord_message_id: int | None,
        author_id: int | None,
        author_name: str,
        role: str,
        content: str,
        persona_id: str | None = None,
        reply_to_id: int | None = None,
        created_at: datetime | None = None,
        part_ids: Sequence[int] = (),
    ) -> bool:
        """Store one turn; False (and nothing changed) when that Discord message is already stored.

        `part_ids` are the later Discord messages of a turn split over several (a long reply).
        """
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)} (got {role!r})")
        if created_at is not None and created_at.tzinfo is None:
            raise ValueError(f"created_at must be timezone-aware, e.g. datetime.now(UTC) (got naive {created_at!r})")
        async with self._sessions.begin() as session:
            conversation_id = await self._conversation_id(session, key)
            inserted = await session.scalar(
                self._insert(Message)
                .values(
                    conversation_id=conversation_id,
                    discord_message_id=discord_message_id,
                    author_id=author_id,
                    author_name=storable(author_name),
                    role=role,
                    persona_id=persona_id,
                    content=storable(content),
                    reply_to_id=reply_to_id,
                    created_at=created_at or utcnow(),
                )
                .on_conflict_do_nothing(index_elements=["discord_message_id"])
                .returning(Message.id)
            )
            if inserted is not None and part_ids:
                await session.execute(
                    self._insert(MessagePart)
                    .values([{"discord_message_id": part, "message_id": inserted} for part in part_ids])
                    .on_conflict_do_nothing(index_elements=["discord_message_id"])
                )
        return inserted is not None

    async def window(self, key: ConversationKey, limit: int) -> list[StoredMessage]:
        """The newest `limit` live turns since the last reset, oldest first (the model's context)."""
        if limit < 0:
            raise ValueError(f"window limit must be >= 0 (got {limit})")
        if limit == 0:
            return []
        async with self._sessions() as session:
            rows = (await session.execute(_live_turns(key).limit(limit))).all()
        return [_stored(row, key.as_str()) for row in reversed(rows)]

    async def last_assistant_turn(self, key: ConversationKey) -> StoredMessage | None:
        """The newest live assistant turn since the last reset (what /regenerate replaces)."""
        async with self._sessions() as session:
            row = (await session.execute(_live_turns(key).where(Message.role == "assistant").limit(1))).first()
        return None if row is None else _stored(row, key.as_str())

    async def has_history(self, key: ConversationKey) -> bool:
        """Whether anything was ever stored in the conversation, resets and deletions notwithstanding:
        the bot took part there (it stores a channel's messages only once it has been addressed)."""
        async with self._sessions() as session:
            stored = (
                select(Message.id)
                .join(Conversation, Conversation.id == Message.conversation_id)
                .where(Conversation.key == key.as_str())
                .limit(1)
            )
            return await session.scalar(select(stored.exists())) or False

    async def find_message(self, discord_message_id: int) -> StoredMessage | None:
        """A stored turn by the Discord id of any of its messages, deleted ones included (check `deleted_at`)."""
        async with self._sessions() as session:
            row = (
                await session.execute(
                    select(Message, Conversation.key)
                    .join(Conversation, Conversation.id == Message.conversation_id)
                    .where(_by_discord_id(discord_message_id))
                )
            ).first()
            return None if row is None else _stored(row[0], row[1])

    async def discord_ids(self, message: StoredMessage) -> list[int]:
        """Every Discord message of a stored turn, in the order they were sent."""
        async with self._sessions() as session:
            parts = await session.scalars(
                select(MessagePart.discord_message_id)
                .where(MessagePart.message_id == message.id)
                .order_by(MessagePart.discord_message_id)  # snowflakes grow with time
            )
            first = [] if message.discord_message_id is None else [message.discord_message_id]
            return first + list(parts)

    async def edit_message(self, discord_message_id: int, content: str) -> bool:
        """Mirror a Discord edit; False when the message is unknown or deleted."""
        async with self._sessions.begin() as session:
            result = await session.execute(
                update(Message)
                .where(_by_discord_id(discord_message_id), Message.deleted_at.is_(None))
                .values(content=storable(content), edited_at=utcnow())
            )
        return result.rowcount > 0

    async def delete_message(self, discord_message_id: int) -> bool:
        """Mirror a Discord deletion: the text is erased, the row stays as a marker. Deleting any
        part of a split reply erases the whole turn: the model should not quote what nobody sees.

        Keeping the row means a late re-delivery of the original create event is still a no-op
        instead of bringing the deleted text back.
        """
        async with self._sessions.begin() as session:
            result = await session.execute(
                update(Message)
                .where(_by_discord_id(discord_message_id), Message.deleted_at.is_(None))
                .values(content="", deleted_at=utcnow())
            )
        return result.rowcount > 0

    async def reset(self, key: ConversationKey) -> None:
        """Start a fresh context: later windows only see turns appended after this call."""
        async with self._sessions.begin() as session:
            conversation_id = await self._conversation_id(session, key)
            newest = await session.scalar(
                select(func.coalesce(func.max(Message.id), 0)).where(Message.conversation_id == conversation_id)
            )
            await session.execute(
                update(Conversation)
                .where(Conversation.id == conversation_id)
                .values(reset_after_id=newest, reset_at=utcnow())
            )

    async def forget_user(self, author_id: int) -> int:
        """Erase every message of one user in every conversation; returns how many were removed.

        Replies that pointed at their messages lose that pointer too, so no trace of their
        message ids stays behind.
        """
        theirs = select(Message.discord_message_id).where(
            Message.author_id == author_id, Message.discord_message_id.is_not(None)
        )
        async with self._sessions.begin() as session:
            await session.execute(
                update(Message).where(Message.reply_to_id.in_(theirs)).values(reply_to_id=None)
            )
            result = await session.execute(delete(Message).where(Message.author_id == author_id))
        return result.rowcount

    async def count_messages(self) -> int:
        async with self._sessions() as session:
            return int(await session.scalar(select(func.count()).select_from(Message)) or 0)

    async def export(self, key: ConversationKey) -> dict[str, Any] | None:
        """The whole record of a conversation as JSON-ready data, history before resets included; None when
        nothing is stored under `key` (a mistyped key must not pass for an empty conversation)."""
        async with self._sessions() as session:
            conversation = await self._conversation(session, key)
            if conversation is None:
                return None
            messages = (
                await session.scalars(
                    select(Message).where(Message.conversation_id == conversation.id).order_by(Message.id)
                )
            ).all()
            settings = await self._applying_settings(session, key, conversation)
        return {
            "conversation": key.as_str(),
            "guild_id": key.guild_id,
            "channel_id": key.channel_id,
            "thread_id": key.thread_id,
            "reset_at": _iso(conversation.reset_at),
            "settings": asdict(settings),
            "messages": [
                {
                    "discord_message_id": m.discord_message_id,
                    "author_id": m.author_id,
                    "author_name": m.author_name,
                    "role": m.role,
                    "persona_id": m.persona_id,
                    "content": m.content,
                    "reply_to_id": m.reply_to_id,
                    "created_at": _iso(m.created_at),
                    "edited_at": _iso(m.edited_at),
                    "deleted_at": _iso(m.deleted_at),
                    "in_context": m.id > conversation.reset_after_id and m.deleted_at is None,
                }
                for m in messages
            ],
        }

    # -- channel settings --------------------------------------------------------------------------

    async def _settings(self, session: AsyncSession, conversation: Conversation | None) -> ChannelSettings:
        if conversation is None:
            return ChannelSettings()
        personas = await session.scalars(
            select(ConversationPersona.persona_id)
            .where(ConversationPersona.conversation_id == conversation.id)
            .order_by(ConversationPersona.added_at, ConversationPersona.persona_id)
        )
        return ChannelSettings(
            default_persona=conversation.default_persona,
            personas=list(personas),
            autorespond=conversation.autorespond,
        )

    async def get_settings(self, key: ConversationKey) -> ChannelSettings:
        cached = self._settings_cache.get(key)
        if cached is not None:
            return cached
        generation = self._settings_generation
        async with self._sessions() as session:
            settings = await self._applying_settings(session, key, await self._conversation(session, key))
        if generation == self._settings_generation:
            self._settings_cache[key] = settings
        return settings

    def _settings_changed(self, key: ConversationKey) -> None:
        """Forget the cached settings of `key` and of the threads that may follow it."""
        self._settings_generation += 1
        for cached in [k for k in self._settings_cache if k == key or k.parent == key]:
            del self._settings_cache[cached]

    async def _applying_settings(
        self, session: AsyncSession, key: ConversationKey, conversation: Conversation | None
    ) -> ChannelSettings:
        """What applies here: a thread follows its parent channel until one of its own settings changes."""
        if key.parent is not None and (conversation is None or not conversation.own_settings):
            parent = await self._settings(session, await self._conversation(session, key.parent))
            return replace(parent, inherited=True)
        return await self._settings(session, conversation)

    async def _settings_row(self, session: AsyncSession, key: ConversationKey) -> int:
        """The conversation a settings command changes. A thread still following its parent first gets
        a copy of the parent's settings, so changing one of them does not silently drop the others.
        Only the command whose guarded UPDATE turns `own_settings` on copies: a second command racing
        it (its UPDATE waits for the first to commit, then matches nothing) must not copy the parent's
        values over the first one's change."""
        conversation_id = await self._conversation_id(session, key)
        if key.parent is None:
            return conversation_id
        own = await session.scalar(select(Conversation.own_settings).where(Conversation.id == conversation_id))
        if own:
            return conversation_id
        parent = await self._conversation(session, key.parent)
        values: dict[str, Any] = {"own_settings": True}
        if parent is not None:
            values |= {"default_persona": parent.default_persona, "autorespond": parent.autorespond}
        claimed = await session.execute(
            update(Conversation)
            .where(Conversation.id == conversation_id, Conversation.own_settings.is_(False))
            .values(**values)
        )
        if claimed.rowcount == 1 and parent is not None:
            personas = (
                await session.execute(
                    select(ConversationPersona.persona_id, ConversationPersona.added_at).where(
                        ConversationPersona.conversation_id == parent.id
                    )
                )
            ).all()
            if personas:
                await session.execute(
                    self._insert(ConversationPersona)
                    .values([
                        {"conversation_id": conversation_id, "persona_id": pid, "added_at": added}
                        for pid, added in personas
                    ])
                    .on_conflict_do_nothing()
                )
        return conversation_id

    @contextlib.asynccontextmanager
    async def _settings_write(self, key: ConversationKey) -> AsyncIterator[tuple[AsyncSession, int]]:
        """A transaction on the conversation whose settings change; the cached ones go however it ends."""
        try:
            async with self._sessions.begin() as session:
                yield session, await self._settings_row(session, key)
        finally:
            self._settings_changed(key)

    async def _update_conversation(self, key: ConversationKey, **values: Any) -> None:
        async with self._settings_write(key) as (session, conversation_id):
            await session.execute(update(Conversation).where(Conversation.id == conversation_id).values(**values))

    async def set_default_persona(self, key: ConversationKey, persona_id: str | None) -> None:
        """Choose the persona that answers here; None goes back to the bot's default."""
        await self._update_conversation(key, default_persona=persona_id)

    async def set_autorespond(self, key: ConversationKey, on: bool) -> None:
        """With autorespond on, the channel's personas answer every message, not only mentions."""
        await self._update_conversation(key, autorespond=on)

    async def add_persona(self, key: ConversationKey, persona_id: str) -> None:
        """Make one more persona active here (a no-op when it already is)."""
        async with self._settings_write(key) as (session, conversation_id):
            await session.execute(
                self._insert(ConversationPersona)
                .values(conversation_id=conversation_id, persona_id=persona_id)
                .on_conflict_do_nothing()
            )

    async def remove_persona(self, key: ConversationKey, persona_id: str) -> None:
        async with self._settings_write(key) as (session, conversation_id):
            await session.execute(
                delete(ConversationPersona).where(
                    ConversationPersona.conversation_id == conversation_id,
                    ConversationPersona.persona_id == persona_id,
                )
            )
