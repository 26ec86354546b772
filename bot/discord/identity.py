"""Who a persona's messages come from: one reused webhook per channel, or the bot in bold.

A webhook lets every message carry the persona's own name and avatar, so one webhook serves all
personas of a channel (and its threads). Without Manage Webhooks the bot speaks itself and puts the
persona's name in bold, and so it does when Discord refuses the webhook otherwise (a channel's 15
webhooks all taken, a server error); that choice is re-checked from time to time, so granting the
permission or freeing a webhook later takes effect without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import weakref
from collections.abc import Callable
from datetime import timedelta

import aiohttp
import discord
from discord.utils import MISSING, escape_markdown

from bot.lru import LRU
from bot.personas import Persona

log = logging.getLogger(__name__)

WEBHOOK_NAME = "hermes-personas"
RECHECK_AFTER_S = 600.0
LOST_ANSWER_LOOKBACK_S = 60.0  # how far back a send whose answer was lost looks for the message it stored
CHANNELS_REMEMBERED = 10_000

# Untrusted text (user input echoed by the model) must never ping everyone, here, a role or a user: a
# reply names people as it likes, but a `<@id>` a user asked it to repeat would notify whoever that is.
SAFE_MENTIONS = discord.AllowedMentions.none()

# Discord refuses a webhook username containing these words, in any case (400, USERNAME_INVALID_CONTAINS);
# one letter of each is swapped for its Cyrillic look-alike, as other bots do, so "Clyde Barrow" can speak.
_RESERVED_IN_WEBHOOK_NAMES = re.compile(r"clyde|discord", re.IGNORECASE)
_LOOK_ALIKES = str.maketrans({"e": "\u0435", "E": "\u0415", "o": "\u043e", "O": "\u041e"})


def webhook_username(name: str) -> str:
    """`name` as a webhook may use it: "Clyde" becomes "Clydе" (Cyrillic е), "Discord" "Discоrd"."""
    return _RESERVED_IN_WEBHOOK_NAMES.sub(lambda m: m.group(0).translate(_LOOK_ALIKES), name)


async def sent_despite_lost_answer(
    channel: discord.abc.Messageable, content: str, sent_by: Callable[[discord.Message], bool]
) -> int | None:
    """The id of the message `sent_by` someone with exactly `content` in the last LOST_ANSWER_LOOKBACK_S, if
    any: a send whose answer was lost on the network may have been stored, and sending it again (webhooks
    take no nonce) would leave a stray copy that the reply's edits then pass by. None when there is none, or
    the bot may not read the channel's history (the caller then sends again)."""
    since = discord.utils.time_snowflake(discord.utils.utcnow() - timedelta(seconds=LOST_ANSWER_LOOKBACK_S))
    try:
        async for message in channel.history(limit=20, after=discord.Object(since)):
            if sent_by(message) and message.content == content:
                return message.id
    except (discord.HTTPException, aiohttp.ClientError, OSError):
        return None
    return None


class WebhookOutlet:
    """A persona speaking through the channel's webhook (name and avatar set per message)."""

    overhead = 0

    def __init__(
        self, webhook: discord.Webhook, persona: Persona, channel: discord.abc.Messageable,
        thread: discord.abc.Snowflake | None,
    ) -> None:
        self.webhook, self.persona, self.channel = webhook, persona, channel
        self.thread = thread if thread is not None else MISSING

    async def send(self, content: str) -> int:
        try:
            message = await self.webhook.send(
                content,
                username=webhook_username(self.persona.name),
                avatar_url=self.persona.avatar_url or MISSING,
                allowed_mentions=SAFE_MENTIONS,
                thread=self.thread,
                wait=True,
            )
        except (aiohttp.ClientError, OSError):  # no answer: Discord may have stored it all the same
            found = await sent_despite_lost_answer(self.channel, content, lambda m: m.webhook_id == self.webhook.id)
            if found is None:
                raise
            return found
        return message.id

    async def edit(self, message_id: int, content: str) -> None:
        await self.webhook.edit_message(
            message_id, content=content, allowed_mentions=SAFE_MENTIONS, thread=self.thread
        )

    async def delete(self, message_id: int) -> None:
        await self.webhook.delete_message(message_id, thread=self.thread)


class BotOutlet:
    """The fallback: the bot's own messages, each starting with the persona's name in bold."""

    def __init__(self, channel: discord.abc.Messageable, persona: Persona) -> None:
        self.channel = channel
        self.prefix = f"**{escape_markdown(persona.name)}:** "
        self.overhead = len(self.prefix)

    async def send(self, content: str) -> int:
        text = self.prefix + content
        try:
            message = await self.channel.send(text, allowed_mentions=SAFE_MENTIONS)
        except (aiohttp.ClientError, OSError):  # no answer: Discord may have stored it all the same
            me = self.channel.me if isinstance(self.channel, discord.DMChannel) else self.channel.guild.me  # type: ignore[attr-defined]
            found = await sent_despite_lost_answer(self.channel, text, lambda m: m.author.id == me.id)
            if found is None:
                raise
            return found
        return message.id

    async def edit(self, message_id: int, content: str) -> None:
        partial = self.channel.get_partial_message(message_id)  # type: ignore[attr-defined]
        await partial.edit(content=self.prefix + content, allowed_mentions=SAFE_MENTIONS)

    async def delete(self, message_id: int) -> None:
        await self.channel.get_partial_message(message_id).delete()  # type: ignore[attr-defined]


PersonaOutlet = WebhookOutlet | BotOutlet


class Identities:
    """Finds or creates the bot's webhook per channel, once, and hands out persona outlets. It remembers
    the `remembered` channels used last (a forgotten one costs a webhook lookup again), not every channel
    the bot ever spoke in, deleted ones included."""

    def __init__(self, remembered: int = CHANNELS_REMEMBERED) -> None:
        self._webhooks: LRU[int, discord.Webhook] = LRU(remembered)
        self._denied: LRU[int, float] = LRU(remembered)  # channel id -> when webhooks were refused
        # A channel's lock lives while someone holds or awaits it: an LRU could drop one in use.
        self._locks: weakref.WeakValueDictionary[int, asyncio.Lock] = weakref.WeakValueDictionary()

    async def outlet(self, channel: discord.abc.Messageable, persona: Persona) -> PersonaOutlet:
        thread = channel if isinstance(channel, discord.Thread) else None
        parent = channel.parent if isinstance(channel, discord.Thread) else channel
        if not isinstance(parent, discord.TextChannel | discord.ForumChannel):
            return BotOutlet(channel, persona)  # DMs and channel kinds without webhooks
        webhook = await self._webhook(parent)
        return WebhookOutlet(webhook, persona, channel, thread) if webhook else BotOutlet(channel, persona)

    async def replace(
        self, gone: PersonaOutlet, channel: discord.abc.Messageable, persona: Persona
    ) -> PersonaOutlet:
        """A new outlet for a reply whose webhook a moderator deleted: forget that webhook (only if no
        other reply replaced it already) and find or create another."""
        if isinstance(gone, WebhookOutlet):
            channel_id = gone.webhook.channel_id
            current = self._webhooks.get(channel_id) if channel_id is not None else None
            if current is not None and current.id == gone.webhook.id:  # by id: a lookup after eviction is a new object
                del self._webhooks[channel_id]
        return await self.outlet(channel, persona)

    async def _webhook(self, channel: discord.TextChannel | discord.ForumChannel) -> discord.Webhook | None:
        if channel.id in self._webhooks:
            return self._webhooks[channel.id]
        if time.monotonic() - self._denied.get(channel.id, -RECHECK_AFTER_S) < RECHECK_AFTER_S:
            return None
        async with self._locks.setdefault(channel.id, asyncio.Lock()):
            if channel.id in self._webhooks:
                return self._webhooks[channel.id]
            me = channel.guild.me
            if not channel.permissions_for(me).manage_webhooks:
                self._denied[channel.id] = time.monotonic()
                return None
            try:
                ours = [w for w in await channel.webhooks() if w.token and w.user and w.user.id == me.id]
                webhook = ours[0] if ours else await channel.create_webhook(name=WEBHOOK_NAME)
            except discord.HTTPException as exc:  # refused, the channel's 15 webhooks taken, or Discord failing
                if not isinstance(exc, discord.Forbidden):
                    log.warning("no webhook in #%s (%s); personas speak as the bot there for a while", channel, exc)
                self._denied[channel.id] = time.monotonic()
                return None
            self._webhooks[channel.id] = webhook
            return webhook
