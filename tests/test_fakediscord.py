"""Smoke tests of the fake Discord with plain discord.py clients: if these pass, the front-end tests
exercise the real library against a server that answers like Discord."""

from __future__ import annotations

import discord
import pytest
from discord import app_commands
from discord.ext import commands

from tests.fakediscord import FakeDiscord, Perm, World, running

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

    # With the members intent discord.py chunks the guild at startup (REQUEST_GUILD_MEMBERS).
    intents = _intents()
    intents.members = True
    chunked = Recorder(intents=intents)
    async with running(chunked, fake_discord):
        guild = chunked.get_guild(discord_world.guild.id)
        assert guild is not None and guild.chunked
        mod = guild.get_member(discord_world.mod.id)
        assert mod is not None and mod.guild_permissions.manage_channels
        late = await fake_discord.add_user("late")
        await fake_discord.add_member(discord_world.guild, late)
        await fake_discord.wait_for(lambda: guild.get_member(late.id), what="GUILD_MEMBER_ADD")


async def test_on_message_mentions_replies_and_content_intent(
    fake_discord: FakeDiscord, discord_world: World
) -> None:
    w = discord_world
    client = Recorder()
    async with running(client, fake_discord):
        bot = fake_discord.bot_user
        first = await fake_discord.send_message(w.general, w.alice, f"{bot.mention} hello")
        await fake_discord.wait_for(lambda: len(client.seen) == 1)
        msg = client.seen[0]
        assert msg.id == first.id and msg.content == f"<@{bot.id}> hello"
        assert client.user in msg.mentions
        assert isinstance(msg.author, discord.Member) and msg.author.display_name == "Alice"

        mine = await fake_discord.send_message(w.general, bot, "I am the bot")  # as if the bot had said it
        await fake_discord.send_message(w.thread, w.bob, "answer me", reply_to=mine)
        await fake_discord.wait_for(lambda: len(client.seen) == 3)
        reply = client.seen[2]
        assert isinstance(reply.channel, discord.Thread)
        assert reply.reference is not None and reply.reference.message_id == mine.id
        assert isinstance(reply.reference.resolved, discord.Message)
        assert reply.reference.resolved.author == client.user

    # Without the message-content intent Discord blanks content unless the bot is mentioned.
    blind = Recorder(intents=_intents(content=False))
    async with running(blind, fake_discord):
        await fake_discord.send_message(w.general, w.alice, "secret")
        await fake_discord.send_message(w.general, w.alice, f"{fake_discord.bot_user.mention} visible")
        await fake_discord.wait_for(lambda: len(blind.seen) == 2)
        assert [m.content for m in blind.seen] == ["", f"<@{fake_discord.bot_user.id}> visible"]


async def test_dm_edit_and_delete_events(fake_discord: FakeDiscord, discord_world: World) -> None:
    w = discord_world
    client = Recorder()
    async with running(client, fake_discord):
        dm = await fake_discord.open_dm(w.alice)
        said = await fake_discord.send_message(dm, w.alice, "psst")
        await fake_discord.wait_for(lambda: client.seen)
        assert isinstance(client.seen[0].channel, discord.DMChannel)
        await client.seen[0].channel.send("hi Alice")
        answer = await fake_discord.wait_for_message(dm, lambda m: m.author.id == fake_discord.bot_user.id)
        assert answer.content == "hi Alice"
        bob = await client.fetch_user(w.bob.id)
        await bob.send("hello Bob")
        bob_dm = await fake_discord.open_dm(w.bob)
        assert [m.content for m in fake_discord.channel_messages(bob_dm)] == ["hello Bob"]

        await fake_discord.edit_message(said, "psst, edited")
        await fake_discord.delete_message(said)
        await fake_discord.wait_for(lambda: client.edits and client.deleted)
        assert client.edits[0][1].content == "psst, edited"
        assert client.deleted == [said.id]
        assert said.history == ["psst"] and said.deleted

        async def bot_dm_text() -> str:  # async predicates are awaited
            return fake_discord.channel_messages(dm)[-1].content

        assert await fake_discord.wait_for(bot_dm_text) == "hi Alice"
        with pytest.raises(AssertionError, match="timed out after 0.1s waiting for nothing"):
            await fake_discord.wait_for(lambda: None, 0.1, what="nothing")


async def test_send_edit_delete_and_allowed_mentions(fake_discord: FakeDiscord, discord_world: World) -> None:
    w = discord_world
    client = Recorder(allowed_mentions=discord.AllowedMentions.none())
    async with running(client, fake_discord):
        general = client.get_channel(w.general.id)
        assert isinstance(general, discord.TextChannel)
        async with general.typing():
            sent = await general.send(f"hi @everyone and {w.mod_role.mention}")
        stored = fake_discord.messages[sent.id]
        assert stored.pings() == set()
        assert fake_discord.requests_to("POST", "/channels/{channel_id}/typing")
        # The gateway echoes the bot's own message back, as Discord does.
        await fake_discord.wait_for(lambda: any(m.id == sent.id for m in client.seen))

        await sent.edit(content="edited once")
        await sent.edit(content="edited twice")
        assert stored.content == "edited twice"
        assert stored.history == [f"hi @everyone and {w.mod_role.mention}", "edited once"]
        assert len(stored.edit_times) == 2 and stored.edit_times[0] <= stored.edit_times[1]
        await fake_discord.wait_for(lambda: len(client.edits) == 2)

        with pytest.raises(discord.HTTPException) as too_long:
            await general.send("x" * 2001)
        assert too_long.value.code == 50035
        await sent.delete()
        assert stored.deleted and fake_discord.bot_messages(w.general) == []

    unsafe = fake_discord.messages[sent.id]
    unsafe.allowed_mentions = None  # what Discord would do without allowed_mentions
    unsafe.content = "@here"
    assert unsafe.pings() == {"everyone"}


async def test_webhook_identity_thread_and_missing_permission(
    fake_discord: FakeDiscord, discord_world: World
) -> None:
    w = discord_world
    client = Recorder()
    async with running(client, fake_discord):
        general = client.get_channel(w.general.id)
        assert isinstance(general, discord.TextChannel)
        foreign = await fake_discord.add_webhook(w.general, "GitHub", creator=w.mod)
        hook = await general.create_webhook(name="hermes-personas")
        listed = {h.id: h for h in await general.webhooks()}
        assert set(listed) == {foreign.id, hook.id}
        assert listed[hook.id].user == client.user and listed[foreign.id].user.id == w.mod.id  # type: ignore[union-attr]
        sent = await hook.send(
            "I am Edward", username="Edward Elric", avatar_url="https://x.invalid/ed.png", wait=True
        )
        stored = fake_discord.messages[sent.id]
        assert (stored.display_name, stored.avatar_url, stored.webhook_id) == (
            "Edward Elric",
            "https://x.invalid/ed.png",
            hook.id,
        )
        await sent.edit(content="I am Edward, edited")
        assert stored.content == "I am Edward, edited" and stored.history == ["I am Edward"]

        # Threads: the parent's webhook posts with thread=..., and edits need the thread too.
        thread = client.get_channel(w.thread.id)
        assert isinstance(thread, discord.Thread)
        in_thread = await hook.send("in the thread", username="Hermes 2", thread=thread, wait=True)
        assert fake_discord.messages[in_thread.id].channel_id == w.thread.id
        await in_thread.edit(content="edited in thread")
        assert fake_discord.messages[in_thread.id].content == "edited in thread"
        with pytest.raises(discord.HTTPException):
            await thread.parent.create_webhook(name="Discord helper")  # type: ignore[union-attr]
        assert fake_discord.bot_messages(w.general) == [stored]
        echoed = await fake_discord.wait_for(lambda: [m for m in client.seen if m.webhook_id == hook.id])
        assert echoed[0].author.name == "Edward Elric"

        await fake_discord.remove_webhook(fake_discord.webhooks[hook.id])
        with pytest.raises(discord.NotFound) as gone:
            await hook.send("anyone there?", username="Hermes 2")
        assert gone.value.code == 10015

        await fake_discord.set_bot_permissions(w.guild, Perm.BOT_DEFAULT & ~Perm.MANAGE_WEBHOOKS)
        guild = client.get_guild(w.guild.id)
        assert guild is not None
        await fake_discord.wait_for(lambda: not general.permissions_for(guild.me).manage_webhooks)
        with pytest.raises(discord.Forbidden) as denied:
            await general.webhooks()
        assert denied.value.code == 50013


async def test_429_is_retried_by_discord_py(fake_discord: FakeDiscord, discord_world: World) -> None:
    client = Recorder()
    async with running(client, fake_discord):
        general = client.get_channel(discord_world.general.id)
        assert isinstance(general, discord.TextChannel)
        sent = await general.send("draft")
        fake_discord.inject_429(
            "PATCH", "/channels/{channel_id}/messages/{message_id}", times=2, retry_after=0.05
        )
        await sent.edit(content="final")
        patches = [r for r in fake_discord.requests if r.method == "PATCH"]
        assert [r.status for r in patches] == [429, 429, 200]
        assert fake_discord.messages[sent.id].content == "final"

        hook = await general.create_webhook(name="personas")
        fake_discord.inject_429("POST", "/webhooks/{webhook_id}/{token}", retry_after=0.05)
        via_hook = await hook.send("through a 429", username="Hermes 2", wait=True)
        assert fake_discord.messages[via_hook.id].content == "through a 429"
        hits = fake_discord.requests_to("POST", "/webhooks/{webhook_id}/{token}")
        assert [r.status for r in hits] == [429, 200]

        fake_discord.inject_error(
            "POST", f"/channels/{general.id}/messages", status=403, code=50001, message="Missing Access"
        )
        with pytest.raises(discord.Forbidden) as refused:
            await general.send("not allowed this once")
        assert refused.value.code == 50001
        await general.send("allowed again")


class PersonaCommands(app_commands.Group):
    def __init__(self) -> None:
        super().__init__(name="persona", description="Personas in this channel")

    @app_commands.command(name="set", description="Set the channel's persona")
    @app_commands.checks.has_permissions(manage_channels=True)
    async def set_(self, interaction: discord.Interaction, persona: str, temperature: float = 0.7) -> None:
        await interaction.response.send_message(f"persona={persona} t={temperature}")

    @app_commands.command(name="list", description="List personas")
    async def list_(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(thinking=True)
        await interaction.followup.send("hermes, edward_elric")

    @set_.error
    async def on_set_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        await interaction.response.send_message("You need Manage Channels.", ephemeral=True)


async def test_app_commands_sync_and_interactions(fake_discord: FakeDiscord, discord_world: World) -> None:
    w = discord_world
    bot = commands.Bot(command_prefix="!", intents=_intents(), **FAST)  # type: ignore[arg-type]
    bot.tree.add_command(PersonaCommands(), guild=discord.Object(w.guild.id))
    async with running(bot, fake_discord):
        with pytest.raises(LookupError):
            await fake_discord.invoke_slash("persona list", user=w.alice, channel=w.general)
        await bot.tree.sync(guild=discord.Object(w.guild.id))
        (synced,) = fake_discord.commands(w.guild)
        assert synced["name"] == "persona"
        assert {o["name"] for o in synced["options"]} == {"set", "list"}

        denied = await fake_discord.invoke_slash(
            "persona set", {"persona": "hermes"}, user=w.alice, channel=w.general
        )
        await fake_discord.wait_for(lambda: denied.responded)
        assert denied.original is not None and denied.original.ephemeral
        assert denied.texts() == ["You need Manage Channels."]

        allowed = await fake_discord.invoke_slash(
            "persona set", {"persona": "edward_elric", "temperature": 0.2}, user=w.mod, channel=w.general
        )
        await fake_discord.wait_for(lambda: allowed.texts())
        assert allowed.callback_type == 4 and allowed.texts() == ["persona=edward_elric t=0.2"]

        forced = await fake_discord.invoke_slash(
            "persona set",
            {"persona": "hermes"},
            user=w.alice,
            channel=w.thread,
            member_permissions=Perm.MANAGE_CHANNELS,
        )
        await fake_discord.wait_for(lambda: forced.texts())
        assert forced.texts() == ["persona=hermes t=0.7"] and forced.original.channel_id == w.thread.id  # type: ignore[union-attr]

        listed = await fake_discord.invoke_slash("persona list", user=w.alice, channel=w.general)
        await fake_discord.wait_for(lambda: listed.texts())
        assert listed.deferred and listed.texts() == ["hermes, edward_elric"] and not listed.followups
        assert listed.original is not None
        original_id = listed.original.id
        echoed = await fake_discord.wait_for(lambda: discord.utils.get(bot.cached_messages, id=original_id))
        assert echoed.interaction_metadata is not None and echoed.interaction_metadata.user.id == w.alice.id


async def test_unknown_routes_fail_loudly(fake_discord: FakeDiscord, discord_world: World) -> None:
    client = Recorder()
    async with running(client, fake_discord):
        with pytest.raises(discord.NotFound, match="fake Discord has no route GET /stickers/1"):
            await client.http.request(discord.http.Route("GET", "/stickers/{sticker_id}", sticker_id=1))
        assert fake_discord.requests[-1].status == 404
