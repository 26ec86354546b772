"""SIGTERM on the real processes: `hermes-bot worker` on Redis, `hermes-bot run` against the fake Discord.

Both run as subprocesses (as `docker compose stop` sees them); generation comes from the scripted
OpenAI-compatible test server, so the timing of every reply is known.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from bot.config import Settings
from bot.queue.jobs import Done, GenerationJob, TextDelta
from bot.queue.redis_streams import RedisStreamsQueue
from tests.fakediscord import FakeDiscord, World
from tests.openai_test_server import OpenAITestServer, Reply
from tests.services import free_port, redis_server

pytest_plugins = ("tests.fakediscord.fixtures",)

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 90.0  # a cold start imports torch and discord.py on a busy 2-core machine
STOP_TIMEOUT_S = 30.0


@pytest.fixture
def queue_url() -> Iterator[str]:
    """A Redis of its own: the worker uses the default key prefix, so no other test's jobs are seen."""
    with redis_server() as url:
        yield url


@pytest.fixture
async def llm() -> AsyncIterator[OpenAITestServer]:
    async with OpenAITestServer() as server:
        yield server


class Process:
    """A `python -m bot ...` child with its output collected, started in a clean environment."""

    def __init__(self, proc: asyncio.subprocess.Process, metrics_port: int) -> None:
        self.proc, self.metrics_port = proc, metrics_port
        self.output = bytearray()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, command: str, cwd: Path, **settings: str) -> Process:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HERMES_", "DISCORD_"))}
        env.update(settings, HERMES_METRICS_PORT=str(port), HERMES_LOG_LEVEL="INFO")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", command, cwd=cwd, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        return cls(proc, port)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := await self.proc.stdout.read(4096):
            self.output += chunk

    @property
    def log(self) -> str:
        return self.output.decode(errors="replace")

    async def wait_ready(self) -> None:
        """Poll /readyz until it answers 200 (the process's own idea of ready)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        async with aiohttp.ClientSession() as session:
            while True:
                assert self.proc.returncode is None, f"exited early:\n{self.log}"
                assert time.monotonic() < deadline, f"never ready:\n{self.log}"
                try:
                    async with session.get(f"http://127.0.0.1:{self.metrics_port}/readyz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)

    async def stop(self) -> tuple[int, float]:
        """SIGTERM; returns the exit status and how long the process took to exit."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise AssertionError(f"still running {STOP_TIMEOUT_S}s after SIGTERM:\n{self.log}") from None
        await self._reader
        return code, time.monotonic() - started

    async def wait_exit(self) -> int:
        """The exit status of a process that ends by itself (within STOP_TIMEOUT_S)."""
        try:
            code = await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            raise AssertionError(f"still running after {STOP_TIMEOUT_S}s:\n{self.log}") from None
        await self._reader
        return code

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self._reader.cancel()


def job(conversation: str) -> GenerationJob:
    return GenerationJob(conversation_key=conversation, persona_id="hermes", messages=[{"role": "user", "content": "hi"}])


async def read_deltas(queue: RedisStreamsQueue, job_id: str, until: int) -> str:
    """The text of the first `until` deltas of a job (then stop reading; the job may go on)."""
    text, seen = "", 0
    async for _, event in queue.stream(job_id):
        assert isinstance(event, TextDelta), event
        assert event.seq == seen
        text, seen = text + event.text, seen + 1
        if seen == until:
            return text
    raise AssertionError("stream ended early")


async def test_worker_sigterm_finishes_short_jobs_hands_back_long_ones_and_takes_no_new(
    queue_url: str, llm: OpenAITestServer, tmp_path: Path
) -> None:
    short_text = "The quick brown fox jumps over the lazy dog."  # 15 chunks, 0.1 s apart: done in ~1.5 s
    long_text = "abcdefghijklmnopqrstuvwxyz0123456789"  # 18 chunks, 1 s apart: outlives the 3 s grace period
    llm.script(Reply(short_text, chunk_chars=3, delay_s=0.1), Reply(long_text, chunk_chars=2, delay_s=1.0))
    settings = Settings(queue_url=queue_url, queue_claim_idle_ms=600_000)
    queue = RedisStreamsQueue(settings)
    worker = await Process.start(
        "worker", tmp_path, HERMES_QUEUE_URL=queue_url, HERMES_ENGINE="openai",
        HERMES_OPENAI_BASE_URL=llm.base_url, HERMES_MODEL="test-model", HERMES_QUEUE_CLAIM_IDLE_MS="600000",
        HERMES_SHUTDOWN_GRACE_S="3",
    )
    try:
        await worker.wait_ready()
        short, long, late = job("c-short"), job("c-long"), job("c-late")
        await queue.submit(short)
        await read_deltas(queue, short.job_id, until=1)
        await queue.submit(long)
        long_seen = await read_deltas(queue, long.job_id, until=1)

        stopping = asyncio.create_task(worker.stop())
        await asyncio.sleep(1.0)  # well past the worker's fetch poll: it must not take this one
        await queue.submit(late)

        short_events = [event async for _, event in queue.stream(short.job_id)]
        assert "".join(e.text for e in short_events if isinstance(e, TextDelta)) == short_text
        assert isinstance(short_events[-1], Done) and short_events[-1].finish_reason == "stop"

        code, took = await stopping
    finally:
        await worker.kill()
    assert code == 0, worker.log
    assert took < 20, f"took {took:.1f}s to stop"
    assert "worker stopped" in worker.log
    assert "Traceback" not in worker.log and "Unclosed" not in worker.log, worker.log
    assert len(llm.requests) == 2, "the job submitted after SIGTERM reached the engine"

    # What is left in the queue: the long job handed back (resumable), the late one never started.
    try:
        deliveries = {d.job.job_id: d for d in await queue.fetch(2, block_ms=1000)}
        assert set(deliveries) == {long.job_id, late.job_id}
        handed_back = deliveries[long.job_id]
        assert handed_back.attempt == 2
        assert handed_back.resume_text.startswith(long_seen) and long_text.startswith(handed_back.resume_text)
        assert handed_back.next_seq == len(handed_back.resume_text) // 2
        assert deliveries[late.job_id].attempt == 1
    finally:
        await queue.close()


async def start_bot(fake: FakeDiscord, llm: OpenAITestServer, tmp_path: Path) -> Process:
    """`hermes-bot run` on the embedded defaults (SQLite, memory:// queue, in-process worker)."""
    bot = await Process.start(
        "run", tmp_path, DISCORD_TOKEN=fake.token, HERMES_DISCORD_API_BASE=fake.api_base,
        HERMES_DISCORD_GATEWAY_URL=fake.gateway_url, HERMES_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/hermes.db",
        HERMES_QUEUE_URL="memory://", HERMES_ENGINE="openai", HERMES_OPENAI_BASE_URL=llm.base_url,
        HERMES_MODEL="test-model", HERMES_PERSONAS_DIR=str(ROOT / "personas"),
    )
    try:
        await bot.wait_ready()
    except BaseException:
        await bot.kill()
        raise
    return bot


async def test_bot_sigterm_closes_discord_database_and_exits(
    fake_discord: FakeDiscord, discord_world: World, llm: OpenAITestServer, tmp_path: Path
) -> None:
    bot = await start_bot(fake_discord, llm, tmp_path)
    try:
        (session,) = fake_discord.sessions
        code, took = await bot.stop()
    finally:
        await bot.kill()
    assert code == 0, bot.log
    assert took < 15, f"took {took:.1f}s to stop"
    # A close frame from discord.py (1000, or its resumable 4000), not a dropped connection (1006/None).
    assert session.ws.close_code in (1000, 4000), f"gateway not closed by the client: {session.ws.close_code}"
    # SQLite removes the write-ahead log when the last connection closes cleanly.
    assert (tmp_path / "hermes.db").is_file() and not (tmp_path / "hermes.db-wal").exists()
    assert "Traceback" not in bot.log and "Unclosed" not in bot.log, bot.log


@pytest.mark.parametrize(
    ("close_code", "status", "says"),
    [
        (4014, 2, "Privileged Gateway Intents > Message Content Intent"),
        (4004, 2, "Discord rejected the token"),
        (4011, 1, "with code 4011; this bot is in too many servers for HERMES_SHARD_COUNT"),
    ],
)
async def test_bot_exits_with_an_error_when_discord_ends_the_session(
    fake_discord: FakeDiscord, discord_world: World, llm: OpenAITestServer, tmp_path: Path,
    close_code: int, status: int, says: str,
) -> None:
    """A session Discord ends for good after READY stops `hermes-bot run` with an error status and a
    line saying what to fix, not a silent exit 0 (a supervisor would not know to alert or restart)."""
    bot = await start_bot(fake_discord, llm, tmp_path)
    try:
        await fake_discord.end_sessions(close_code, "ended by the test")
        code = await bot.wait_exit()
    finally:
        await bot.kill()
    assert code == status, bot.log
    assert says in bot.log
    assert "Traceback" not in bot.log, bot.log


async def run_until_it_exits(tmp_path: Path, **settings: str) -> tuple[int, str]:
    """`hermes-bot run` on the embedded defaults plus `settings`, expected to stop by itself: (status, log)."""
    bot = await Process.start(
        "run", tmp_path, HERMES_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/hermes.db",
        HERMES_QUEUE_URL="memory://", HERMES_PERSONAS_DIR=str(ROOT / "personas"), **settings,
    )
    try:
        return await bot.wait_exit(), bot.log
    finally:
        await bot.kill()


async def test_bot_exits_with_an_error_when_its_model_does_not_load(
    fake_discord: FakeDiscord, discord_world: World, tmp_path: Path
) -> None:
    """On memory:// the worker runs inside `hermes-bot run`: a model that cannot load must stop the bot
    with the reason, not leave it online (and ready) answering nothing."""
    code, log = await run_until_it_exits(
        tmp_path, DISCORD_TOKEN=fake_discord.token, HERMES_DISCORD_API_BASE=fake_discord.api_base,
        HERMES_DISCORD_GATEWAY_URL=fake_discord.gateway_url, HERMES_ENGINE="transformers",
        HERMES_MODEL=str(tmp_path / "no-such-model"), HF_HUB_OFFLINE="1",
    )
    assert code == 1, log
    assert f"the model cannot serve replies: HERMES_MODEL {tmp_path / 'no-such-model'}: no such directory" in log
    assert "Traceback" not in log, log


async def test_bot_that_cannot_reach_discord_says_so_in_one_line(tmp_path: Path) -> None:
    code, log = await run_until_it_exits(
        tmp_path, DISCORD_TOKEN="x" * 59, HERMES_DISCORD_API_BASE=f"http://127.0.0.1:{free_port()}/api/v10",
        HERMES_ENGINE="openai", HERMES_OPENAI_BASE_URL="http://127.0.0.1:9/v1", HERMES_MODEL="test-model",
    )
    assert code == 1, log
    assert "cannot reach Discord: Cannot connect to host 127.0.0.1" in log
    assert "Traceback" not in log, log


async def test_bot_sigterm_finishes_the_reply_in_flight(
    fake_discord: FakeDiscord, discord_world: World, llm: OpenAITestServer, tmp_path: Path
) -> None:
    text = "Hello Alice, this reply takes a couple of seconds to stream."
    llm.script(Reply(text, chunk_chars=4, delay_s=0.15))
    w = discord_world
    bot = await start_bot(fake_discord, llm, tmp_path)
    try:
        await fake_discord.send_message(w.general, w.alice, f"<@{fake_discord.bot_user.id}> hi")
        await fake_discord.wait_for_message(w.general, lambda m: m.webhook_id is not None, timeout=20)
        code, _ = await bot.stop()
    finally:
        await bot.kill()
    assert code == 0, bot.log
    assert [m.content for m in fake_discord.bot_messages(w.general)] == [text]
    assert "Traceback" not in bot.log, bot.log
