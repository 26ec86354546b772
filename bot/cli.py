"""`hermes-bot` command line: one subcommand per entry point of the DESIGN.md contract.

Each command imports its module lazily, so `hermes-bot personas list` does not pay for torch.
Expected failures (bad settings, bad persona files, missing token) print one clear message and
exit with status 2; they never end in a traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from bot.config import Settings, SettingsError, load_settings
from bot.engine.base import EngineError
from bot.personas import PersonaError, UnknownPersona
from bot.prompt import PromptTooLong
from bot.prompt_cli import ConversationInputError
from bot.queue.base import QueueUnavailable
from bot.store.db import StoreUnavailable, UnknownSchema, sqlite_file, unavailable_on_open
from bot.store.keys import ConversationKey


class UsageError(Exception):
    """An error the user can fix; printed without a traceback."""


# Errors whose message is the whole story: printed as one line, exit status 2.
USER_ERRORS = (
    UsageError, PersonaError, UnknownPersona, ConversationInputError, PromptTooLong, QueueUnavailable, UnknownSchema,
)


def _cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    if settings.discord_token is None or not settings.discord_token.get_secret_value().strip():
        raise UsageError(
            "DISCORD_TOKEN is not set. Put your bot token in the environment or in .env "
            "(DISCORD_TOKEN=...), then run `hermes-bot run` again.\n"
            "To try a persona without Discord, run `hermes-bot chat --persona hermes`."
        )
    from bot.discord.app import run_bot

    return run_bot(settings)


def _cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from bot.health import check_at_start
    from bot.worker import run_worker

    if settings.queue_url != "memory://":  # on memory://, run_worker says why a worker needs Redis
        asyncio.run(check_at_start(settings, runs_engine=True))
    return run_worker(settings)


def _cmd_chat(args: argparse.Namespace, settings: Settings) -> int:
    from bot.console import run_chat

    return run_chat(settings, persona_id=args.persona)


def _cmd_personas(args: argparse.Namespace, settings: Settings) -> int:
    from bot.personas import PersonaRegistry, claim_id, load_persona_file, persona_files, personas_directory

    if args.action == "import":
        return _import_card(Path(args.card), settings.personas_dir, persona_id=args.id, force=args.force)
    if args.action == "validate":
        paths = persona_files([Path(p) for p in args.paths] or [personas_directory(settings.personas_dir)])
        failures, seen = 0, {}
        for path in paths:
            try:
                persona = load_persona_file(path)
                claim_id(seen, persona, path)
                print(f"ok    {path} ({persona.id}: {persona.name})")
            except PersonaError as exc:
                failures += 1
                for line in exc.lines:
                    print(f"error {line}")
        if not paths:
            raise UsageError("no persona files found")
        return 1 if failures else 0
    registry = PersonaRegistry.load(settings.personas_dir)
    if args.action == "list":
        for persona in registry:
            default = " (default)" if persona.id == settings.default_persona else ""
            print(f"{persona.id:<16} {persona.name:<20} {persona.description}{default}")
        return 0
    persona = registry.get(args.id)
    import yaml

    # Without its id (the file name gives one): saved as personas/<new id>.yaml, the copy is a persona of its own.
    fields = persona.model_dump(exclude_none=True, exclude={"id"})
    print(yaml.safe_dump(fields, sort_keys=False, allow_unicode=True), end="")
    return 0


def _import_card(card_path: Path, directory: Path, *, persona_id: str | None, force: bool) -> int:
    """Write a character card as `directory/<id>.yaml`, only once it validates as a persona. A directory that does
    not exist yet starts as a copy of the bundled personas, so the default persona stays there (a folder holding
    only the card stopped `run` with "HERMES_DEFAULT_PERSONA: unknown persona")."""
    from bot.character_cards import CardError, card_to_persona, persona_yaml, read_card
    from bot.personas import (
        PERSONA_ID_PATTERN,
        PERSONA_SUFFIXES,
        PersonaError,
        bundled_personas_dir,
        load_persona_file,
        parse_persona,
        persona_files,
        persona_id_for,
    )

    if persona_id is not None and not re.fullmatch(PERSONA_ID_PATTERN, persona_id):
        raise UsageError(f"--id {persona_id!r}: use lowercase letters, digits, '_' and '-' (up to 64)")
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{directory} (HERMES_PERSONAS_DIR) is not a folder; set it to the folder of the persona files")
    try:
        card = read_card(card_path)
    except CardError as exc:
        raise UsageError(str(exc)) from None
    persona = card_to_persona(card)
    new_id = persona_id or persona_id_for(persona["name"], fallback=card_path.stem)
    target = directory / f"{new_id}.yaml"
    seed = None if directory.is_dir() else bundled_personas_dir()
    existing = seed or directory  # the folder whose ids the new persona must not take
    if (target.exists() or (existing / target.name).exists()) and not force:
        raise UsageError(f"{target} exists; pass --force to replace it, or --id to import under another id")
    for other in persona_files([existing]) if existing.is_dir() else []:  # e.g. luna.yml, or a file with `id: luna`
        try:
            taken = load_persona_file(other).id == new_id and other.name != target.name
        except PersonaError:
            continue
        if taken:
            raise UsageError(f"{other} already has the id {new_id!r}; pass --id to import under another id")
    text = persona_yaml(persona, card_path)
    imported = parse_persona(text, target)  # a PersonaError names the field before anything is written
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if seed is not None:
            for source in sorted(p for p in seed.iterdir() if p.suffix in PERSONA_SUFFIXES):
                shutil.copyfile(source, directory / source.name)
            print(f"created {directory}/ with the bundled personas, to edit or remove as you like")
        target.write_text(text, encoding="utf-8")
    except OSError as exc:  # a file where a parent folder should be, no permission
        raise UsageError(f"cannot write {exc.filename or target}: {exc.strerror or exc}") from None
    print(f"imported {imported.name!r} as persona {imported.id}: {target}")
    return 0


def _cmd_prompt(args: argparse.Namespace, settings: Settings) -> int:
    from bot.prompt_cli import render_prompt_from_stdin

    return render_prompt_from_stdin(
        settings, persona_id=args.persona, model=args.model or settings.model, as_tokens=args.tokens
    )


def _cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "upgrade":
        from bot.store.migrate import upgrade

        with unavailable_on_open(settings.database_url):
            upgrade(settings.database_url)
        print(f"database at head: {settings.database_url.split('@')[-1]}")
        return 0
    import asyncio

    return asyncio.run(_db_records(args, settings))


async def _db_records(args: argparse.Namespace, settings: Settings) -> int:
    """`db export` and `db forget-user`: what an operator needs to answer a data request."""
    import json

    from bot.store.repository import ConversationStore

    path = sqlite_file(settings.database_url)
    if path is not None and not path.is_file():  # opening it would create an empty file there
        what = "is a folder, not a SQLite file" if path.is_dir() else "does not exist"
        raise UsageError(
            f"the database file {path} (HERMES_DATABASE_URL) {what}; check the path (a relative one "
            f"starts at the working directory, {Path.cwd()})"
        )
    store = await ConversationStore.open(settings.database_url)
    try:
        if args.action == "export":
            record = await store.export(args.key)
            if record is None:
                raise UsageError(
                    f"no conversation is stored under {args.key}; keys are g<guild>/c<channel>, "
                    "g<guild>/c<parent channel>/t<thread> for a thread, or dm/c<channel>"
                )
            print(json.dumps(record, indent=2, ensure_ascii=False))
        else:
            erased = await store.forget_user(args.user_id)
            print(f"erased {erased} message{'' if erased == 1 else 's'} of user {args.user_id}")
    finally:
        await store.close()
    return 0


def _cmd_queue(args: argparse.Namespace, settings: Settings) -> int:
    if settings.queue_url == "memory://":
        raise UsageError(
            "the in-process queue (HERMES_QUEUE_URL=memory://) keeps its dead letters inside the bot's own "
            "process; set HERMES_QUEUE_URL to the Redis that the bot and workers use"
        )
    import asyncio

    return asyncio.run(_print_dead_letters(settings, args.count))


async def _print_dead_letters(settings: Settings, count: int) -> int:
    """One JSON line per dead-lettered job, oldest first: what an operator looks at after errors."""
    from bot.health import check_at_start
    from bot.queue.factory import open_queue

    await check_at_start(settings, runs_engine=False)
    queue = open_queue(settings)
    try:
        for job in await queue.dead_letters(count):
            print(job.model_dump_json())
    finally:
        await queue.close()
    return 0


def _conversation_key(text: str) -> ConversationKey:
    try:
        return ConversationKey.from_str(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cmd_dev(args: argparse.Namespace, settings: Settings) -> int:
    from bot.devtools import write_tiny_model

    path = Path(args.path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path} is a file; give a new or empty folder for the model")
    if path.is_dir() and any(path.iterdir()):
        raise UsageError(f"{path} is not empty; give a new or empty folder, so the model mixes with nothing else")
    try:
        write_tiny_model(
            path, hidden_size=args.hidden_size, layers=args.layers, heads=args.heads,
            kv_heads=args.kv_heads, context=args.context,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:  # a folder it may not create, such as /proc/x
        raise UsageError(f"cannot write the model to {path}: {exc.strerror or exc}") from None
    print(f"tiny model written to {path}")
    return 0


def _positive_int(text: str) -> int:
    """An argparse type: a count or size of at least 1 (0 or less would fail deep inside with a traceback)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hermes-bot", description="Multi-persona chatbot framework for Discord.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("run", help="run the Discord bot (with an in-process worker on memory://)").set_defaults(
        func=_cmd_run
    )
    sub.add_parser("worker", help="run an inference worker that consumes the queue").set_defaults(func=_cmd_worker)
    chat = sub.add_parser("chat", help="talk to a persona in the terminal (same store, queue and engine)")
    chat.add_argument("--persona", help="persona id (default: HERMES_DEFAULT_PERSONA)")
    chat.set_defaults(func=_cmd_chat)

    personas = sub.add_parser("personas", help="list, validate, show or import personas")
    psub = personas.add_subparsers(dest="action", required=True)
    psub.add_parser("list", help="list the personas in HERMES_PERSONAS_DIR")
    validate = psub.add_parser("validate", help="validate persona files (default: HERMES_PERSONAS_DIR)")
    validate.add_argument("paths", nargs="*", help="files or directories")
    show = psub.add_parser("show", help="print one persona as YAML (without its id, so it can be saved under another)")
    show.add_argument("id", help="persona id")
    card = psub.add_parser(
        "import", help="turn a character card (SillyTavern/TavernAI .json or .png, or a .charx) into a persona"
    )
    card.add_argument("card", help="the card file")
    card.add_argument("--id", help="persona id (default: from the character's name)")
    card.add_argument("--force", action="store_true", help="replace a persona file with the same id")
    personas.set_defaults(func=_cmd_personas)

    prompt = sub.add_parser("prompt", help="print the exact model prompt for a conversation read as JSON on stdin")
    prompt.add_argument("--persona", required=True, help="persona id")
    prompt.add_argument("--model", help="tokenizer to use: HF id or local path (default: HERMES_MODEL)")
    prompt.add_argument("--tokens", action="store_true", help="print token ids instead of text")
    prompt.set_defaults(func=_cmd_prompt)

    db = sub.add_parser("db", help="database maintenance")
    dbsub = db.add_subparsers(dest="action", required=True)
    dbsub.add_parser("upgrade", help="apply Alembic migrations up to head")
    export = dbsub.add_parser("export", help="print one conversation's whole record as JSON")
    export.add_argument("key", type=_conversation_key, help="conversation key: g<guild>/c<channel>[/t<thread>] or dm/c<channel>")
    forget = dbsub.add_parser("forget-user", help="erase every message of one Discord user, in every conversation")
    forget.add_argument("user_id", type=int, help="the user's Discord id")
    db.set_defaults(func=_cmd_db)

    queue = sub.add_parser("queue", help="queue inspection")
    queuesub = queue.add_subparsers(dest="action", required=True)
    dead = queuesub.add_parser("dead-letters", help="print the newest dead-lettered jobs as JSON lines")
    dead.add_argument("--count", type=_positive_int, default=20, help="how many (default 20)")
    queue.set_defaults(func=_cmd_queue)

    dev = sub.add_parser("dev", help="developer tools")
    devsub = dev.add_subparsers(dest="action", required=True)
    tiny = devsub.add_parser("tiny-model", help="write a tiny random-weight Mistral with a ChatML tokenizer")
    tiny.add_argument("path", help="a new or empty folder")
    tiny.add_argument("--hidden-size", type=_positive_int, default=64, help="width (default 64; heads x an even size)")
    tiny.add_argument("--layers", type=_positive_int, default=2, help="decoder layers (default 2)")
    tiny.add_argument("--heads", type=_positive_int, default=4, help="attention heads (default 4)")
    tiny.add_argument("--kv-heads", type=_positive_int, default=2, help="key/value heads, dividing --heads (default 2)")
    tiny.add_argument("--context", type=_positive_int, default=4096, help="context length in tokens (default 4096)")
    dev.set_defaults(func=_cmd_dev)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        return int(args.func(args, settings))
    except SettingsError as exc:
        for line in exc.lines:
            print(f"hermes-bot: {line}", file=sys.stderr)
        return 2
    except USER_ERRORS as exc:
        for line in str(exc).splitlines():  # a persona file's problems, one line each
            print(f"hermes-bot: {line}", file=sys.stderr)
        return 2
    except EngineError as exc:  # the model or the OpenAI-compatible server is not usable
        print(f"hermes-bot: {exc}", file=sys.stderr)
        return 1
    except StoreUnavailable as exc:
        first_line = str(exc).splitlines()[0]
        # SQLite's words for a missing table, then PostgreSQL's ('database "x" does not exist' is another story).
        unmigrated = re.search(r"no such table|relation \S+ does not exist", first_line) is not None
        hint = " (a database without the schema: run `hermes-bot db upgrade` first)" if unmigrated else ""
        print(f"hermes-bot: {first_line}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `hermes-bot personas list | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not fail again
        return 1
