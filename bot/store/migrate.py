"""Apply the Alembic migrations in bot/store/migrations/ without an alembic.ini, so `hermes-bot db upgrade`
works from any working directory and any install (they ship inside the package), and the bot can
upgrade its embedded SQLite file at start."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import Connection, make_url

from bot.store.db import UnknownSchema, make_engine

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


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
        scripts = ScriptDirectory.from_config(config)
        if before is not None and before not in {script.revision for script in scripts.walk_revisions()}:
            raise UnknownSchema(
                f"the database's schema is at revision {before}, which this hermes-bot does not know: a newer "
                f"hermes-bot upgraded it (this one reaches {scripts.get_current_head()}); run that version or a newer one"
            ) from None
        raise
    return before, MigrationContext.configure(connection).get_current_revision()


async def upgrade_async(database_url: str) -> None:
    """Bring the database to the newest revision (the bot calls this at start on SQLite)."""
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
