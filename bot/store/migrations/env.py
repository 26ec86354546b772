"""Alembic environment, async. Run through bot.store.migrate (which hands us a connection) or the
`alembic` CLI from the repo root (which reads HERMES_DATABASE_URL / settings for the URL)."""

from __future__ import annotations

import asyncio

from alembic import context
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection

from bot.store.db import make_engine
from bot.store.migrate import SchemaNotReady
from bot.store.models import Base

config = context.config
target_metadata = Base.metadata


def _configure_and_run(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        # SQLite alters a table by copying it and dropping the old one, and with foreign keys on that
        # drop deletes the rows referring to it (ON DELETE CASCADE): off for the run, checked after.
        # (The pragma must come before the transaction.) The driver would begin a transaction only at
        # the first INSERT, after the copy's CREATE TABLE: one begun here, holding the write lock,
        # makes the whole run one transaction (a killed run leaves nothing half done) and makes a
        # second process that upgrades at the same time wait, then find the schema at head.
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=sqlite,  # SQLite can only ALTER by copying tables
        compare_type=True,
    )
    checking = sqlite and _has_work(context.get_context())
    if checking:
        _refuse_broken_references(connection, "the database already has")
    with context.begin_transaction():
        context.run_migrations()
    if checking:
        _refuse_broken_references(connection, "the upgrade would leave")


def _has_work(migration: MigrationContext) -> bool:
    """Whether this run moves the schema, so the reference checks (which read every row) are worth it:
    the bot upgrades at every start and mostly finds the database at head already, and `current`,
    `check` and `revision` name no destination at all (asking them for one raises KeyError)."""
    if migration.opts.get("destination_rev") is None:
        return False
    destination = context.get_revision_argument()  # "head" as its revision id, "heads" as a tuple of ids
    return destination not in (migration.get_current_revision(), migration.get_current_heads())


def _refuse_broken_references(connection: Connection, who: str) -> None:
    """SchemaNotReady, one line from every command that upgrades (a RuntimeError was a traceback), naming the SQLite
    file, when rows point at missing ones."""
    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if broken:
        rows = ", ".join(f"{table} row {rowid} (-> {parent})" for table, rowid, parent, _ in broken[:5])
        raise SchemaNotReady(
            f"{connection.engine.url.database}: {who} rows pointing at missing ones: {rows}; nothing was changed"
        )


def _database_url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from bot.config import load_settings

    return load_settings().database_url


async def _run_async() -> None:
    engine = make_engine(_database_url())
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_configure_and_run)
            await connection.commit()
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure_and_run(connection)
    else:
        asyncio.run(_run_async())


if context.is_offline_mode():
    context.configure(url=_database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
