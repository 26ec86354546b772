"""Logging for both processes: one logfmt line per event, ids attached, secrets redacted.

Every record becomes one line `ts=... level=... logger=... msg="..." conversation=... job=...`
(newlines in messages and tracebacks are escaped), so `docker compose logs | grep job=abc` finds a
job's whole story. Conversation and job ids come from `log_context(...)` (contextvars, so they follow
an asyncio task) or from `extra={"conversation": ..., "job": ...}` on a single call.

The redaction filter sits on the handler, not on a logger, because records from library loggers
(discord.py, aiohttp) propagate to the root handler without passing the root logger's filters.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from bot.config import Settings

REDACTED = "[REDACTED]"

# Tokens no setting holds, each letting anyone post as the bot (@everyone included): a webhook's and an
# interaction's, which discord.py logs at DEBUG in request URLs (`/webhooks/<id>/<token>`) and in the
# payloads it receives (a created webhook, an INTERACTION_CREATE event: `'token': '...'`, or as JSON).
TOKEN_PATTERNS = (
    re.compile(r"(/(?:webhooks|interactions)/\d+/)[^/?#\s'\"]+"),
    re.compile(r"""((["'])token\2\s*:\s*["'])[^"']+"""),
    re.compile(r"(://[^/@:\s'\"]*:)[^@/\s'\"]+(?=@)"),  # any URL's password, however short (secrets() skips those)
)

# Immutable (a tuple of pairs), so a task can never change the ids its parent logs with.
_context: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar("hermes_log_context", default=())

# Attributes every LogRecord has; anything else on a record came from `extra=` and is printed.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

# Marks the handler configure_logging installed, so a second call replaces only its own.
_OURS = "_hermes_handler"


@contextmanager
def log_context(**ids: object) -> Iterator[None]:
    """Attach ids (e.g. conversation=..., job=...) to every record logged inside this block/task."""
    merged = dict(_context.get()) | {key: str(value) for key, value in ids.items() if value is not None}
    token = _context.set(tuple(merged.items()))
    try:
        yield
    finally:
        _context.reset(token)


class RedactSecrets(logging.Filter):
    """Replaces every secret, and every token TOKEN_PATTERNS finds, in message, args, extras, exception and
    stack text with [REDACTED]."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # Longest first, so a secret that contains another is removed whole.
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        for pattern in TOKEN_PATTERNS:
            text = pattern.sub(rf"\g<1>{REDACTED}", text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # malformed %-args: keep what can be shown rather than lose the record
            message = f"{record.msg!r} args={record.args!r}"
        record.msg, record.args = self.redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        for key, value in list(vars(record).items()):
            if key not in _STANDARD_ATTRS:
                text = value if isinstance(value, str) else str(value)
                redacted = self.redact(text)
                if redacted != text:
                    setattr(record, key, redacted)
        return True


class ContextFilter(logging.Filter):
    """Copies the current log_context ids onto the record (explicit `extra=` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def _logfmt_value(value: object) -> str:
    text = str(value)
    if text and all(c.isprintable() and c not in ' "=' for c in text):
        return text
    return json.dumps(text, ensure_ascii=False)


class LogfmtFormatter(logging.Formatter):
    """One `key=value` line per record; values with spaces, quotes or newlines are JSON-quoted."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                fields[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            fields["exc"] = record.exc_text
        if record.stack_info:
            fields["stack"] = record.stack_info
        return " ".join(f"{key}={_logfmt_value(value)}" for key, value in fields.items())


def configure_logging(settings: Settings, stream: Any = None) -> None:
    """Install the root handler (stderr by default); calling it again replaces the one it installed.

    Context ids are added before redaction, so a secret cannot slip in through them either.
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactSecrets(settings.secrets()))
    setattr(handler, _OURS, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # one line per scrape is noise
    logging.captureWarnings(True)
