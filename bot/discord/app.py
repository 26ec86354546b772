"""The Discord bot's lifecycle: store, queue, in-process worker, discord.py client, ops server.

`BotApp` starts and stops everything inside the caller's event loop (tests use it as
`async with BotApp(settings) as app`); `run_bot` is `hermes-bot run`. The REST base and gateway URL
come from settings when set, which is how REST proxies and the tests' fake Discord are reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import aiohttp
import discord
import yarl
from discord.ext import commands

from bot.config import Settings
from bot.conversation import ChatService
from bot.discord.chat import ChatCog
from bot.discord.commands import CommandsCog
from bot.discord.identity import SAFE_MENTIONS, Identities
from bot.discord.sync import sync_if_changed
from bot.engine.base import EngineError
from bot.health import check_at_start, serve_ops
from bot.personas import PersonaRegistry
from bot.queue.base import JobQueue
from bot.queue.factory import open_queue
from bot.store.migrate import open_at_head
from bot.store.repository import ConversationStore

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0
# discord.py identifies its shards one after another, 5 s apart (Discord's identify rate limit): READY
# for all of them takes that long on top.
SHARD_IDENTIFY_S = 5.0


def point_discord_at(settings: Settings) -> None:
    """Send REST and gateway traffic to the configured URLs (a proxy, or a local test server)."""
    if settings.discord_api_base:
        discord.http.Route.BASE = settings.discord_api_base.rstrip("/")
    if settings.discord_gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)


def intents() -> discord.Intents:
    wanted = discord.Intents.none()
    wanted.guilds = wanted.guild_messages = wanted.dm_messages = wanted.message_content = True
    return wanted


# The bot never joins voice: discord.py's start-up warnings that voice will not work say nothing to its users.
discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False


class HermesBot(commands.AutoShardedBot):
    """A discord.py bot with the chat and command cogs; it has no prefix commands.

    Auto-sharded: it runs the shards Discord recommends (one below 2,500 servers), or
    HERMES_SHARD_IDS of HERMES_SHARD_COUNT when several bot processes share one token.
    """

    def __init__(self, settings: Settings, chat: ChatService, **options: Any) -> None:
        super().__init__(
            command_prefix=[], intents=intents(), allowed_mentions=SAFE_MENTIONS, help_command=None,
            shard_count=settings.shard_count, shard_ids=settings.shard_ids, **options,
        )
        self.settings, self.chat_service = settings, chat

    async def setup_hook(self) -> None:
        chat = ChatCog(self, self.settings, self.chat_service, Identities())
        await self.add_cog(chat)
        await self.add_cog(CommandsCog(self, self.settings, chat))
        await sync_if_changed(self.tree)

    async def on_message(self, message: discord.Message, /) -> None:
        """No prefix commands: the chat cog's listener handles messages."""


class BotApp:
    """Everything `hermes-bot run` runs, started and stopped in the current event loop."""

    def __init__(self, settings: Settings, **client_options: Any) -> None:
        """`client_options` go to discord.py's client (tests pass a short guild_ready_timeout)."""
        self.settings, self.client_options = settings, client_options
        self.bot: HermesBot | None = None
        self.store: ConversationStore | None = None
        self.queue: JobQueue | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.connection: asyncio.Task[None] | None = None  # ends when the gateway connection does
        self.worker_task: asyncio.Task[None] | None = None  # the in-process worker (memory://); ends if it fails
        self._closers: list[Callable[[], Awaitable[object]]] = []

    async def start(self) -> None:
        settings = self.settings
        if settings.discord_token is None:
            raise ValueError("DISCORD_TOKEN is not set")
        point_discord_at(settings)
        personas = PersonaRegistry.load(settings.personas_dir)
        personas.get(settings.default_persona, named_by="HERMES_DEFAULT_PERSONA")
        in_process = settings.queue_url == "memory://"
        await check_at_start(settings, runs_engine=in_process)  # before logging in, as everything up to _connect
        self.store = await open_at_head(settings.database_url)
        self._closers.append(self.store.close)
        self.queue = open_queue(settings)
        self._closers.append(self.queue.close)
        checks = {"database": self.store.ping, "queue": self.queue.ping}
        if in_process:
            from bot.worker import Worker

            worker = Worker.in_process(settings, self.queue)
            self.worker_task = asyncio.create_task(worker.run())
            self._tasks.append(self.worker_task)
            self._closers.append(worker.shutdown)
            checks["model"] = worker.ready
        self.bot = HermesBot(settings, ChatService(settings, self.store, self.queue, personas), **self.client_options)
        # Before connecting: a port another process holds is told at once, and /readyz says "not ready" meanwhile.
        ops = await serve_ops(settings, {"discord": self.bot.is_ready, **checks})
        if ops is not None:
            self._closers.append(ops.close)
        self._closers.append(self.bot.close)  # discord.py fails to close a client that never began to connect
        try:
            await self._connect(settings)
        except (discord.HTTPException, aiohttp.ClientError, OSError) as exc:  # TimeoutError included
            raise DiscordUnreachable(f"cannot reach Discord: {str(exc) or type(exc).__name__}") from exc
        log.info("discord bot ready as %s", self.bot.user)

    async def _connect(self, settings: Settings) -> None:
        """Log in, open the gateway connection and wait for READY."""
        assert self.bot is not None and settings.discord_token is not None
        await self.bot.login(settings.discord_token.get_secret_value())
        self.connection = connection = asyncio.create_task(self.bot.connect())
        self._tasks.append(connection)
        ready = asyncio.create_task(self.bot.wait_until_ready())
        started = time.monotonic()
        while True:
            done, _ = await asyncio.wait({connection, ready}, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            if ready in done:
                return
            # How many shards start is known once discord.py has asked Discord (auto-sharding).
            shards = len(self.bot.shard_ids or ()) or self.bot.shard_count or 1
            allowed = READY_TIMEOUT_S + SHARD_IDENTIFY_S * (shards - 1)
            if connection in done or time.monotonic() - started >= allowed:
                ready.cancel()
                if connection in done:
                    connection.result()  # raises why the gateway connection ended
                raise TimeoutError(f"no READY from the Discord gateway within {allowed:.0f}s ({shards} shards)")

    async def close(self) -> None:
        """Finish replies in flight, then stop in reverse order of start; safe to call twice."""
        chat = self.bot.get_cog("ChatCog") if self.bot is not None else None
        if isinstance(chat, ChatCog) and not await chat.drain(self.settings.shutdown_grace_s):
            log.warning("replies still running after %.0fs; closing anyway", self.settings.shutdown_grace_s)
        while self._closers:
            closer = self._closers.pop()
            try:
                await closer()
            except Exception:
                log.exception("error while shutting down")
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    async def __aenter__(self) -> BotApp:
        try:
            await self.start()
        except BaseException:  # e.g. a refused token: what did start (store, queue, worker) is stopped too
            await self.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class GatewayEnded(RuntimeError):
    """The gateway connection ended without a signal to stop and without an error from Discord."""


class DiscordUnreachable(RuntimeError):
    """Logging in, connecting or waiting for READY failed on the network (or timed out)."""


class WorkerEnded(RuntimeError):
    """The in-process worker stopped without a signal to stop and without an error of its own."""


TOKEN_REJECTED = "Discord rejected the token (DISCORD_TOKEN); check it in the developer portal"
INTENT_REFUSED = (
    "Discord refused the Message Content intent this bot needs to read messages: turn it on in the developer "
    "portal (your application > Bot > Privileged Gateway Intents > Message Content Intent), then start again"
)
CLOSE_CODE_HINTS = {
    4011: "this bot is in too many servers for HERMES_SHARD_COUNT; raise it, or leave it unset",
}


async def _run_until_signal(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT; if the gateway connection or the in-process worker (say, a model that
    does not load) ends first, raise why, so the process exits with an error status that a supervisor
    restarts on or alerts about, instead of a bot that stays online and never answers."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with BotApp(settings) as app:
        assert app.connection is not None
        stopped = asyncio.create_task(stop.wait())
        lifelines = {app.connection, stopped, *([app.worker_task] if app.worker_task else [])}
        done, _ = await asyncio.wait(lifelines, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if stop.is_set():
            return
        if app.worker_task in done:
            app.worker_task.result()  # raises why it failed (EngineError: cannot load HERMES_MODEL=...)
            raise WorkerEnded("the in-process worker stopped")
        app.connection.result()
        raise GatewayEnded("the Discord gateway connection ended")


def run_bot(settings: Settings) -> int:
    """`hermes-bot run`: the bot (and, on memory://, its worker) until SIGTERM/SIGINT.

    Exit status 0 after a signal, 2 when Discord refuses the token or the intents (a setting to fix,
    restarting won't help), 1 when the connection ended for another reason."""
    from bot.logging_setup import configure_logging

    configure_logging(settings)
    try:
        asyncio.run(_run_until_signal(settings))
    except discord.LoginFailure:
        log.error(TOKEN_REJECTED)
        return 2
    except discord.PrivilegedIntentsRequired:
        log.error(INTENT_REFUSED)
        return 2
    except discord.ConnectionClosed as exc:
        if exc.code == 4004:
            log.error(TOKEN_REJECTED)
            return 2
        hint = CLOSE_CODE_HINTS.get(exc.code or 0)
        details = "".join(f"; {part}" for part in (exc.reason, hint) if part)
        log.error("Discord closed the gateway connection with code %s%s", exc.code, details)
        return 1
    except (GatewayEnded, WorkerEnded, DiscordUnreachable) as exc:
        log.error("%s", exc)
        return 1
    except EngineError as exc:
        log.error("the model cannot serve replies: %s", exc)
        return 1
    return 0
