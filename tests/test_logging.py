"""Logs: one line per event, ids attached, and no secret (bot token, API key, URL password, webhook or
interaction token) ever printed."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bot.config import Settings
from bot.discord.app import BotApp
from bot.logging_setup import REDACTED, configure_logging, log_context
from tests.fakediscord import FakeDiscord, World
from tests.openai_test_server import OpenAITestServer, Reply
from tests.test_discord_bot import Env, make_settings, mention, persona_reply, slash

pytest_plugins = ("tests.fakediscord.fixtures",)

# Shaped like real ones: a Discord bot token (three base64url parts) and an OpenAI-style key.
TOKEN = "MTA5ODc2NTQzMjEwOTg3NjU0.GhJk3L.q7XvY2m9pR4sT8wZ1bN6cD0eF5gH3jK2lM4nO"
API_KEY = "sk-proj-4fG7hJ2kL9mN3pQ6rS8tV1wX5yZ0aB"


@contextmanager
def logging_to_buffer(settings: Settings) -> Iterator[io.StringIO]:
    """configure_logging into a buffer; afterwards remove our handler and restore the root level."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    buffer = io.StringIO()
    configure_logging(settings, stream=buffer)
    try:
        yield buffer
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    with logging_to_buffer(Settings(discord_token=TOKEN, openai_api_key=API_KEY, log_level="DEBUG")) as buffer:
        yield buffer


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


def test_a_password_in_any_url_setting_is_redacted() -> None:
    """Also percent-decoded, as a client holds it once it has parsed the URL."""
    settings = Settings(openai_base_url="http://hermes:pr0xy%40pw@proxy/v1",
                        database_url="postgresql+asyncpg://hermes:pg-s3cret@db/hermes",
                        queue_url="redis://:r3dis-pw@redis:6379/0")
    with logging_to_buffer(settings) as buffer:
        logging.getLogger("aiohttp.client").warning("InvalidUrlClientError: http://hermes:pr0xy%40pw@proxy:99999/v1")
        logging.getLogger("bot").info("auth=%r", ("hermes", "pr0xy@pw"))
        logging.getLogger("bot").info("%s then %s", settings.queue_url, settings.database_url)
    out = buffer.getvalue()
    for password in ("pr0xy%40pw", "pr0xy@pw", "r3dis-pw", "pg-s3cret"):
        assert password not in out
    assert out.count(REDACTED) == 4


def test_a_short_url_password_is_masked_in_urls_and_nowhere_else() -> None:
    """Redacted everywhere, a password of "0" blanked every zero ("job 123[REDACTED]") and compose's "hermes"
    every persona named Hermes."""
    settings = Settings(queue_url="redis://:0@redis:6379/0",
                        database_url="postgresql+asyncpg://postgres:hermes@db/hermes")
    with logging_to_buffer(settings) as buffer:
        logging.getLogger("bot").info("job 1230 took 0.50 s for persona hermes")
        logging.getLogger("bot").info("cannot reach redis://:0@redis:6379/0 or postgresql+asyncpg://postgres:hermes@db/x")
    out = buffer.getvalue()
    assert "job 1230 took 0.50 s for persona hermes" in out
    assert f"redis://:{REDACTED}@redis:6379/0 or postgresql+asyncpg://postgres:{REDACTED}@db/x" in out


def test_a_token_field_in_json_text_is_redacted(stream: io.StringIO) -> None:
    """discord.py logs a body as text when its content type is not exactly application/json."""
    body = '{"id": "1576", "type": 1, "token": "2ilskj8GeheZSWb1yOOPT8sZ", "name": "hermes-personas"}'
    logging.getLogger("discord.http").debug("POST /channels/1/webhooks has received %s", body)
    assert '"token": "[REDACTED]", "name": "hermes-personas"' in stream.getvalue().replace('\\"', '"')


async def test_webhook_and_interaction_tokens_are_redacted_from_discord_py_debug_logs(
    fake_discord: FakeDiscord, discord_world: World, tmp_path: Path
) -> None:
    """A webhook's token lets anyone post as the bot, @everyone included, an interaction's lets anyone answer
    it for 15 minutes. At DEBUG discord.py logs both: in the webhook it creates, in the INTERACTION_CREATE event
    and in every route it calls with them (`/webhooks/<id>/<token>`, `/interactions/<id>/<token>/callback`)."""
    w = discord_world
    async with OpenAITestServer() as llm:
        settings = make_settings(fake_discord, llm, tmp_path, log_level="DEBUG")
        with logging_to_buffer(settings) as buffer:
            async with BotApp(settings, guild_ready_timeout=0.1) as app:
                env = Env(fake_discord, w, llm, app)
                llm.script(Reply("hello"))
                await fake_discord.send_message(w.general, w.alice, f"{mention(env)} hi")
                await persona_reply(env, w.general, "hello")
                await slash(env, "persona list", user=w.alice)
    (hook,) = fake_discord.channel_webhooks(w.general)
    (interaction,) = fake_discord.interactions.values()
    out = buffer.getvalue()
    assert hook.token not in out and interaction.token not in out
    for shown in (f"/webhooks/{hook.id}/{REDACTED}", f"/interactions/{interaction.id}/{REDACTED}/callback",
                  f"/webhooks/{fake_discord.application_id}/{REDACTED}", f"'token': '{REDACTED}'"):
        assert shown in out
