"""`hermes-bot prompt`: show the exact prompt the model would receive for a conversation on stdin."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from bot.config import TOKENIZER_FILES, Settings, local_model_dir
from bot.engine.hub import cache_only, offline_hub
from bot.personas import PersonaRegistry
from bot.prompt import (
    ChatTurn,
    build_messages,
    encode_messages,
    quiet_overlong_warning,
    render_text,
    stop_strings,
)

_MAX_SANE_CONTEXT = 10_000_000  # tokenizers without a limit report ~1e30


class ConversationInputError(ValueError):
    """The JSON on stdin is not a conversation; says which entry and why."""


def parse_conversation(raw: str, persona_name: str) -> list[ChatTurn]:
    """Turns from `[{"author": name, "content": text}, ...]` or `[{"role": r, "content": text}, ...]`."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConversationInputError(f"stdin: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from None
    if not isinstance(data, list):
        raise ConversationInputError("stdin: expected a JSON list of {author|role, content} objects")
    turns = []
    for index, entry in enumerate(data):
        where = f"stdin: entry {index}"
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise ConversationInputError(f"{where}: needs a string 'content'")
        role, author = entry.get("role"), entry.get("author")
        if role is not None and role not in ("user", "assistant", "system"):
            raise ConversationInputError(f"{where}: 'role' must be user, assistant or system (got {role!r})")
        if author is not None and not isinstance(author, str):
            raise ConversationInputError(f"{where}: 'author' must be a string")
        if role is None and author is None:
            raise ConversationInputError(f"{where}: needs 'author' or 'role'")
        if role is None:
            role = "assistant" if author == persona_name else "user"
        turns.append(ChatTurn(role=role, content=entry["content"], author=author if role == "user" else None))
    return turns


def load_tokenizer(model: str, *, setting: str = "--model") -> Any:
    """The model's own tokenizer (HF id or local path), with an actionable error when it cannot load. A hub
    id is read from the local cache alone when the hub does not answer, as the engine does (`cache_only`);
    `setting` is where `model` came from, for that error."""
    from transformers import AutoTokenizer

    try:
        local = local_model_dir(model, TOKENIZER_FILES)
    except ValueError as exc:
        raise ConversationInputError(f"cannot load the tokenizer of {model!r}: {exc}") from None
    offline = local is None and cache_only(model, setting=setting, needs=TOKENIZER_FILES)
    try:
        with offline_hub(offline):
            tokenizer = AutoTokenizer.from_pretrained(str(local or model))
    except (OSError, ValueError) as exc:
        raise ConversationInputError(
            f"cannot load the tokenizer of {model!r}: {str(exc).splitlines()[0]} "
            "(use a local path, or a Hugging Face id with network access or a filled cache)"
        ) from None
    quiet_overlong_warning()
    return tokenizer


def context_window(tokenizer: Any, settings: Settings) -> int:
    limit = int(getattr(tokenizer, "model_max_length", 0) or 0)
    return min(settings.context_tokens, limit) if 0 < limit < _MAX_SANE_CONTEXT else settings.context_tokens


def render_prompt_from_stdin(
    settings: Settings, *, persona_id: str, model: str, as_tokens: bool, stdin: TextIO | None = None
) -> int:
    """Print the prompt; bad personas, input or tokenizers raise errors that name what is wrong."""
    registry = PersonaRegistry.load(settings.personas_dir)
    persona = registry.get(persona_id)
    source = stdin or sys.stdin
    if source.isatty():  # typed by hand: say what it waits for instead of hanging silently
        print('hermes-bot: reading the conversation as JSON on stdin ([{"author": "alice", "content": "hi"}]), '
              "then Ctrl-D", file=sys.stderr)
    turns = parse_conversation(source.read(), persona.name)
    tokenizer = load_tokenizer(model, setting="HERMES_MODEL" if model == settings.model else "--model")
    names = {p.id: p.name for p in registry}
    messages = build_messages(persona, turns, persona_names=names)
    encoded = encode_messages(
        tokenizer, messages, context_tokens=context_window(tokenizer, settings),
        max_new_tokens=persona.sampling.max_new_tokens,
    )
    if as_tokens:
        print(json.dumps(encoded.ids))
    else:
        sys.stdout.write(render_text(tokenizer, encoded.messages))
    if encoded.dropped:
        print(f"hermes-bot: {encoded.dropped} oldest turn(s) dropped to fit the token budget", file=sys.stderr)
    if encoded.truncated_newest:
        print("hermes-bot: the newest turn alone is too long: its beginning was cut to fit", file=sys.stderr)
    stops = stop_strings(persona, turns, persona_names=names)
    if stops:
        print(f"hermes-bot: stop strings: {json.dumps(stops)}", file=sys.stderr)
    return 0
