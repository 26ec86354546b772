"""The ops server, scraped for real over loopback HTTP: /metrics, /healthz, /readyz."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot import metrics
from bot.config import Settings
from bot.health import OpsServer, readiness_from, serve_ops, start_ops_server

ROOT = Path(__file__).resolve().parent.parent


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.REGISTRY.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


@pytest.fixture
async def ops() -> AsyncIterator[Callable[[Callable[[], Awaitable[dict[str, bool]]]], Awaitable[OpsServer]]]:
    servers: list[OpsServer] = []

    async def start(readiness: Callable[[], Awaitable[dict[str, bool]]]) -> OpsServer:
        server = await start_ops_server(0, readiness, host="127.0.0.1")
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


async def get(port: int, path: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}") as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


async def always_ready() -> dict[str, bool]:
    return {"queue": True}


async def test_metrics_endpoint_serves_every_helper(ops) -> None:
    server = await ops(always_ready)
    before_tokens = sample("hermes_generated_tokens_total")
    before_gen = sample("hermes_generation_seconds_count")
    before_msg = sample("hermes_discord_events_total", {"type": "message"})
    before_busy = sample("hermes_errors_total", {"kind": "busy"})

    metrics.set_queue_depth(7)
    metrics.observe_job_wait(0.2)
    metrics.observe_first_token(0.05)
    metrics.observe_generation(2.0, completion_tokens=40)
    metrics.set_active_conversations(3)
    metrics.count_discord_event("message")
    metrics.count_discord_event("message")
    metrics.count_error("busy")

    status, content_type, body = await get(server.port, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    scraped = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    assert scraped[("hermes_queue_depth", ())] == 7
    assert scraped[("hermes_active_conversations", ())] == 3
    assert scraped[("hermes_generated_tokens_total", ())] == before_tokens + 40
    assert scraped[("hermes_generation_seconds_count", ())] == before_gen + 1
    assert scraped[("hermes_discord_events_total", (("type", "message"),))] == before_msg + 2
    assert scraped[("hermes_errors_total", (("kind", "busy"),))] == before_busy + 1
    for histogram in ("hermes_job_wait_seconds", "hermes_time_to_first_token_seconds"):
        assert scraped[(f"{histogram}_count", ())] >= 1
    # The 0.05 s first token lands in the 0.05 bucket, not below it.
    assert scraped[("hermes_time_to_first_token_seconds_bucket", (("le", "0.05"),))] >= 1
    assert ("process_cpu_seconds_total", ()) in scraped  # the process collector is served too


async def test_healthz_is_alive_even_when_not_ready(ops) -> None:
    async def nothing_ready() -> dict[str, bool]:
        return {"discord": False}

    server = await ops(nothing_ready)
    status, _, body = await get(server.port, "/healthz")
    assert status == 200
    assert "alive" in body


async def test_readyz_names_each_check(ops) -> None:
    state = {"discord": False, "database": True, "queue": True}

    async def readiness() -> dict[str, bool]:
        return dict(state)

    server = await ops(readiness)
    status, _, body = await get(server.port, "/readyz")
    assert status == 503
    assert '"discord": false' in body and '"database": true' in body

    state["discord"] = True
    status, _, body = await get(server.port, "/readyz")
    assert status == 200
    assert '"ready": true' in body


async def test_readyz_treats_failing_and_hanging_checks_as_not_ready(ops) -> None:
    async def hangs() -> bool:
        await asyncio.sleep(60)
        return True

    def raises() -> bool:
        raise ConnectionError("redis down")

    readiness = readiness_from({"model": lambda: True, "queue": raises, "database": hangs}, timeout_s=0.2)
    server = await ops(readiness)
    status, _, body = await get(server.port, "/readyz")
    assert status == 503
    assert '"model": true' in body
    assert '"queue": false' in body
    assert '"database": false' in body


async def test_readyz_with_no_checks_is_not_ready(ops) -> None:
    async def empty() -> dict[str, bool]:
        return {}

    server = await ops(empty)
    status, _, _ = await get(server.port, "/readyz")
    assert status == 503


async def test_serve_ops_follows_the_metrics_port_setting(unused_tcp_port: int) -> None:
    assert await serve_ops(Settings(metrics_port=None), {"queue": lambda: True}) is None
    server = await serve_ops(Settings(metrics_port=unused_tcp_port), {"queue": lambda: True})
    assert server is not None
    try:
        assert server.port == unused_tcp_port
        status, _, body = await get(server.port, "/readyz")
        assert status == 200 and '"queue": true' in body
    finally:
        await server.close()


@pytest.mark.parametrize("command", ["worker", "run"])
def test_a_metrics_port_another_process_holds_is_one_line_before_connecting(
    command: str, tmp_path: Path, unused_tcp_port: int
) -> None:
    """It ended in a bind traceback, and `run` only said so after logging into Discord and loading the model."""
    env = {
        "PATH": "/usr/bin:/bin", "HERMES_METRICS_PORT": str(unused_tcp_port), "HERMES_ENGINE": "openai",
        "HERMES_OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "HERMES_QUEUE_URL": "redis://127.0.0.1:9/0",
        "HERMES_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/hermes.db", "DISCORD_TOKEN": "not-a-real-bot-token",
        "HERMES_DISCORD_API_BASE": "http://127.0.0.1:9/api/v10",  # nothing listens: it must not get that far
    }
    if command == "run":
        env["HERMES_QUEUE_URL"] = "memory://"
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", unused_tcp_port))
        holder.listen()
        done = subprocess.run([sys.executable, "-m", "bot", command], capture_output=True, text=True, cwd=ROOT,
                              env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    [line] = [line for line in done.stderr.splitlines() if line.startswith("hermes-bot:")]
    assert line.startswith(f"hermes-bot: HERMES_METRICS_PORT {unused_tcp_port}: cannot listen there") and "in use" in line
    assert "Traceback" not in done.stderr and "cannot reach Discord" not in done.stderr
    assert "voice will NOT be supported" not in done.stderr  # discord.py's start-up noise: the bot has no voice
