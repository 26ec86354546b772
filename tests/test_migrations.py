"""Alembic migrations: empty -> head on SQLite and PostgreSQL, models and migrations agree, CLI works."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Integer, MetaData, inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from bot.store.db import make_engine
from bot.store.keys import ConversationKey
from bot.store.migrate import SchemaNotReady, alembic_config, head_revision, upgrade, upgrade_async
from bot.store.models import Base
from bot.store.repository import ConversationStore
from tests.test_store import GUILD, new_database_url

ROOT = Path(__file__).resolve().parent.parent
TABLES = {"conversations", "conversation_personas", "messages", "message_parts"}


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return new_database_url(request, tmp_path, request.param)


def _diff(connection: Connection, metadata: MetaData) -> list[object]:
    return compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), metadata)


def _state(connection: Connection) -> tuple[set[str], str | None]:
    tables = set(inspect(connection).get_table_names()) - {"alembic_version"}
    return tables, MigrationContext.configure(connection).get_current_revision()


def migrate_to(connection: Connection, revision: str) -> None:
    """Upgrade an open connection's database to `revision` (older tests' starting points)."""
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


async def test_empty_to_head_matches_models(empty_database_url: str) -> None:
    await upgrade_async(empty_database_url)
    await upgrade_async(empty_database_url)  # a second run is a no-op
    engine = make_engine(empty_database_url)
    try:
        async with engine.connect() as connection:
            assert await connection.run_sync(_state) == (TABLES, head_revision())
            assert await connection.run_sync(_diff, Base.metadata) == []
            # The comparison is not blind: a column the migrations lack shows up as a difference.
            changed = MetaData()
            for table in Base.metadata.sorted_tables:
                table.to_metadata(changed)
            changed.tables["messages"].append_column(Column("extra", Integer))
            diff = await connection.run_sync(_diff, changed)
            assert [d[0] for d in diff] == ["add_column"]  # type: ignore[index]
    finally:
        await engine.dispose()


async def test_downgrade_to_base_and_back(empty_database_url: str) -> None:
    await upgrade_async(empty_database_url)
    engine = make_engine(empty_database_url)

    def downgrade(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.downgrade(config, "base")

    try:
        async with engine.begin() as connection:
            await connection.run_sync(downgrade)
        async with engine.connect() as connection:
            assert await connection.run_sync(_state) == (set(), None)
    finally:
        await engine.dispose()
    await upgrade_async(empty_database_url)
    store = await ConversationStore.open(empty_database_url)
    try:
        assert await store.append(GUILD, discord_message_id=1, author_id=2, author_name="a", role="user", content="x")
    finally:
        await store.close()


async def test_threads_with_settings_keep_them_across_0003(empty_database_url: str) -> None:
    """Before 0003 a thread's settings were its own; after it, a thread that had none follows its channel."""
    engine = make_engine(empty_database_url)

    rows = [
        (1, "g1/c2", 2, None, "narrator"),  # the channel
        (2, "g1/c2/t3", 2, 3, "edward_elric"),  # a thread that chose its own persona
        (3, "g1/c2/t4", 2, 4, None),  # a thread that never changed anything
        (4, "g1/c2/t5", 2, 5, None),  # a thread that only turned auto-respond on
        (5, "g1/c2/t6", 2, 6, None),  # a thread that only added a persona
    ]
    try:
        async with engine.begin() as connection:
            await connection.run_sync(migrate_to, "0002")
            for row in rows:
                await connection.execute(
                    text("INSERT INTO conversations (id, key, guild_id, channel_id, thread_id, created_at, "
                         "default_persona) VALUES (:id, :key, 1, :channel, :thread, CURRENT_TIMESTAMP, :persona)"),
                    dict(zip(("id", "key", "channel", "thread", "persona"), row, strict=True)),
                )
            await connection.execute(text("UPDATE conversations SET autorespond = TRUE WHERE id = 4"))
            await connection.execute(text(
                "INSERT INTO conversation_personas (conversation_id, persona_id, added_at) "
                "VALUES (5, 'sherlock_holmes', CURRENT_TIMESTAMP)"
            ))
    finally:
        await engine.dispose()
    await upgrade_async(empty_database_url)
    store = await ConversationStore.open(empty_database_url)
    try:
        assert (await store.get_settings(ConversationKey(1, 2, 3))).default_persona == "edward_elric"
        follows = await store.get_settings(ConversationKey(1, 2, 4))
        assert (follows.default_persona, follows.inherited) == ("narrator", True)
        autoresponds = await store.get_settings(ConversationKey(1, 2, 5))
        assert (autoresponds.autorespond, autoresponds.inherited, autoresponds.default_persona) == (True, False, None)
        added = await store.get_settings(ConversationKey(1, 2, 6))
        assert (added.personas, added.inherited) == (["sherlock_holmes"], False)
    finally:
        await store.close()


async def test_0004_keeps_every_row_and_ids_are_never_reused(empty_database_url: str) -> None:
    """From 0002 (so 0003's write runs in the same upgrade) to head with stored turns and reply parts:
    nothing is lost, and after /reset and /forget-me a new message still counts as new."""
    engine = make_engine(empty_database_url)

    try:
        async with engine.begin() as connection:
            await connection.run_sync(migrate_to, "0002")
            await connection.execute(text(
                "INSERT INTO conversations (id, key, guild_id, channel_id, created_at) "
                "VALUES (1, 'g1/c2', 1, 2, CURRENT_TIMESTAMP)"
            ))
            for discord_id, role, author in ((101, "user", 7), (102, "assistant", None), (103, "user", 8)):
                await connection.execute(
                    text("INSERT INTO messages (conversation_id, discord_message_id, author_id, author_name, "
                         "role, content, created_at) VALUES (1, :discord_id, :author, 'x', :role, 'hi', "
                         "CURRENT_TIMESTAMP)"),
                    {"discord_id": discord_id, "role": role, "author": author},
                )
            await connection.execute(text(
                "INSERT INTO message_parts (discord_message_id, message_id) "
                "SELECT 555, id FROM messages WHERE discord_message_id = 102"
            ))
    finally:
        await engine.dispose()
    await upgrade_async(empty_database_url)
    store = await ConversationStore.open(empty_database_url)
    try:
        stored = await store.window(GUILD, 10)
        assert [m.discord_message_id for m in stored] == [101, 102, 103]
        assert (await store.find_message(555)).discord_message_id == 102  # the reply's later part still finds it
        await store.reset(GUILD)
        assert await store.forget_user(8) == 1  # the newest row is gone
        await store.append(GUILD, discord_message_id=900, author_id=9, author_name="new", role="user", content="new")
        assert [m.content for m in await store.window(GUILD, 10)] == ["new"]
        with pytest.raises(IntegrityError, match="ck_messages_role"):  # the role CHECK survived the copy
            async with store.engine.begin() as connection:
                await connection.execute(text(
                    "INSERT INTO messages (conversation_id, author_name, role, content, created_at) "
                    "VALUES (1, 'x', 'bogus', '?', CURRENT_TIMESTAMP)"
                ))
    finally:
        await store.close()


async def _reset_then_forget_the_newest(store: ConversationStore) -> None:
    """Three turns, a /reset after them (reset point: the third's id), then /forget-me erases the third."""
    for discord_id, author in ((101, 7), (102, None), (103, 8)):
        await store.append(GUILD, discord_message_id=discord_id, author_id=author, author_name="x",
                           role="user" if author else "assistant", content=f"old {discord_id}")
    await store.reset(GUILD)
    assert await store.forget_user(8) == 1


async def _append_new(store: ConversationStore, discord_id: int) -> list[str]:
    """Append one new turn; the context the model would get after it."""
    await store.append(GUILD, discord_message_id=discord_id, author_id=9, author_name="new", role="user",
                       content=f"new {discord_id}")
    return [m.content for m in await store.window(GUILD, 10)]


async def test_an_upgrade_from_0003_starts_ids_above_the_reset_point_not_only_the_newest_row(
    empty_database_url: str,
) -> None:
    """0004's copy seeds the AUTOINCREMENT sequence from max(id): after /reset and /forget-me of the newest
    row that is below the reset point, and the first turn stored after the upgrade never reached the model
    (0006 raises it)."""
    engine = make_engine(empty_database_url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(migrate_to, "0003")
        await _reset_then_forget_the_newest(ConversationStore(engine))  # the 0003-era bot
        async with engine.begin() as connection:
            await connection.run_sync(migrate_to, "head")
        assert await _append_new(ConversationStore(engine), 900) == ["new 900"]
    finally:
        await engine.dispose()


async def test_0006_raises_a_sequence_0004_left_below_a_reset_point_and_never_lowers_one(tmp_path: Path) -> None:
    """A database 0004 upgraded before it considered reset points: 0006 repairs its sequence, and running it
    again (downgrade, upgrade) where nothing is wrong changes nothing."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'hermes.db'}"
    engine = make_engine(url)
    store = ConversationStore(engine)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(migrate_to, "0005")
        await _reset_then_forget_the_newest(store)
        async with engine.begin() as connection:  # what the first 0004 left: the sequence at max(id)
            await connection.execute(text("UPDATE sqlite_sequence SET seq = 2 WHERE name = 'messages'"))
        await upgrade_async(url)
        assert await _append_new(store, 900) == ["new 900"]
        assert await store.forget_user(9) == 1  # the newest row goes again: the sequence stays above it

        def down_to_0005(connection: Connection) -> None:
            config = alembic_config()
            config.attributes["connection"] = connection
            command.downgrade(config, "0005")

        async with engine.begin() as connection:
            await connection.run_sync(down_to_0005)
        await upgrade_async(url)
        assert await _append_new(store, 901) == ["new 901"]
        async with engine.connect() as connection:
            ids = (await connection.execute(text("SELECT id FROM messages ORDER BY id"))).scalars().all()
        assert ids == [1, 2, 5]
    finally:
        await engine.dispose()


async def test_a_failed_sqlite_upgrade_changes_nothing_and_can_run_again(tmp_path: Path) -> None:
    """SQLite's driver began its transaction only at the first INSERT, after 0004's copy table was
    created: a run that failed or was killed mid-copy left that table, and every later upgrade failed."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'hermes.db'}"
    engine = make_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(migrate_to, "0003")
            await connection.exec_driver_sql("PRAGMA foreign_keys=OFF")  # an orphan part: fails the upgrade
        async with engine.begin() as connection:
            await connection.exec_driver_sql("INSERT INTO message_parts (discord_message_id, message_id) VALUES (5, 77)")
        with pytest.raises(SchemaNotReady, match=r"already has rows pointing at missing ones: message_parts row 1"):
            await upgrade_async(url)
        async with engine.begin() as connection:
            assert await connection.run_sync(_state) == (TABLES, "0003")  # no copy table left behind
            await connection.exec_driver_sql("DELETE FROM message_parts")
        await upgrade_async(url)
        async with engine.connect() as connection:
            assert await connection.run_sync(_state) == (TABLES, head_revision())
    finally:
        await engine.dispose()


async def test_an_upgrade_with_nothing_to_do_reads_no_rows(tmp_path: Path) -> None:
    """The bot upgrades at every start, and the reference checks read every row: they run only when
    migrations do. (They never skipped: Alembic hands env.py "head" as the revision id it stands for.)"""
    path = tmp_path / "hermes.db"
    await upgrade_async(f"sqlite+aiosqlite:///{path}")
    orphans = sqlite3.connect(path)  # foreign keys off, as in any sqlite3 session
    with orphans:
        orphans.execute("INSERT INTO message_parts (discord_message_id, message_id) VALUES (5, 77)")
    orphans.close()
    await upgrade_async(f"sqlite+aiosqlite:///{path}")  # no "the database already has rows pointing at ..."


def test_an_upgrade_waits_for_one_already_running_then_finds_the_schema_at_head(tmp_path: Path) -> None:
    """`hermes-bot run` and `hermes-bot chat` upgrade the embedded database when they start: two starting
    at once used to race (\"table alembic_version already exists\")."""
    head = tmp_path / "head.db"
    upgrade(f"sqlite+aiosqlite:///{head}")
    schema = [line for line in sqlite3.connect(head).iterdump() if line not in ("BEGIN TRANSACTION;", "COMMIT;")]
    other = sqlite3.connect(tmp_path / "hermes.db", isolation_level=None)  # "another process", mid-upgrade
    other.execute("PRAGMA journal_mode=WAL")
    other.execute("BEGIN IMMEDIATE")
    for statement in schema:
        other.execute(statement)
    errors: list[BaseException] = []

    def upgrade_now() -> None:
        try:
            upgrade(f"sqlite+aiosqlite:///{tmp_path / 'hermes.db'}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    second = threading.Thread(target=upgrade_now)
    second.start()
    second.join(1.0)  # it has read the schema by now and waits for the write lock
    other.execute("COMMIT")
    second.join(60)
    other.close()
    assert not second.is_alive() and errors == []


async def test_open_with_migrate_logs_the_upgrade(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'hermes.db'}"
    with caplog.at_level(logging.INFO, logger="bot.store.migrate"):
        store = await ConversationStore.open(url, migrate=True)
    try:
        assert await store.window(GUILD, 5) == []
    finally:
        await store.close()
    assert f"database schema upgraded empty -> {head_revision()}" in caplog.text
    assert (tmp_path / "data" / "hermes.db").is_file()


def test_cli_db_upgrade_from_another_directory(tmp_path: Path) -> None:
    db = tmp_path / "deep" / "dir" / "hermes.db"
    env = os.environ | {"HERMES_DATABASE_URL": f"sqlite+aiosqlite:///{db}"}
    result = subprocess.run(
        [sys.executable, "-m", "bot", "db", "upgrade"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "database at head" in result.stdout
    upgrade(f"sqlite+aiosqlite:///{db}")  # already at head: nothing to do, no error


def test_the_alembic_cli_of_the_developer_steps(empty_database_url: str) -> None:
    """README's steps, from the repo root: `current`, `check` and `revision` name no destination revision,
    and env.py asked them for one (KeyError: 'destination_rev') once a SQLite database was at head."""

    def alembic(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "alembic", *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
            env=os.environ | {"HERMES_DATABASE_URL": empty_database_url},
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    alembic("upgrade", "head")
    assert alembic("current").split() == [f"{head_revision()}", "(head)"]
    assert "No new upgrade operations detected" in alembic("check")  # models and migrations agree
    alembic("upgrade", "head")


def test_the_bots_upgrade_logs_its_own_line_and_not_alembics(tmp_path: Path) -> None:
    """Each start of `hermes-bot run` logged 13 of Alembic's INFO lines (7 `setup plugin alembic...` when it
    is imported): a fresh interpreter, as a start is, logs the store's one line each time."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'hermes.db'}"
    script = (
        "import asyncio, logging, sys\n"
        "logging.basicConfig(level=logging.INFO, format='%(name)s: %(message)s')\n"
        "from bot.store.repository import ConversationStore\n"
        "async def start():\n"
        "    await (await ConversationStore.open(sys.argv[1], migrate=True)).close()\n"
        "asyncio.run(start())\n"
    )
    head = head_revision()
    for line in (f"database schema upgraded empty -> {head}", f"database schema already at head {head}"):
        result = subprocess.run(
            [sys.executable, "-c", script, url], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        assert result.stderr.splitlines() == [f"bot.store.migrate: {line} ({url})"]
