"""Logs: one line per event, ids attached, and the bot token / API key never printed."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator

import pytest

from bot.config import Settings
from bot.logging_setup import REDACTED, configure_logging, log_context

# Shaped like real ones: a Discord bot token (three base64url parts) and an OpenAI-style key.
TOKEN = "MTA5ODc2NTQzMjEwOTg3NjU0.GhJk3L.q7XvY2m9pR4sT8wZ1bN6cD0eF5gH3jK2lM4nO"
API_KEY = "sk-proj-4fG7hJ2kL9mN3pQ6rS8tV1wX5yZ0aB"


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """configure_logging into a buffer; afterwards remove our handler and restore the root level."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    buffer = io.StringIO()
    configure_logging(
        Settings(discord_token=TOKEN, openai_api_key=API_KEY, log_level="DEBUG"), stream=buffer
    )
    yield buffer
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def lines(buffer: io.StringIO) -> list[str]:
    return buffer.getvalue().splitlines()


def assert_no_secret(text: str) -> None:
    assert TOKEN not in text
    assert API_KEY not in text
    # Not even a recognisable fragment of the token's secret part.
    assert TOKEN.split(".")[2] not in text


def test_secrets_in_message_args_and_extras_are_redacted(stream: io.StringIO) -> None:
    log = logging.getLogger("bot.discord.app")
    log.info("connecting with token %s", TOKEN)
    log.warning(f"Authorization: Bot {TOKEN}")
    logging.getLogger("discord.http").debug("headers=%r", {"Authorization": f"Bearer {API_KEY}"})
    log.info("request", extra={"headers": {"Authorization": f"Bot {TOKEN}"}})

    out = stream.getvalue()
    assert_no_secret(out)
    assert out.count(REDACTED) == 4
    assert len(lines(stream)) == 4


def test_secret_in_exception_text_is_redacted_and_stays_one_line(stream: io.StringIO) -> None:
    def login(token: str) -> None:
        raise PermissionError(f"401 Unauthorized: improper token has been passed: {token}")

    try:
        login(TOKEN)
    except PermissionError:
        logging.getLogger("bot.worker").exception("login failed for key %s", API_KEY)

    out = lines(stream)
    assert len(out) == 1, out
    assert_no_secret(out[0])
    assert "exc=" in out[0] and "PermissionError" in out[0] and "Traceback" in out[0]
    assert "improper token has been passed: [REDACTED]" in out[0]


def test_multiline_messages_stay_on_one_line(stream: io.StringIO) -> None:
    logging.getLogger("bot").info('user said "hi\nthere" = ok')
    (line,) = lines(stream)
    assert 'msg="user said \\"hi\\nthere\\" = ok"' in line
    assert "level=INFO" in line and "logger=bot" in line


async def test_conversation_and_job_ids_follow_the_task(stream: io.StringIO) -> None:
    log = logging.getLogger("bot.worker")

    async def handle(conversation: str, job: str) -> None:
        with log_context(conversation=conversation, job=job):
            await asyncio.sleep(0)
            log.info("job started")
            await asyncio.sleep(0)
            log.info("job done", extra={"tokens": 12})

    await asyncio.gather(handle("guild1:chan1", "a1"), handle("guild1:chan2", "b2"))
    log.info("idle")

    out = [line for line in lines(stream) if "logger=bot.worker" in line]
    assert len(out) == 5
    for line in out[:4]:
        if "conversation=guild1:chan1" in line:
            assert "job=a1" in line
        else:
            assert "conversation=guild1:chan2" in line and "job=b2" in line
    assert sum("tokens=12" in line for line in out) == 2
    assert "conversation=" not in out[4] and "job=" not in out[4]


def test_explicit_extra_wins_over_context(stream: io.StringIO) -> None:
    with log_context(job="outer"):
        logging.getLogger("bot").info("x", extra={"job": "inner"})
    (line,) = lines(stream)
    assert "job=inner" in line and "job=outer" not in line


def test_reconfiguring_replaces_the_handler(stream: io.StringIO) -> None:
    second = io.StringIO()
    configure_logging(Settings(discord_token=TOKEN, log_level="INFO"), stream=second)
    logging.getLogger("bot").info("token %s", TOKEN)
    logging.getLogger("bot").debug("hidden at INFO")
    assert stream.getvalue() == ""
    assert len(lines(second)) == 1
    assert_no_secret(second.getvalue())
