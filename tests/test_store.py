"""ConversationStore against a SQLite file and a real PostgreSQL server (same tests, both backends)."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import delete, event, select

from bot.cli import main
from bot.store.db import StoreUnavailable, make_engine
from bot.store.keys import ConversationKey
from bot.store.migrate import upgrade, upgrade_async
from bot.store.models import Base
from bot.store.repository import ChannelSettings, ConversationStore
from tests.services import create_database, free_port

GUILD = ConversationKey(guild_id=1, channel_id=2)
THREAD = ConversationKey(guild_id=1, channel_id=2, thread_id=3)
DM = ConversationKey(guild_id=None, channel_id=9)


def new_database_url(request: pytest.FixtureRequest, tmp_path: Path, backend: str) -> str:
    """An empty database: a fresh SQLite file, or a fresh database on the session's PostgreSQL server."""
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'nested' / 'hermes.db'}"
    return asyncio.run(create_database(request.getfixturevalue("postgres_url")))


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """One migrated database per backend for this module; `store` empties it before each test."""
    url = new_database_url(request, tmp_path_factory.mktemp("store"), request.param)
    upgrade(url)
    return url


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[ConversationStore]:
    store = ConversationStore(make_engine(database_url))
    async with store.engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            await connection.execute(delete(table))
    yield store
    await store.close()


async def add(store: ConversationStore, key: ConversationKey, mid: int | None, content: str, **kw: object) -> bool:
    fields: dict[str, object] = {"author_id": 100, "author_name": "alice", "role": "user"} | kw
    return await store.append(key, discord_message_id=mid, content=content, **fields)  # type: ignore[arg-type]


async def all_rows(store: ConversationStore) -> list[tuple[object, ...]]:
    async with store.engine.connect() as connection:
        return [
            tuple(row)
            for table in Base.metadata.sorted_tables
            for row in (await connection.execute(select(table))).all()
        ]


# -- keys --------------------------------------------------------------------------------------------


def test_keys_round_trip() -> None:
    assert GUILD.as_str() == "g1/c2"
    assert THREAD.as_str() == "g1/c2/t3"
    assert DM.as_str() == "dm/c9"
    for key in (GUILD, THREAD, DM):
        assert ConversationKey.from_str(key.as_str()) == key
    for bad in ("", "g1", "c2", "g1/c2/x3", "dm/c2/t", "g-1/c2", " g1/c2"):
        with pytest.raises(ValueError, match="not a conversation key"):
            ConversationKey.from_str(bad)


# -- append and window -------------------------------------------------------------------------------


async def test_append_is_idempotent_on_discord_id(store: ConversationStore) -> None:
    assert await add(store, GUILD, 10, "first") is True
    assert await add(store, GUILD, 10, "replayed event with other text") is False
    assert await add(store, THREAD, 10, "same id elsewhere") is False
    assert [m.content for m in await store.window(GUILD, 10)] == ["first"]
    assert await store.window(THREAD, 10) == []
    # Turns without a Discord id (terminal chat) are never deduplicated.
    assert await add(store, DM, None, "a") is True
    assert await add(store, DM, None, "a") is True
    assert await store.count_messages() == 3


async def test_a_nul_character_is_left_out_not_the_turn(store: ConversationStore) -> None:
    """PostgreSQL text holds no NUL: a reply whose model wrote one (byte fallback) failed to store there."""
    assert await add(store, GUILD, 10, "before\x00after", author_name="Nul\x00l") is True
    assert await store.edit_message(10, "edited\x00text") is True
    [turn] = await store.window(GUILD, 10)
    assert (turn.author_name, turn.content) == ("Null", "editedtext")


async def test_surrogates_from_json_are_joined_or_replaced_not_a_failed_turn(store: ConversationStore) -> None:
    """JSON may escape UTF-16 surrogates, which json.loads keeps: SQLite's driver raised UnicodeEncodeError
    (not StoreUnavailable) and PostgreSQL refused the row, which the user was told was a database outage."""
    assert await add(store, GUILD, 10, "half \ud83d an emoji", author_name="Ana\ud83d\ude00") is True
    assert await add(store, GUILD, 11, "whole \ud83d\ude00, reversed \ude00\ud83d") is True
    assert await store.edit_message(10, "edited \udfff") is True
    assert [(m.author_name, m.content) for m in await store.window(GUILD, 10)] == [
        ("Ana\U0001f600", "edited \ufffd"),
        ("alice", "whole \U0001f600, reversed \ufffd\ufffd"),
    ]


async def test_window_is_newest_turns_oldest_first(store: ConversationStore) -> None:
    for i in range(10):
        await add(store, GUILD, 1000 + i, f"m{i}")
    assert [m.content for m in await store.window(GUILD, 3)] == ["m7", "m8", "m9"]
    assert [m.content for m in await store.window(GUILD, 100)] == [f"m{i}" for i in range(10)]
    assert await store.window(GUILD, 0) == []
    assert await store.window(ConversationKey(guild_id=5, channel_id=6), 10) == []
    with pytest.raises(ValueError, match="limit"):
        await store.window(GUILD, -1)


async def test_channel_thread_and_dm_are_separate_conversations(store: ConversationStore) -> None:
    await add(store, GUILD, 1, "in channel")
    await add(store, THREAD, 2, "in thread")
    await add(store, DM, 3, "in dm")
    assert [m.content for m in await store.window(GUILD, 10)] == ["in channel"]
    assert [m.content for m in await store.window(THREAD, 10)] == ["in thread"]
    dm = await store.window(DM, 10)
    assert [(m.content, m.conversation_key) for m in dm] == [("in dm", "dm/c9")]


async def test_stored_fields_and_timestamps(store: ConversationStore) -> None:
    when = datetime(2024, 5, 1, 12, 0, tzinfo=UTC) + timedelta(microseconds=5)
    await store.append(
        GUILD, discord_message_id=7, author_id=None, author_name="Hermes 2", role="assistant",
        content="hi", persona_id="hermes", reply_to_id=6, created_at=when.astimezone(timezone(timedelta(hours=2))),  # normalised to UTC
    )
    [message] = await store.window(GUILD, 1)
    assert (message.discord_message_id, message.author_id, message.author_name, message.role) == (
        7, None, "Hermes 2", "assistant",
    )
    assert (message.persona_id, message.reply_to_id, message.edited_at, message.deleted_at) == ("hermes", 6, None, None)
    assert message.created_at == when and message.created_at.tzinfo == UTC
    assert await store.find_message(7) == message
    assert await store.find_message(8) is None
    with pytest.raises(ValueError, match="timezone-aware"):
        await add(store, GUILD, 8, "x", created_at=datetime(2024, 1, 1))
    with pytest.raises(ValueError, match="role must be one of"):
        await add(store, GUILD, 8, "x", role="moderator")
    assert await store.find_message(8) is None


async def test_snowflake_sized_ids(store: ConversationStore) -> None:
    big = 1_234_567_890_123_456_789  # Discord snowflakes need 64 bits
    key = ConversationKey(guild_id=big, channel_id=big + 1, thread_id=big + 2)
    assert await add(store, key, big + 3, "snowflakes", author_id=big + 4, reply_to_id=big + 5)
    [message] = await store.window(ConversationKey.from_str(key.as_str()), 5)
    assert (message.discord_message_id, message.author_id, message.reply_to_id) == (big + 3, big + 4, big + 5)


# -- reset, edit, delete -----------------------------------------------------------------------------


async def test_reset_starts_fresh_context_but_keeps_the_record(store: ConversationStore) -> None:
    await add(store, GUILD, 1, "old one")
    await add(store, GUILD, 2, "old two", role="assistant", author_id=None, persona_id="hermes")
    await add(store, THREAD, 3, "thread keeps its context")
    await store.reset(GUILD)
    assert await store.window(GUILD, 10) == []
    assert await store.last_assistant_turn(GUILD) is None
    await add(store, GUILD, 4, "new")
    assert [m.content for m in await store.window(GUILD, 10)] == ["new"]
    assert [m.content for m in await store.window(THREAD, 10)] == ["thread keeps its context"]
    exported = await store.export(GUILD)
    assert [(m["content"], m["in_context"]) for m in exported["messages"]] == [
        ("old one", False), ("old two", False), ("new", True),
    ]
    assert exported["reset_at"] is not None
    await store.reset(DM)  # resetting a conversation never seen is fine
    assert await store.window(DM, 10) == []


async def test_edit_and_delete_mirror_discord(store: ConversationStore) -> None:
    await add(store, GUILD, 1, "teh first")
    await add(store, GUILD, 2, "second")
    await add(store, GUILD, 3, "third")
    assert await store.edit_message(1, "the first") is True
    assert await store.edit_message(999, "unknown") is False
    assert await store.delete_message(2) is True
    assert await store.delete_message(2) is False
    assert await store.delete_message(999) is False
    window = await store.window(GUILD, 10)
    assert [m.content for m in window] == ["the first", "third"]
    assert window[0].edited_at is not None and window[1].edited_at is None
    deleted = await store.find_message(2)
    assert deleted is not None and deleted.deleted_at is not None and deleted.content == ""
    assert await store.edit_message(2, "edit after delete") is False
    assert await add(store, GUILD, 2, "second, re-delivered late") is False
    assert (await store.find_message(2)).content == ""  # type: ignore[union-attr]
    # Deleted turns do not count against the window limit.
    assert [m.content for m in await store.window(GUILD, 2)] == ["the first", "third"]


async def test_a_split_reply_is_found_and_deleted_through_any_of_its_messages(store: ConversationStore) -> None:
    await add(store, GUILD, 10, "question")
    long_reply = {"role": "assistant", "author_id": None, "persona_id": "edward_elric", "part_ids": [13, 12]}
    await add(store, GUILD, 11, "a reply long enough for three messages", **long_reply)
    await add(store, GUILD, 14, "another question")
    for part in (11, 12, 13):
        found = await store.find_message(part)
        assert found is not None and (found.discord_message_id, found.persona_id) == (11, "edward_elric")
    reply = await store.last_assistant_turn(GUILD)
    assert reply is not None and await store.discord_ids(reply) == [11, 12, 13]
    assert await add(store, GUILD, 11, "re-delivered", part_ids=[99]) is False  # nothing changes
    assert await store.find_message(99) is None
    assert await store.delete_message(13) is True  # a moderator deletes the last part
    assert [m.content for m in await store.window(GUILD, 10)] == ["question", "another question"]
    assert await store.delete_message(12) is False  # already erased as a whole


async def test_last_assistant_turn(store: ConversationStore) -> None:
    assert await store.last_assistant_turn(GUILD) is None
    await add(store, GUILD, 1, "question")
    await add(store, GUILD, 2, "answer one", role="assistant", author_id=None, persona_id="hermes")
    await add(store, GUILD, 3, "answer two", role="assistant", author_id=None, persona_id="edward_elric")
    await add(store, GUILD, 4, "thanks")
    last = await store.last_assistant_turn(GUILD)
    assert last is not None and (last.content, last.persona_id) == ("answer two", "edward_elric")
    await store.delete_message(3)
    assert (await store.last_assistant_turn(GUILD)).content == "answer one"  # type: ignore[union-attr]


# -- forget, export ----------------------------------------------------------------------------------


async def test_forget_user_finds_the_replies_to_clear_by_index(store: ConversationStore) -> None:
    """Anyone may run /forget-me: clearing the replies to a user's messages read every stored message
    (a table scan, holding SQLite's write lock) before reply_to_id had an index."""
    statements: list[tuple[str, object]] = []

    def record(conn: object, cursor: object, statement: str, parameters: object, *args: object) -> None:
        if statement.lstrip().upper().startswith("UPDATE MESSAGES SET REPLY_TO_ID"):
            statements.append((statement, parameters))

    event.listen(store.engine.sync_engine, "before_cursor_execute", record)
    try:
        await store.forget_user(10_000_001)
    finally:
        event.remove(store.engine.sync_engine, "before_cursor_execute", record)
    [(statement, parameters)] = statements
    async with store.engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            plan = " ".join(str(row) for row in await connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters))
        else:
            await connection.exec_driver_sql("SET enable_seqscan = off")  # a tiny table: make the index the choice if there is one
            plan = " ".join(str(row) for row in await connection.exec_driver_sql(f"EXPLAIN {statement}", parameters))
    assert "ix_messages_reply_to_id" in plan, plan


async def test_forget_user_leaves_nothing_of_theirs(store: ConversationStore) -> None:
    alice, bob = 10_000_001, 10_000_002
    a1, a2, b1, r1 = 5_000_001, 5_000_002, 5_000_003, 5_000_004  # distinctive so the table scan is exact
    await add(store, GUILD, a1, "alice secret one", author_id=alice)
    await add(store, GUILD, b1, "bob here", author_id=bob, author_name="bob")
    await add(store, GUILD, r1, "reply to her", role="assistant", author_id=None, author_name="Hermes 2",
              reply_to_id=a1)
    await add(store, THREAD, a2, "alice secret two", author_id=alice)
    await add(store, DM, None, "alice secret three", author_id=alice)
    await store.delete_message(a2)
    await store.set_default_persona(GUILD, "hermes")

    assert await store.forget_user(alice) == 3
    assert await store.forget_user(alice) == 0
    rows = await all_rows(store)
    assert len(rows) == 3 + 2  # three conversations, bob's turn and the reply
    for row in rows:
        assert not {alice, a1, a2} & set(row), row
        assert not any(isinstance(v, str) and "alice" in v for v in row), row
    assert [m.content for m in await store.window(GUILD, 10)] == ["bob here", "reply to her"]
    assert (await store.find_message(r1)).reply_to_id is None  # type: ignore[union-attr]
    assert (await store.find_message(b1)).author_id == bob  # type: ignore[union-attr]


async def test_export_is_json_with_everything(store: ConversationStore) -> None:
    await add(store, GUILD, 1, "hello <@&123> @everyone")
    await add(store, GUILD, 2, "hi", role="assistant", author_id=None, author_name="Hermes 2", persona_id="hermes",
              reply_to_id=1)
    await store.delete_message(1)
    await store.add_persona(GUILD, "edward_elric")
    await store.set_autorespond(GUILD, True)
    exported = json.loads(json.dumps(await store.export(GUILD)))
    assert exported["conversation"] == "g1/c2"
    assert (exported["guild_id"], exported["channel_id"], exported["thread_id"]) == (1, 2, None)
    assert exported["settings"] == {"default_persona": None, "personas": ["edward_elric"], "autorespond": True,
                                   "inherited": False}
    first, second = exported["messages"]
    assert first["deleted_at"] is not None and first["content"] == "" and first["in_context"] is False
    assert {k: second[k] for k in ("discord_message_id", "role", "persona_id", "reply_to_id", "content")} == {
        "discord_message_id": 2, "role": "assistant", "persona_id": "hermes", "reply_to_id": 1, "content": "hi",
    }
    assert datetime.fromisoformat(second["created_at"]).tzinfo is not None


async def test_export_of_a_key_with_nothing_stored_is_none(store: ConversationStore) -> None:
    """A mistyped key (a thread's id given as a channel, say) must not pass for an empty conversation; a
    conversation with settings and no messages is still a record."""
    await add(store, THREAD, 1, "in the thread")
    await store.set_autorespond(DM, True)
    assert await store.export(ConversationKey(guild_id=1, channel_id=3)) is None
    assert await store.export(GUILD) is None  # the thread's parent channel has stored nothing itself
    settings_only = await store.export(DM)
    assert settings_only is not None and settings_only["messages"] == [] and settings_only["guild_id"] is None
    assert settings_only["settings"]["autorespond"] is True


# -- channel settings --------------------------------------------------------------------------------


async def test_channel_settings(store: ConversationStore) -> None:
    assert await store.get_settings(GUILD) == ChannelSettings()
    await store.set_default_persona(GUILD, "edward_elric")
    await store.add_persona(GUILD, "hermes")
    await store.add_persona(GUILD, "alphonse")
    await store.add_persona(GUILD, "hermes")
    await store.set_autorespond(GUILD, True)
    settings = await store.get_settings(GUILD)
    assert settings.default_persona == "edward_elric" and settings.autorespond is True
    assert sorted(settings.personas) == ["alphonse", "hermes"]
    await store.remove_persona(GUILD, "hermes")
    await store.remove_persona(GUILD, "never added")
    await store.remove_persona(DM, "hermes")
    await store.set_autorespond(GUILD, False)
    await store.set_default_persona(GUILD, None)
    assert await store.get_settings(GUILD) == ChannelSettings(personas=["alphonse"])


async def test_a_thread_follows_its_channel_until_it_changes_a_setting(store: ConversationStore) -> None:
    assert await store.get_settings(THREAD) == ChannelSettings(inherited=True)
    await store.set_default_persona(GUILD, "narrator")
    await store.add_persona(GUILD, "edward_elric")
    await store.add_persona(GUILD, "sherlock_holmes")
    inherited = ChannelSettings("narrator", ["edward_elric", "sherlock_holmes"], autorespond=False, inherited=True)
    assert await store.get_settings(THREAD) == inherited
    await store.set_autorespond(THREAD, True)  # the thread's first own change keeps the rest it followed
    own = ChannelSettings("narrator", ["edward_elric", "sherlock_holmes"], autorespond=True)
    assert await store.get_settings(THREAD) == own
    await store.remove_persona(GUILD, "edward_elric")  # the channel's later changes no longer reach it
    await store.set_autorespond(THREAD, False)
    assert await store.get_settings(THREAD) == ChannelSettings("narrator", ["edward_elric", "sherlock_holmes"])
    assert await store.get_settings(GUILD) == ChannelSettings("narrator", ["sherlock_holmes"])
    other_thread = ConversationKey(guild_id=1, channel_id=2, thread_id=4)
    await store.remove_persona(other_thread, "narrator")  # a no-op change still makes the settings its own
    assert (await store.get_settings(other_thread)).inherited is False


async def test_two_first_changes_in_a_thread_at_once_both_stay(store: ConversationStore) -> None:
    """Each of the two commands would copy the parent's settings first: only one may, or it undoes the other."""
    await store.add_persona(GUILD, "sherlock_holmes")
    threads = [ConversationKey(guild_id=1, channel_id=2, thread_id=100 + i) for i in range(10)]
    for i, thread in enumerate(threads):  # threads people already talk in: their rows exist
        await add(store, thread, 500 + i, "hello")
    await asyncio.gather(*(
        change for thread in threads
        for change in (store.set_default_persona(thread, "narrator"), store.set_autorespond(thread, True))
    ))
    for thread in threads:
        assert await store.get_settings(thread) == ChannelSettings("narrator", ["sherlock_holmes"], autorespond=True)


async def test_settings_are_read_once_until_they_change(store: ConversationStore) -> None:
    """Every message reads its channel's settings: after the first read they cost no query, until a
    settings command here changes them (or the channel a thread follows)."""
    statements: list[str] = []
    listen = lambda *args: statements.append(args[2])  # noqa: E731 (before_cursor_execute's statement)
    event.listen(store.engine.sync_engine, "before_cursor_execute", listen)
    try:
        await store.add_persona(GUILD, "hermes")
        for key in (GUILD, THREAD, GUILD, THREAD):
            await store.get_settings(key)
        reads = len(statements)
        assert await store.get_settings(GUILD) == ChannelSettings(personas=["hermes"])
        assert await store.get_settings(THREAD) == ChannelSettings(personas=["hermes"], inherited=True)
        assert len(statements) == reads
        await store.set_autorespond(GUILD, True)
        assert (await store.get_settings(THREAD)).autorespond is True
    finally:
        event.remove(store.engine.sync_engine, "before_cursor_execute", listen)


async def test_a_settings_change_during_a_read_is_not_hidden_by_the_cache(
    store: ConversationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that began before a change returns the old settings, but must not keep them for later."""
    read, resume = asyncio.Event(), asyncio.Event()
    applying = store._applying_settings

    async def slow(*args: object) -> ChannelSettings:
        settings = await applying(*args)  # type: ignore[arg-type]
        read.set()
        await resume.wait()
        return settings

    monkeypatch.setattr(store, "_applying_settings", slow)
    reader = asyncio.create_task(store.get_settings(GUILD))
    await read.wait()
    monkeypatch.setattr(store, "_applying_settings", applying)
    await store.set_autorespond(GUILD, True)
    resume.set()
    assert (await reader).autorespond is False
    assert (await store.get_settings(GUILD)).autorespond is True


# -- concurrency -------------------------------------------------------------------------------------


async def test_concurrent_appends_lose_nothing(store: ConversationStore) -> None:
    keys = [ConversationKey(guild_id=1, channel_id=c) for c in range(4)]

    async def writer(task: int) -> bool:
        for i in range(10):
            await add(store, keys[task % 4], task * 1000 + i, f"t{task}-{i}")
        return await add(store, keys[0], 999_999, f"duplicate from {task}")

    results = await asyncio.gather(*(writer(t) for t in range(40)))
    assert results.count(True) == 1
    assert await store.count_messages() == 401
    for k, key in enumerate(keys):
        window = await store.window(key, 1000)
        expected = {f"t{t}-{i}" for t in range(k, 40, 4) for i in range(10)}
        assert {m.content for m in window if not m.content.startswith("duplicate")} == expected
        ids = [m.id for m in window]
        assert ids == sorted(ids)
        for t in range(k, 40, 4):  # each task's own turns stay in the order it wrote them
            assert [m.content for m in window if m.content.startswith(f"t{t}-")] == [f"t{t}-{i}" for i in range(10)]


# -- SQLite sharing ----------------------------------------------------------------------------------


async def test_sqlite_file_is_shared_safely_by_two_engines(tmp_path: Path) -> None:
    """A bot and a worker process each have their own engine on one file: WAL + busy_timeout let both write."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'created' / 'by' / 'engine.db'}"
    await upgrade_async(url)
    bot, worker = ConversationStore(make_engine(url)), ConversationStore(make_engine(url))
    try:
        async with bot.engine.connect() as connection:
            assert (await connection.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
            assert (await connection.exec_driver_sql("PRAGMA busy_timeout")).scalar() == 30_000
            assert (await connection.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1

        async def writes(store: ConversationStore, base: int) -> None:
            for i in range(50):
                await add(store, GUILD, base + i, f"{base}-{i}")

        await asyncio.gather(writes(bot, 0), writes(worker, 1000), writes(bot, 2000), writes(worker, 3000))
        assert len(await worker.window(GUILD, 500)) == 200
    finally:
        await bot.close()
        await worker.close()


# -- operator commands -------------------------------------------------------------------------------


def test_cli_exports_a_conversation_and_forgets_a_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/hermes.db"

    async def fill() -> None:
        store = await ConversationStore.open(url, migrate=True)
        await add(store, GUILD, 1, "hello from alice", author_id=7)
        await add(store, GUILD, 2, "hi from bob", author_id=8, author_name="bob")
        await store.close()

    asyncio.run(fill())
    monkeypatch.setenv("HERMES_DATABASE_URL", url)

    def exported() -> list[str]:
        assert main(["db", "export", "g1/c2"]) == 0
        return [m["content"] for m in json.loads(capsys.readouterr().out)["messages"]]

    assert exported() == ["hello from alice", "hi from bob"]
    assert main(["db", "forget-user", "7"]) == 0
    assert capsys.readouterr().out.strip() == "erased 1 message of user 7"
    assert exported() == ["hi from bob"]
    with pytest.raises(SystemExit) as exit_info:
        main(["db", "export", "general"])
    assert exit_info.value.code == 2 and "not a conversation key" in capsys.readouterr().err


async def test_a_database_that_refuses_connections_is_store_unavailable() -> None:
    """The driver's refusal (an OSError from asyncpg, not wrapped by SQLAlchemy) leaves the store as the one
    type the bot answers users about, so other network errors are never reported as a database outage."""
    store = ConversationStore(make_engine(f"postgresql+asyncpg://hermes@127.0.0.1:{free_port()}/hermes"))
    try:
        with pytest.raises(StoreUnavailable, match="the database failed"):
            await store.get_settings(ConversationKey(1, 2))
    finally:
        await store.close()


@pytest.mark.parametrize("migrate", [True, False])
async def test_opening_what_cannot_be_a_database_names_the_file(tmp_path: Path, migrate: bool) -> None:
    """`hermes-bot chat` and `run` open the store (and upgrade it) at start: a file that is not SQLite's, or a
    file where the database's folder goes, ended in the driver's traceback (`db upgrade` printed one line)."""
    (tmp_path / "notes.db").write_text("hello\n")
    (tmp_path / "pf").touch()
    cases = {tmp_path / "pf" / "x.db": f"{tmp_path / 'pf'} is not a folder"}
    if migrate:  # without the upgrade, nothing reads the file before the first store call
        cases[tmp_path / "notes.db"] = "file is not a database"
    for path, problem in cases.items():
        with pytest.raises(StoreUnavailable, match=re.escape(f"cannot open the database {path}: {problem}")):
            await ConversationStore.open(f"sqlite+aiosqlite:///{path}", migrate=migrate)


async def test_a_write_lock_held_past_the_timeout_is_store_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "hermes.db"
    await upgrade_async(f"sqlite+aiosqlite:///{path}")
    monkeypatch.setattr("bot.store.db.SQLITE_BUSY_TIMEOUT_MS", 100)
    other = sqlite3.connect(path, isolation_level=None)  # another process, writing
    try:
        other.execute("BEGIN IMMEDIATE")
        locked = re.escape(f"cannot open the database {path}: database is locked")
        with pytest.raises(StoreUnavailable, match=locked):
            await ConversationStore.open(f"sqlite+aiosqlite:///{path}", migrate=True)
    finally:
        other.close()


async def test_opening_an_unreachable_postgresql_names_it_without_the_password() -> None:
    url = f"postgresql+asyncpg://hermes:s3cret@127.0.0.1:{free_port()}/hermes"
    named = r"^cannot open the database postgresql\+asyncpg://hermes:\*\*\*@127\.0\.0\.1"
    with pytest.raises(StoreUnavailable, match=named) as raised:
        await ConversationStore.open(url, migrate=True)
    assert "s3cret" not in str(raised.value) and "\n" not in str(raised.value)


def test_db_export_of_a_database_without_the_schema_says_to_upgrade(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "new.db").touch()  # an empty file is an empty SQLite database
    monkeypatch.setenv("HERMES_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'new.db'}")
    assert main(["db", "export", "g1/c2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hermes-bot: the database failed:") and "run `hermes-bot db upgrade` first" in err
    assert "Traceback" not in err and err.count("\n") == 1
