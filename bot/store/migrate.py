"""Apply the Alembic migrations in bot/store/migrations/ without an alembic.ini, so `hermes-bot db upgrade`
works from any working directory and any install (they ship inside the package), and the bot can
upgrade its embedded SQLite file at start."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import Connection, make_url

from bot.store.db import UnknownSchema, make_engine, sqlite_file, unavailable_on_open

if TYPE_CHECKING:
    from bot.store.repository import ConversationStore

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


class SchemaNotReady(UnknownSchema):
    """The database is not at a schema this hermes-bot runs on, and `hermes-bot db upgrade` is what to do about it (or
    an upgrade was refused before it changed anything). An UnknownSchema, so the CLI, which imports bot.store.db and
    not Alembic, prints it as one line."""


def alembic_config() -> Config:
    """Alembic configured in code; the database connection is passed in by the callers below."""
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise RuntimeError(f"Alembic migrations not found in {MIGRATIONS_DIR}; reinstall hermes-bot")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _upgrade_connection(connection: Connection) -> tuple[str | None, str | None]:
    """Upgrade on an open sync connection; returns the revisions before and after."""
    before = MigrationContext.configure(connection).get_current_revision()
    config = alembic_config()
    config.attributes["connection"] = connection
    try:
        command.upgrade(config, "head")
    except CommandError:
        _refuse_unknown(before)
        raise
    return before, MigrationContext.configure(connection).get_current_revision()


def _refuse_unknown(revision: str | None) -> None:
    """UnknownSchema for a revision none of our migrations has: a newer hermes-bot upgraded the database."""
    scripts = ScriptDirectory.from_config(alembic_config())
    if revision is not None and revision not in {script.revision for script in scripts.walk_revisions()}:
        raise UnknownSchema(
            f"the database's schema is at revision {revision}, which this hermes-bot does not know: a newer "
            f"hermes-bot upgraded it (this one reaches {scripts.get_current_head()}); run that version or a newer one"
        ) from None


async def open_at_head(database_url: str) -> ConversationStore:
    """The store of `run` and `chat`, at head before either says it is ready: an embedded SQLite file is upgraded in
    place (it has no other migrate step); any other database must be at head already, as compose's one-shot `migrate`
    service or `hermes-bot db upgrade` leaves it (bot processes upgrading at start would race), else SchemaNotReady.
    A PostgreSQL without the schema used to answer "ready" (its ping is SELECT 1), and then every message failed."""
    from bot.store.repository import ConversationStore

    sqlite = make_url(database_url).get_backend_name() == "sqlite"
    store = await ConversationStore.open(database_url, migrate=sqlite)
    if sqlite:
        return store
    try:
        with unavailable_on_open(database_url):
            async with store.engine.connect() as connection:
                current = await connection.run_sync(lambda sync: MigrationContext.configure(sync).get_current_revision())
        _refuse_unknown(current)
        if current != (head := head_revision()):
            where = make_url(database_url).render_as_string(hide_password=True)
            raise SchemaNotReady(
                f"the database at {where} is not at the current schema (revision {current or 'none'}, need {head}): "
                "run `hermes-bot db upgrade`"
            )
    except BaseException:
        await store.close()
        raise
    return store


async def upgrade_async(database_url: str) -> None:
    """Bring the database to the newest revision (the bot calls this at start on SQLite)."""
    path = sqlite_file(database_url)
    if path is not None and path.is_dir():
        # Not left to SQLite: aiosqlite's thread of a failed connection may answer after asyncio.run closed the
        # loop, a "RuntimeError: Event loop is closed" traceback after the one-line error.
        raise IsADirectoryError(f"a folder, not a SQLite file; name a file in it, such as {path / 'hermes.db'}")
    engine = make_engine(database_url)
    where = make_url(database_url).render_as_string(hide_password=True)
    try:
        async with engine.begin() as connection:
            before, after = await connection.run_sync(_upgrade_connection)
    finally:
        await engine.dispose()
    if before == after:
        log.info("database schema already at head %s (%s)", after, where)
    else:
        log.info("database schema upgraded %s -> %s (%s)", before or "empty", after, where)


def upgrade(database_url: str) -> None:
    """Synchronous entry point for `hermes-bot db upgrade`."""
    asyncio.run(upgrade_async(database_url))
