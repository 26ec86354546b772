"""`hermes-bot chat`: talk to a persona in the terminal through the same store, queue and engine as Discord.

Lines are read from stdin (a pipe works: EOF ends the chat); `/reset` clears this conversation's
history, `/quit` or `/exit` leaves, `/help` lists these; another single `/word` (letters only) is an unknown command, not a message. Replies stream to stdout as they are generated; the banner, notices and
errors go to stderr, so `echo hi | hermes-bot chat > reply.txt` captures only the conversation.

With `HERMES_QUEUE_URL=memory://` (the default) a worker runs in this process; with redis:// the
chat is answered by whatever `hermes-bot worker`s serve that queue. Each persona has its own terminal
conversation (a DM-style key derived from the persona id), so history survives between sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import signal
import sys
import zlib

from bot.config import Settings, without_password
from bot.conversation import ChatService
from bot.daemon_thread import in_daemon_thread
from bot.engine.base import EngineError
from bot.personas import Persona, PersonaRegistry
from bot.prompt import without_own_name
from bot.queue.base import JobQueue, QueueBusy
from bot.queue.jobs import Done, ErrorEvent, TextDelta
from bot.store.keys import ConversationKey
from bot.worker import Worker

USER_NAME = "you"
COMMANDS = "/reset clears the history, /quit (or /exit) leaves, /help shows this."


def console_key(persona_id: str) -> ConversationKey:
    """The terminal conversation of one persona: stable across runs, never a real Discord channel id."""
    return ConversationKey(guild_id=None, channel_id=zlib.crc32(f"console:{persona_id}".encode()))


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_chat(settings: Settings, persona_id: str | None) -> int:
    """The `hermes-bot chat` entry point (`persona_id` None: HERMES_DEFAULT_PERSONA's); returns the exit status."""
    personas = PersonaRegistry.load(settings.personas_dir)  # its errors are reported by cli.main
    if persona_id is None:
        persona = personas.get(settings.default_persona, named_by="HERMES_DEFAULT_PERSONA")
    else:
        persona = personas.get(persona_id, named_by="--persona")
    handler, interrupted = signal.getsignal(signal.SIGINT), False
    try:
        return asyncio.run(_chat(settings, personas, persona))
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if not interrupted:  # after Ctrl-C the process is on its way out: a press during that printed a traceback
            signal.signal(signal.SIGINT, handler)


async def _chat(settings: Settings, personas: PersonaRegistry, persona: Persona) -> int:
    from bot.health import check_at_start
    from bot.queue.factory import open_queue
    from bot.store.migrate import open_at_head

    in_process = settings.queue_url == "memory://"
    await check_at_start(settings, runs_engine=in_process)
    store = await open_at_head(settings.database_url)
    queue = open_queue(settings)
    worker: Worker | None = None
    worker_task: asyncio.Task[None] | None = None
    try:
        if in_process:
            if settings.engine == "transformers":  # the openai engine loads nothing
                _note(f"loading {settings.model} ...")
            worker = Worker.in_process(settings, queue)
            worker_task = asyncio.create_task(worker.run())
            started = asyncio.create_task(worker.started.wait())
            await asyncio.wait({started, worker_task}, return_when=asyncio.FIRST_COMPLETED)
            if worker_task.done():
                started.cancel()
                worker_task.result()  # raises the engine's start error
            if settings.engine == "openai" and not await worker.ready():  # every reply would fail, stored unanswered
                raise EngineError(
                    f"the OpenAI-compatible server at {without_password(settings.openai_base_url)} does not answer "
                    "(HERMES_OPENAI_BASE_URL); start it, or check the URL"
                )
        service = ChatService(settings, store, queue, personas)
        await _converse(service, queue, persona)
    finally:
        if worker is not None and worker_task is not None and not worker_task.done():
            if worker.started.is_set():
                _ignore_further_interrupts()
                await worker.shutdown()
                await worker_task
            else:  # Ctrl-C while the model loads (a 7B download): its daemon thread is left behind, not waited for
                worker_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await worker_task
        await queue.close()
        await store.close()
    return 0


def _ignore_further_interrupts() -> None:
    """Once a chat whose model runs is stopping (Ctrl-C, EOF, /quit), Ctrl-C again is ignored until the process is gone:
    a second press ended it while the in-process engine's thread was inside torch, which aborts the
    interpreter ("terminate called without an active exception"). The stop takes a second or two."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


async def _converse(service: ChatService, queue: JobQueue, persona: Persona) -> None:
    key = console_key(persona.id)
    _note(f"Chatting with {persona.name} ({persona.id}). {COMMANDS}")
    if await service.store.window(key, 1):
        _note("(continuing the conversation from last time)")
    elif persona.greeting:  # kept as the persona's first turn, as in a Discord channel: the model sees it
        print(f"{persona.name}: {persona.greeting}", flush=True)
        await service.store_reply(key, persona, persona.greeting)
    if isinstance(sys.stdin, io.TextIOWrapper):  # a mistyped byte must not end the chat with a traceback
        sys.stdin.reconfigure(errors="replace")
    while True:
        line = await in_daemon_thread(sys.stdin.readline, name="hermes-stdin")
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            await service.store.reset(key)
            _note("(history cleared)")
            continue
        if re.fullmatch(r"/[A-Za-z]+", text):  # a mistyped command must not reach the persona ("/10" may)
            _note(COMMANDS if text == "/help" else f"(unknown command {text}; /help lists them)")
            continue
        await service.record_user_turn(key, message_id=None, author_id=None, author_name=USER_NAME, content=text)
        reply = await _reply(service, key, persona)
        if reply:
            await service.store_reply(key, persona, reply)


async def _reply(service: ChatService, key: ConversationKey, persona: Persona) -> str:
    """Stream one reply to stdout; returns its text ("" when it failed). "Mira Vance: " is printed here before
    the reply, so a label of the persona's own name that the model starts with ("Mira Vance: ...") is neither
    printed again nor returned to be stored."""
    try:
        pending = await service.start_reply(key, persona)
    except QueueBusy as exc:
        _note(str(exc))
        return ""
    if pending.position > 1:
        _note(f"(you are number {pending.position} in line)")
    print(f"{persona.name}: ", end="", flush=True)
    raw, shown = "", ""
    try:
        async for event in pending.events():
            if isinstance(event, TextDelta):
                raw += event.text
                shown = _show(without_own_name(raw, persona.name, partial=True), shown)
            elif isinstance(event, ErrorEvent):
                print(flush=True)
                _note(f"(error: {event.message})")
                return ""
            elif isinstance(event, Done) and event.finish_reason in ("cancelled", "deadline"):
                _note(f"({event.finish_reason})")
    except asyncio.CancelledError:  # Ctrl-C: the worker's shutdown must not wait for this reply to end
        _ignore_further_interrupts()
        with contextlib.suppress(Exception):
            await pending.cancel()
        raise
    shown = _show(without_own_name(raw, persona.name), shown)  # a reply that is just "Mira" held back till now
    print(flush=True)
    return shown


def _show(text: str, shown: str) -> str:
    """Print what `text` adds to the `shown` text before it (a terminal takes nothing back); returns `text`."""
    print(text[len(shown) :], end="", flush=True)
    return text
