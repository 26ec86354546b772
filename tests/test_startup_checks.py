"""What `run`, `worker` and `chat` check before they say they started (and `run` logs in to Discord): a setting
or a database no retry will mend is one line then, not an error after "discord bot ready" or "worker started"."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
import torch

from bot.engine.base import EngineError
from bot.engine.transformers_engine import resolve_device
from bot.store.migrate import head_revision
from tests.services import create_database, free_port
from tests.test_cli import one_line_error

ROOT = Path(__file__).resolve().parent.parent
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has the GPU it asks for")


def start(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`hermes-bot ARGS` with stdin at its end and Discord's REST base at a closed port: a `run` that got as far
    as logging in says "cannot reach Discord"."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HERMES_") and k != "DISCORD_TOKEN"}
    settings = {
        "DISCORD_TOKEN": "token", "HERMES_DISCORD_API_BASE": f"http://127.0.0.1:{free_port()}",
        "HERMES_PERSONAS_DIR": str(ROOT / "personas"), "HERMES_LOG_LEVEL": "WARNING", "HERMES_DEVICE": "cpu",
        "HERMES_DATABASE_URL": f"sqlite+aiosqlite:///{cwd / 'hermes.db'}",
    }
    return subprocess.run([sys.executable, "-m", "bot", *args], cwd=cwd, env=clean | settings | env, input="",
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("name", "value", "problem"), [
    ("HERMES_ENGINE", "openai", "HERMES_ENGINE=openai needs HERMES_OPENAI_BASE_URL"),
    ("HERMES_MODEL", "./nope", "HERMES_MODEL ./nope: no such directory"),
    ("HERMES_MODEL", "models/hermes/v2", "HERMES_MODEL=models/hermes/v2 is neither an existing folder nor a valid"),
    pytest.param("HERMES_DEVICE", "cuda", "HERMES_DEVICE=cuda: CUDA requested but not available", marks=NO_CUDA),
])
def test_an_engine_setting_that_cannot_work_stops_run_and_worker_before_they_start(
    tmp_path: Path, tiny_model_dir: Path, redis_url: str, name: str, value: str, problem: str
) -> None:
    """`run` logged in, synced its commands and said "discord bot ready" first (a restarting service spends
    Discord's daily identifies on it); `worker` said "worker started"; a device torch lacks was a traceback."""
    setting = {"HERMES_MODEL": str(tiny_model_dir), name: value}
    run = start(tmp_path, "run", **setting)
    assert run.returncode == 1 and problem in run.stderr, run.stderr
    assert "cannot reach Discord" not in run.stderr and "Traceback" not in run.stderr
    worker = start(tmp_path, "worker", HERMES_QUEUE_URL=redis_url, **setting)
    assert worker.returncode == 1 and "worker started" not in worker.stderr
    assert one_line_error(worker).startswith(f"hermes-bot: {problem}")


@NO_CUDA
@pytest.mark.parametrize("name", ["cuda", "cuda:1", "mps"])
def test_a_gpu_this_machine_lacks_is_an_engine_error(name: str) -> None:
    with pytest.raises(EngineError, match=rf"^HERMES_DEVICE={name}: .*; or "):
        resolve_device(name)


def test_a_redis_that_refuses_us_stops_each_command_with_one_line(tmp_path: Path, redis_url: str) -> None:
    """A database index the server lacks: `chat` and `queue dead-letters` ended in a ResponseError traceback, and a
    worker logged "fetching jobs failed" forever."""
    url = redis_url.rsplit("/", 1)[0] + "/99"
    for command in (["queue", "dead-letters"], ["run"], ["worker"], ["chat"]):
        result = start(tmp_path, *command, HERMES_QUEUE_URL=url)
        assert result.returncode == 2, (command, result.stderr)
        assert one_line_error(result) == (
            f"hermes-bot: the Redis at {url} (HERMES_QUEUE_URL) refuses us: DB index is out of range\n"
        )


async def _tables(url: str) -> list[str]:
    connection = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        return [row[0] for row in await connection.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
    finally:
        await connection.close()


def test_a_postgresql_database_not_at_head_stops_run_and_chat_until_db_upgrade(
    tmp_path: Path, tiny_model_dir: Path, postgres_url: str
) -> None:
    """`run` said "discord bot ready" and /readyz "database: true" (SELECT 1), then every message got "I can't reach
    my memory"; `chat` upgraded it silently. Compose upgrades in its one-shot `migrate` service: both say so now."""
    url = asyncio.run(create_database(postgres_url))
    env = {"HERMES_DATABASE_URL": url, "HERMES_MODEL": str(tiny_model_dir)}
    for command in ("run", "chat"):
        result = start(tmp_path, command, **env)
        assert result.returncode == 2, result.stderr
        assert one_line_error(result) == (
            f"hermes-bot: the database at {url} is not at the current schema (revision none, need {head_revision()}): "
            "run `hermes-bot db upgrade`\n"
        )
    assert asyncio.run(_tables(url)) == []
    upgrade = start(tmp_path, "db", "upgrade", **env)
    assert upgrade.returncode == 0, upgrade.stderr
    assert start(tmp_path, "chat", **env).returncode == 0
    run = start(tmp_path, "run", **env)
    assert run.returncode == 1 and "cannot reach Discord" in run.stderr  # past every check, on to Discord
