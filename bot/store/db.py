"""Async engines for the store: SQLite tuned so a bot and a worker can share one file, or PostgreSQL.

`HERMES_DATABASE_URL` alone decides which. The dialect differences stay in bot.store (its migrations/ included)
(column type variants, the upsert, batch ALTERs on SQLite); outside them only the bot's automatic
upgrade at start, done on SQLite alone, looks at the URL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

SQLITE_BUSY_TIMEOUT_MS = 30_000

# What a database outage raises inside a session: the drivers' errors (SQLAlchemy wraps them, except
# asyncpg's while connecting) and refused or reset connections.
_DATABASE_ERRORS: tuple[type[Exception], ...] = (
    SQLAlchemyError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
)


class UnknownSchema(Exception):
    """The database's schema revision is none of this hermes-bot's: a newer version upgraded it."""


class StoreUnavailable(Exception):
    """The database failed under a store call. Callers that talk to users catch this one type to answer
    instead of going quiet; a network error elsewhere (Discord's) is never mistaken for it."""


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL lets readers run beside one writer; busy_timeout makes writers wait instead of failing.

    synchronous=NORMAL is the documented safe pairing with WAL (no corruption, fewer fsyncs);
    foreign_keys=ON makes SQLite honour the ON DELETE CASCADE that PostgreSQL always does.
    """
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def sqlite_file(database_url: str | URL) -> Path | None:
    """The file a SQLite URL names, `~` expanded (SQLite itself would read `~` as a folder name); None for
    PostgreSQL, memory and `file:` URIs, which SQLite resolves itself."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return None if url.database.startswith("file:") else Path(url.database).expanduser()


def make_engine(database_url: str) -> AsyncEngine:
    """An AsyncEngine for `database_url`; for a SQLite file, creates its directory first."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        return create_async_engine(url, pool_pre_ping=True)
    if path := sqlite_file(url):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError as exc:  # mkdir's words ("File exists") for a file where the folder goes
            raise NotADirectoryError(f"{exc.filename} is not a folder") from None
        url = url.set(database=str(path))
    engine = create_async_engine(url)
    event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


class Sessions:
    """The store's sessions, `sessions()` or `sessions.begin()` like SQLAlchemy's: loaded rows stay
    usable after commit (the store returns plain dataclasses anyway), and a database failure inside
    one leaves as StoreUnavailable."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._maker = async_sessionmaker(engine, expire_on_commit=False)

    def __call__(self) -> AbstractAsyncContextManager[AsyncSession]:
        return _unavailable_on_failure(self._maker())

    def begin(self) -> AbstractAsyncContextManager[AsyncSession]:
        return _unavailable_on_failure(self._maker.begin())


@contextmanager
def unavailable_on_failure() -> Iterator[None]:
    """A database failure inside leaves as StoreUnavailable: one line for the CLI, not the driver's traceback
    (`hermes-bot db upgrade` runs Alembic on the engine directly, outside any store session)."""
    try:
        yield
    except _DATABASE_ERRORS as exc:
        raise StoreUnavailable(f"the database failed: {exc}") from exc


@contextmanager
def unavailable_on_open(database_url: str) -> Iterator[None]:
    """Opening a store (its upgrade at start included) failing leaves as one StoreUnavailable line that names
    the database, the SQLite file or the URL without its password, in the driver's own words: `hermes-bot run`
    and `chat` print it instead of a traceback of the driver's."""
    try:
        yield
    except _DATABASE_ERRORS as exc:
        cause = exc.orig if isinstance(exc, DBAPIError) else exc  # without SQLAlchemy's SQL and docs link
        reason = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        path = sqlite_file(database_url)
        where = path.absolute() if path else make_url(database_url).render_as_string(hide_password=True)
        raise StoreUnavailable(f"cannot open the database {where}: {reason}") from exc


@asynccontextmanager
async def _unavailable_on_failure(context: AbstractAsyncContextManager[AsyncSession]) -> AsyncIterator[AsyncSession]:
    with unavailable_on_failure():
        async with context as session:
            yield session
