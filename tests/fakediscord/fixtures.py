"""pytest fixtures `fake_discord` and `discord_world`; load with
`pytest_plugins = ("tests.fakediscord.fixtures",)` in a test module or conftest.

`fake_discord` starts the server in the test's event loop and points discord.py at it
(Route.BASE and DiscordWebSocket.DEFAULT_GATEWAY), undoing both afterwards.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import discord.gateway
import discord.http
import pytest
import yarl

from tests.fakediscord.scene import World, build_default_world
from tests.fakediscord.server import FakeDiscord


@pytest.fixture
async def fake_discord(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeDiscord]:
    """A started FakeDiscord with discord.py's REST base and gateway URL pointing at it."""
    fake = FakeDiscord()
    await fake.start()
    monkeypatch.setattr(discord.http.Route, "BASE", fake.api_base)
    monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake.gateway_url))
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def discord_world(fake_discord: FakeDiscord) -> World:
    """The default world built in `fake_discord` (before any client connects)."""
    return await build_default_world(fake_discord)
