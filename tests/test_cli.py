"""`python -m bot` run as a process on bad input: one line that names the problem, never a traceback."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from bot.store.keys import ConversationKey
from bot.store.repository import ConversationStore
from tests.services import free_port


def hermes(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`hermes-bot ARGS` in `cwd`, with no HERMES_* setting but `env` (and none from the caller's shell)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HERMES_") and k != "DISCORD_TOKEN"}
    return subprocess.run(
        [sys.executable, "-m", "bot", *args], cwd=cwd, env=clean | env, capture_output=True, text=True, timeout=120,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("hermes-bot: ")
    return result.stderr


@pytest.mark.parametrize(("url", "problem"), [
    ("sqlite+aiosqlite://data/h.db", "a SQLite URL names a file after three slashes"),
    ("postgresql+asyncpg://hermes:s3cret@db:notaport/hermes", "the port after host: must be a number"),
    ("sqlite+aiosqlite:///:memory:", "names no file, so SQLite would keep an in-memory database"),
])
def test_a_database_url_no_driver_can_use_is_refused_the_same_way_by_every_command(
    tmp_path: Path, url: str, problem: str
) -> None:
    """The settings check used to pass these, and each command then failed its own way: a traceback, or
    (`:memory:`) an upgrade that "worked" on a database gone at exit."""
    for command in (["db", "upgrade"], ["db", "export", "g1/c2"], ["run"]):
        result = hermes(tmp_path, *command, HERMES_DATABASE_URL=url, DISCORD_TOKEN="token")
        assert result.returncode == 2, (command, result.stderr)
        err = one_line_error(result)
        assert err.startswith(f"hermes-bot: invalid setting HERMES_DATABASE_URL: {problem}"), err
        assert "s3cret" not in err
    assert list(tmp_path.iterdir()) == []


def test_db_upgrade_of_an_unreachable_postgresql_is_one_line(tmp_path: Path) -> None:
    url = f"postgresql+asyncpg://hermes:s3cret@127.0.0.1:{free_port()}/hermes"
    result = hermes(tmp_path, "db", "upgrade", HERMES_DATABASE_URL=url)
    assert result.returncode == 1
    err = one_line_error(result)
    assert err.startswith(f"hermes-bot: cannot open the database {url.replace('s3cret', '***')}: ")
    assert "Connect call failed" in err


def test_db_upgrade_of_a_missing_postgresql_database_does_not_say_to_run_db_upgrade(
    tmp_path: Path, postgres_url: str
) -> None:
    """The missing-schema hint is for a missing table; `db upgrade` cannot create the database itself."""
    result = hermes(tmp_path, "db", "upgrade", HERMES_DATABASE_URL=postgres_url.rsplit("/", 1)[0] + "/no_such_db")
    assert result.returncode == 1
    err = one_line_error(result)
    assert 'database "no_such_db" does not exist' in err and "db upgrade" not in err


def test_a_tilde_in_a_sqlite_path_is_the_home_folder(tmp_path: Path) -> None:
    """As in a shell: `~` is the home folder, for the folder make_engine creates and the file SQLite opens."""
    (tmp_path / "home").mkdir()
    (tmp_path / "work").mkdir()
    url = "sqlite+aiosqlite:///~/x/hermes.db"
    result = hermes(tmp_path / "work", "db", "upgrade", HERMES_DATABASE_URL=url, HOME=str(tmp_path / "home"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "home" / "x" / "hermes.db").is_file()
    assert list((tmp_path / "work").iterdir()) == []


def test_db_export_of_a_key_with_nothing_stored_says_so_and_fails(tmp_path: Path) -> None:
    """A thread's key names its parent channel; exporting the thread id as a channel must not print an
    empty record as if the conversation were merely empty."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'hermes.db'}"

    async def fill() -> None:
        store = await ConversationStore.open(url, migrate=True)
        await store.append(ConversationKey(1, 2, 3), discord_message_id=1, author_id=7, author_name="ann",
                           role="user", content="in the thread")
        await store.close()

    asyncio.run(fill())
    result = hermes(tmp_path, "db", "export", "g1/c3", HERMES_DATABASE_URL=url)
    assert result.returncode == 2 and result.stdout == ""
    err = one_line_error(result)
    assert "no conversation is stored under g1/c3" in err and "g<guild>/c<parent channel>/t<thread>" in err
    found = hermes(tmp_path, "db", "export", "g1/c2/t3", HERMES_DATABASE_URL=url)
    assert found.returncode == 0 and '"content": "in the thread"' in found.stdout


@pytest.mark.parametrize(("name", "problem"), [
    ("README.md", "file is not a database"),
    ("folder", "a folder, not a SQLite file; name a file in it, such as"),
])
def test_db_upgrade_of_something_no_sqlite_file_names_it(tmp_path: Path, name: str, problem: str) -> None:
    """"the database failed: (sqlite3.DatabaseError) file is not a database" named no file; a folder sometimes added
    aiosqlite's "RuntimeError: Event loop is closed" thread traceback (its failed connection outlived the loop)."""
    (tmp_path / "README.md").write_text("# not a database\n")
    (tmp_path / "folder").mkdir()
    result = hermes(tmp_path, "db", "upgrade", HERMES_DATABASE_URL=f"sqlite+aiosqlite:///{name}")
    assert result.returncode == 1
    assert one_line_error(result).startswith(f"hermes-bot: cannot open the database {tmp_path / name}: {problem}")
    assert (tmp_path / "README.md").read_text() == "# not a database\n"


def test_a_migration_refused_for_broken_rows_is_one_line(tmp_path: Path) -> None:
    """The upgrade's check of the rows (bot/store/migrations/env.py) raised a RuntimeError: a traceback from
    `db upgrade`, and from `chat` and `run`, which upgrade SQLite at start."""
    from bot.store.db import make_engine
    from tests.test_migrations import migrate_to

    path = tmp_path / "hermes.db"

    async def at_0003() -> None:
        engine = make_engine(f"sqlite+aiosqlite:///{path}")
        async with engine.begin() as connection:
            await connection.run_sync(migrate_to, "0003")
        await engine.dispose()

    asyncio.run(at_0003())
    with sqlite3.connect(path) as connection:  # foreign keys are off here: an orphan part
        connection.execute("INSERT INTO message_parts (discord_message_id, message_id) VALUES (5, 77)")
    for command_line in (["db", "upgrade"], ["chat"]):
        result = hermes(tmp_path, *command_line, HERMES_DATABASE_URL=f"sqlite+aiosqlite:///{path}")
        assert result.returncode == 2
        assert one_line_error(result) == (
            f"hermes-bot: {path}: the database already has rows pointing at missing ones: message_parts row 1 "
            "(-> messages); nothing was changed\n"
        )


def test_db_export_of_a_folder_says_it_is_one(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    for command_line in (["db", "export", "g1/c2"], ["db", "forget-user", "7"]):
        result = hermes(tmp_path, *command_line, HERMES_DATABASE_URL="sqlite+aiosqlite:///data")
        assert result.returncode == 2
        assert one_line_error(result).startswith(
            "hermes-bot: the database file data (HERMES_DATABASE_URL) is a folder, not a SQLite file; check the path"
        )


def test_db_export_of_a_missing_sqlite_file_does_not_create_it(tmp_path: Path) -> None:
    result = hermes(tmp_path, "db", "export", "g1/c2", HERMES_DATABASE_URL="sqlite+aiosqlite:///data/hermes.db")
    assert result.returncode == 2
    err = one_line_error(result)
    assert err.startswith("hermes-bot: the database file data/hermes.db (HERMES_DATABASE_URL) does not exist")
    assert str(tmp_path) in err  # where a relative path starts
    assert list(tmp_path.iterdir()) == []


def test_a_hermes_yaml_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    (tmp_path / "hermes.yaml").write_bytes(b"\xff\xfe bad")
    result = hermes(tmp_path, "personas", "list")
    assert result.returncode == 2
    assert one_line_error(result) == (
        "hermes-bot: hermes.yaml:1: not UTF-8 text (byte 0xff at offset 0); save it as UTF-8\n"
    )


def test_a_database_a_newer_hermes_bot_upgraded_is_named_as_such(tmp_path: Path) -> None:
    """Rolling back to an older version after an upgrade: Alembic's "Can't locate revision" traceback
    said nothing about versions, from `db upgrade` and from every command that upgrades at start."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'hermes.db'}"
    assert hermes(tmp_path, "db", "upgrade", HERMES_DATABASE_URL=url).returncode == 0
    with sqlite3.connect(tmp_path / "hermes.db") as connection:
        connection.execute("UPDATE alembic_version SET version_num = '0999'")
    result = hermes(tmp_path, "db", "upgrade", HERMES_DATABASE_URL=url)
    assert result.returncode == 2
    assert "schema is at revision 0999, which this hermes-bot does not know: a newer" in one_line_error(result)


def test_output_into_a_pipe_closed_early_ends_quietly(tmp_path: Path) -> None:
    """`hermes-bot personas validate | head -1` ended in a BrokenPipeError traceback."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HERMES_")}
    listing = subprocess.Popen([sys.executable, "-m", "bot", "personas", "validate"], cwd=tmp_path, env=clean,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert listing.stdout is not None and listing.stderr is not None
    listing.stdout.close()  # like head, gone before the first line
    assert "Traceback" not in listing.stderr.read().decode() and listing.wait(timeout=60) == 1
