"""End to end: the real discord.py client in BotApp against the fake Discord, replies from the
scripted OpenAI-compatible server through the in-process queue and worker, history in SQLite."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bot.config import Settings
from bot.discord.app import BotApp
from bot.store.keys import ConversationKey
from tests.fakediscord import FakeDiscord, World
from tests.openai_test_server import OpenAITestServer, Reply

pytest_plugins = ("tests.fakediscord.fixtures",)

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Env:
    fake: FakeDiscord
    world: World
    llm: OpenAITestServer
    app: BotApp

    @property
    def store(self):  # type: ignore[no-untyped-def]
        assert self.app.store is not None
        return self.app.store


@pytest.fixture
async def llm() -> AsyncIterator[OpenAITestServer]:
    async with OpenAITestServer() as server:
        yield server


def make_settings(fake: FakeDiscord, llm: OpenAITestServer, tmp_path: Path, **extra: object) -> Settings:
    return Settings(
        discord_token=fake.token,
        discord_api_base=fake.api_base,
        discord_gateway_url=fake.gateway_url,
        database_url=f"sqlite+aiosqlite:///{tmp_path}/hermes.db",
        queue_url="memory://",
        engine="openai",
        openai_base_url=llm.base_url,
        model="test-model",
        personas_dir=ROOT / "personas",
        **extra,
    )


@pytest.fixture
async def env(
    fake_discord: FakeDiscord, discord_world: World, llm: OpenAITestServer, tmp_path: Path
) -> AsyncIterator[Env]:
    async with BotApp(make_settings(fake_discord, llm, tmp_path), guild_ready_timeout=0.1) as app:
        yield Env(fake_discord, discord_world, llm, app)


def mention(env: Env) -> str:
    return f"<@{env.fake.bot_user.id}>"


async def test_mention_gets_a_streamed_reply_as_the_default_persona(env: Env) -> None:
    env.llm.script(Reply("Hello Alice, nice to meet you.", chunk_chars=4, delay_s=0.01))
    w = env.world
    asked = await env.fake.send_message(w.general, w.alice, f"{mention(env)} hi there")
    reply = await env.fake.wait_for_message(
        w.general, lambda m: m.webhook_id is not None and m.content == "Hello Alice, nice to meet you."
    )
    assert reply.username == "Hermes 2"
    stored = await env.store.window(ConversationKey(w.guild.id, w.general.id), 10)
    assert [(m.role, m.content) for m in stored] == [
        ("user", "hi there"),
        ("assistant", "Hello Alice, nice to meet you."),
    ]
    assert stored[0].discord_message_id == asked.id
