"""The default scene (one guild, #general, a thread, a few people) and `running(client, fake)`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import discord

from tests.fakediscord.models import Channel, Guild, Perm, Role, User
from tests.fakediscord.server import FakeDiscord


@dataclass
class World:
    """The default scene: one guild with #general and a thread in it, and a few people."""

    guild: Guild
    general: Channel
    thread: Channel
    alice: User  # an ordinary member
    bob: User  # another ordinary member
    mod: User  # has the "mods" role with Manage Channels
    mod_role: Role
    other_bot: User  # a different bot, a member too


async def build_default_world(fake: FakeDiscord) -> World:
    guild = await fake.add_guild("Test Guild")
    general = await fake.add_channel(guild, "general")
    mod_role = await fake.add_role(guild, "mods", Perm.MANAGE_CHANNELS | Perm.MANAGE_MESSAGES)
    alice = await fake.add_user("alice", global_name="Alice")
    bob = await fake.add_user("bob", global_name="Bob")
    mod = await fake.add_user("moderator", global_name="Mod")
    other_bot = await fake.add_user("otherbot", bot=True)
    for user in (alice, bob, other_bot):
        await fake.add_member(guild, user)
    await fake.add_member(guild, mod, roles=[mod_role])
    thread = await fake.add_thread(general, "side quest", owner=alice)
    return World(guild, general, thread, alice, bob, mod, mod_role, other_bot)


@asynccontextmanager
async def running(
    client: discord.Client,
    fake: FakeDiscord,
    *,
    timeout: float = 10.0,  # noqa: ASYNC109
) -> AsyncIterator[None]:
    """Run `client` against `fake` until the block ends; enter once on_ready fired.

    Build clients with `guild_ready_timeout=0.1`: discord.py otherwise waits 2 s after the last
    GUILD_CREATE before on_ready. A client that dies while starting re-raises its error here.
    """
    task = asyncio.create_task(client.start(fake.token))
    try:
        await fake.wait_for(lambda: client.is_ready() or task.done(), timeout, what="client on_ready")
        if task.done():
            task.result()
            raise RuntimeError("the client stopped before it became ready")
        yield
    finally:
        await client.close()
        await asyncio.wait_for(task, timeout)
