"""A fake Discord (REST + gateway websocket) on 127.0.0.1 for tests that run the real discord.py client.

In a test module (or conftest): `pytest_plugins = ("tests.fakediscord.fixtures",)` for the
`fake_discord` and `discord_world` fixtures, then

    async def test_x(fake_discord: FakeDiscord, discord_world: World) -> None:
        client = discord.Client(intents=..., guild_ready_timeout=0.1)
        async with running(client, fake_discord):
            await fake_discord.send_message(discord_world.general, discord_world.alice, "hi")
            reply = await fake_discord.wait_for_message(discord_world.general, lambda m: m.author.bot)
"""

from tests.fakediscord.models import (
    Channel,
    ChannelType,
    Guild,
    Intent,
    InteractionRecord,
    Member,
    Perm,
    RecordedRequest,
    Role,
    StoredMessage,
    User,
    Webhook,
)
from tests.fakediscord.scene import World, build_default_world, running
from tests.fakediscord.server import FakeDiscord

__all__ = [
    "Channel",
    "ChannelType",
    "FakeDiscord",
    "Guild",
    "Intent",
    "InteractionRecord",
    "Member",
    "Perm",
    "RecordedRequest",
    "Role",
    "StoredMessage",
    "User",
    "Webhook",
    "World",
    "build_default_world",
    "running",
]
