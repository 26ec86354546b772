"""The operations HTTP server: Prometheus `/metrics`, liveness `/healthz`, readiness `/readyz`; and the checks at start.

It runs on the process's own event loop (aiohttp), so a scrape never needs a thread, and it is
started only when HERMES_METRICS_PORT is set. `/healthz` answers 200 while the loop runs (a wedged
loop is exactly what an orchestrator should restart); `/readyz` answers 200 only when every
readiness check is true and names each check in its JSON body, so an operator sees what is missing.
`check_at_start` stops a process before it says it started on what no retry will mend.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bot.config import Settings, SettingsError, without_password
from bot.metrics import REGISTRY
from bot.queue.base import QueueUnavailable

log = logging.getLogger(__name__)

Readiness = Callable[[], Awaitable[dict[str, bool]]]
Check = Callable[[], bool | Awaitable[bool]]

CHECK_TIMEOUT_S = 2.0
QUEUE_CHECK_TIMEOUT_S = 5.0  # connecting and PING at start; a Redis silent for longer is left to the queue's retries


@dataclass
class OpsServer:
    """A running ops server; `port` is the bound port (useful when started on port 0)."""

    runner: web.AppRunner
    port: int

    async def close(self) -> None:
        await self.runner.cleanup()


def readiness_from(checks: Mapping[str, Check], timeout_s: float = CHECK_TIMEOUT_S) -> Readiness:
    """Build a readiness callable from named checks (sync or async, returning bool).

    A check that raises or takes longer than `timeout_s` counts as not ready, so one dead
    dependency cannot hang or break the probe.
    """

    async def run_one(name: str, check: Check) -> bool:
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await asyncio.wait_for(result, timeout_s)
            return bool(result)
        except Exception as exc:  # a failing dependency is "not ready", never a 500
            log.warning("readiness check failed check=%s error=%r", name, exc)
            return False

    async def readiness() -> dict[str, bool]:
        names = list(checks)
        results = await asyncio.gather(*(run_one(name, checks[name]) for name in names))
        return dict(zip(names, results, strict=True))

    return readiness


def build_app(readiness: Readiness) -> web.Application:
    """The aiohttp application behind start_ops_server (separate so it can be mounted elsewhere)."""

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(_: web.Request) -> web.Response:
        try:
            checks = await readiness()
        except Exception as exc:
            log.warning("readiness probe failed error=%r", exc)
            return web.json_response({"ready": False, "checks": {}, "error": repr(exc)}, status=503)
        ready = bool(checks) and all(checks.values())
        return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def start_ops_server(port: int, readiness: Readiness, host: str = "0.0.0.0") -> OpsServer:
    """Serve /metrics, /healthz and /readyz on host:port (port 0 picks a free one); close() stops it."""
    runner = web.AppRunner(build_app(readiness), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    bound = int(runner.addresses[0][1]) if runner.addresses else port
    log.info("ops server listening host=%s port=%d", host, bound)
    return OpsServer(runner=runner, port=bound)


async def serve_ops(settings: Settings, checks: Mapping[str, Check]) -> OpsServer | None:
    """Start the ops server when HERMES_METRICS_PORT is set (else None): the one call a process makes."""
    if settings.metrics_port is None:
        return None
    try:
        return await start_ops_server(settings.metrics_port, readiness_from(checks))
    except OSError as exc:  # another process has the port: a setting to change, not a traceback
        problem = exc.strerror or str(exc)
        raise SettingsError([f"HERMES_METRICS_PORT {settings.metrics_port}: cannot listen there: {problem}"]) from None


async def check_at_start(settings: Settings, *, runs_engine: bool) -> None:
    """What no retry will mend and can be told without loading the model, as one line, before a process says it
    started: `run` otherwise logged in to Discord first (a restarting service spends Discord's daily identifies),
    and a worker logged "fetching jobs failed" forever. `runs_engine`: the engine runs in this process."""
    if runs_engine:
        from bot.engine import check_settings

        check_settings(settings)
    if settings.queue_url != "memory://":
        await _check_redis(settings.queue_url)


async def _check_redis(url: str) -> None:
    """QueueUnavailable when Redis answers but refuses us: a database index it does not have, a wrong password. One
    that does not answer (yet) passes: the queue retries, and /readyz says so meanwhile."""
    import redis.asyncio as aioredis
    from redis.exceptions import AuthenticationError, AuthorizationError, RedisError, ResponseError

    client = aioredis.from_url(url, socket_connect_timeout=QUEUE_CHECK_TIMEOUT_S, socket_timeout=QUEUE_CHECK_TIMEOUT_S)
    try:
        await client.ping()
    except (AuthenticationError, AuthorizationError, ResponseError) as exc:
        raise QueueUnavailable(f"the Redis at {without_password(url)} (HERMES_QUEUE_URL) refuses us: {exc}") from None
    except (RedisError, OSError):
        pass
    finally:
        await client.aclose()
