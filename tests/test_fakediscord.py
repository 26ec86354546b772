"""Smoke tests of the fake Discord with plain discord.py clients: if these pass, the front-end tests
exercise the real library against a server that answers like Discord."""

from __future__ import annotations

import discord

from tests.fakediscord import FakeDiscord, World, running

pytest_plugins = ("tests.fakediscord.fixtures",)

FAST = {"guild_ready_timeout": 0.1}


def _intents(*, content: bool = True) -> discord.Intents:
    intents = discord.Intents.none()
    intents.guilds = intents.guild_messages = intents.dm_messages = True
    intents.message_content = content
    return intents


class Recorder(discord.Client):
    """A plain client that keeps what it was told."""

    def __init__(self, **options: object) -> None:
        super().__init__(intents=options.pop("intents", _intents()), **FAST, **options)  # type: ignore[arg-type]
        self.seen: list[discord.Message] = []
        self.edits: list[tuple[discord.Message, discord.Message]] = []
        self.deleted: list[int] = []

    async def on_message(self, message: discord.Message) -> None:
        self.seen.append(message)

    async def on_message_edit(self, before: discord.Message, after: discord.Message) -> None:
        self.edits.append((before, after))

    async def on_raw_message_delete(self, event: discord.RawMessageDeleteEvent) -> None:
        self.deleted.append(event.message_id)


async def test_connects_and_sees_the_world(fake_discord: FakeDiscord, discord_world: World) -> None:
    client = Recorder()
    async with running(client, fake_discord):
        assert client.user is not None and client.user.id == fake_discord.bot_user.id
        assert client.application_id == fake_discord.application_id
        guild = client.get_guild(discord_world.guild.id)
        assert guild is not None and guild.name == "Test Guild"
        general = guild.get_channel(discord_world.general.id)
        assert isinstance(general, discord.TextChannel)
        thread = guild.get_thread(discord_world.thread.id)
        assert thread is not None and thread.parent_id == general.id
        assert guild.me.guild_permissions.manage_webhooks
        assert general.permissions_for(guild.me).send_messages
        # Channels added while connected arrive as gateway events.
        extra = await fake_discord.add_channel(discord_world.guild, "later")
        await fake_discord.wait_for(lambda: guild.get_channel(extra.id), what="CHANNEL_CREATE")
    assert fake_discord.requests_to("GET", "/users/@me")
