"""The chat cog: decide whether a message is for the bot, store it, and stream a persona's reply.

One handler per Discord event. A message in a conversation the bot takes part in is stored even when
nobody addresses the bot, so the context is there when someone does. Replies stream through
`LiveReply` (typing until the first text); queue-full and worker-down become a short friendly line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass

import discord
from discord.ext import commands

from bot import metrics
from bot.config import Settings
from bot.conversation import ChatService, PendingReply
from bot.discord.identity import SAFE_MENTIONS, Identities
from bot.discord.stream import DISCORD_FAILURES, LiveReply, Outlet
from bot.discord.triggers import Signals, active_personas, choose_persona
from bot.lru import LRU
from bot.personas import Persona
from bot.prompt import without_own_name
from bot.queue.base import QueueBusy, QueueUnavailable
from bot.queue.jobs import Done, ErrorEvent, TextDelta
from bot.store.db import StoreUnavailable
from bot.store.keys import ConversationKey

log = logging.getLogger(__name__)

WAIT_NOTICE_POSITION = 3  # from this place in line on, say so instead of only typing
BUSY_NOTICE_EVERY_S = 30.0  # one "busy" line per conversation in this time: a burst must not get one each
TYPING_REFRESH_S = 8.0
REMEMBERED_REPLIES = 2048
REMEMBERED_DELETIONS = 2048  # recent deletions kept for messages not stored yet
REMEMBERED_CONVERSATIONS = 100_000  # whether the bot takes part, per channel or thread recently seen

WAITING = "⏳ You're number {position} in line, I'll answer as soon as I can."
UNAVAILABLE = "Sorry, I can't reply right now: the reply service isn't answering. Please try again in a little while."
FAILED = "Sorry, something went wrong while I was writing that. Please try again."
TOO_SLOW = "Sorry, that took too long and I gave up. Please try again."
STORE_DOWN = "Sorry, I can't reach my memory (the database) right now, so I can't answer. Please try again soon."
EMPTY = "*(no reply)*"
STOPPED = " *(stopped)*"
SUPERSEDED = "superseded"  # not shown: the reply gives way to the one for a newer message


class Muted(Exception):
    """The bot lost the permission to post in a channel while a reply was being written there."""


@dataclass(frozen=True)
class Asked:
    """What a reply answers: the user who asked (their HERMES_QUEUE_MAX_PER_USER share) and their message
    (None for a command)."""

    user_id: int
    message_id: int | None = None


def conversation_key(channel: discord.abc.Messageable | discord.abc.GuildChannel | None) -> ConversationKey:
    """Threads are their own conversation (under their parent channel); DMs have no guild."""
    if isinstance(channel, discord.Thread):
        return ConversationKey(channel.guild.id, channel.parent_id, channel.id)
    guild = getattr(channel, "guild", None)
    return ConversationKey(guild.id if guild else None, channel.id)  # type: ignore[union-attr]


class ChatCog(commands.Cog):
    def __init__(self, bot: commands.Bot, settings: Settings, chat: ChatService, identities: Identities) -> None:
        self.bot, self.settings, self.chat, self.identities = bot, settings, chat, identities
        self.running: dict[ConversationKey, list[PendingReply]] = {}  # replies being written, oldest first
        # The persona of every message of recent replies, from the moment it is sent: a reply to a part
        # still being written goes to the persona writing it.
        self.sent: LRU[int, str] = LRU(REMEMBERED_REPLIES)
        # The newest reply attempt of a conversation when it was shown but not stored (an error, "no reply",
        # stopped before any text, a busy notice): its persona and messages, for /regenerate to retry it.
        self.unstored: LRU[ConversationKey, tuple[str, tuple[int, ...]]] = LRU(REMEMBERED_REPLIES)
        # Whether the bot has spoken in a conversation (it keeps their history) or the store said it never
        # has: a busy channel the bot is not part of then costs no history lookup per message (its settings
        # come from the store's cache). Safe to keep in memory because only this process writes a guild's
        # replies (shard processes split guilds).
        self._takes_part_in: LRU[ConversationKey, bool] = LRU(REMEMBERED_CONVERSATIONS)
        # Recent deletions, for messages they reached before they were stored: a reply being written (see
        # _store_shown), or a user's message waiting its turn (see _handle; an edit needs no such record, as
        # discord.py edits the cached message, which the handler reads again once it is stored).
        self._deleted: LRU[int, None] = LRU(REMEMBERED_DELETIONS)
        self._answering: dict[int, PendingReply] = {}  # the reply being written to each message
        self._reset_at: LRU[ConversationKey, float] = LRU(REMEMBERED_REPLIES)  # by /reset, time.monotonic()
        self._arrivals: dict[ConversationKey, tuple[asyncio.Lock, int]] = {}  # lock, handlers using it
        self.background: set[asyncio.Task[None]] = set()  # replies started by commands
        self._busy_noticed: dict[ConversationKey, float] = {}  # when each last got a "busy" line
        self.accepting = True  # False once shutdown starts: new messages are left alone
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def drain(self, grace_s: float) -> bool:
        """Stop taking messages and wait up to `grace_s` for those being stored and the replies in flight;
        True when all finished."""
        self.accepting = False
        try:
            async with asyncio.timeout(grace_s):
                await self._idle.wait()
            return True
        except TimeoutError:
            return False

    # ----- incoming messages -----

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        if not self.accepting or message.author.bot or message.webhook_id is not None or self.bot.user is None:
            return
        if message.type not in (discord.MessageType.default, discord.MessageType.reply):
            return
        metrics.count_discord_event("message")
        with self._working():  # from here: shutdown waits for this message to be stored and answered
            try:
                await self._handle(message)
            except StoreUnavailable as exc:
                metrics.count_error("store_unavailable")
                log.warning("database unavailable; message %s not handled: %s", message.id, exc)
                if self._addressed_directly(message):
                    with contextlib.suppress(*DISCORD_FAILURES):
                        await message.channel.send(STORE_DOWN, allowed_mentions=SAFE_MENTIONS)

    def _direct_signals(self, message: discord.Message) -> tuple[bool, bool, bool]:
        """(a DM, an @mention of the bot, a reply to the bot's own message): what the message alone tells."""
        me = self.bot.user
        assert me is not None
        ref = _replied_to(message)
        resolved = ref.resolved if ref is not None else None
        mentioned = any(u.id == me.id for u in message.mentions) or any(_is_role_of(me.id, r) for r in message.role_mentions)
        return (
            isinstance(message.channel, discord.DMChannel),
            mentioned,
            isinstance(resolved, discord.Message) and resolved.author.id == me.id,
        )

    def _addressed_directly(self, message: discord.Message) -> bool:
        """A DM, an @mention or a reply to one of our messages: what needs no database to recognise."""
        ref = _replied_to(message)
        return any(self._direct_signals(message)) or (ref is not None and ref.message_id in self.sent)

    async def _handle(self, message: discord.Message) -> None:
        self.chat.personas.refresh(required=self.settings.default_persona)
        key = conversation_key(message.channel)
        async with self._in_arrival_order(key):
            channel = await self.chat.store.get_settings(key)
            signals = await self._signals(message)
            persona = choose_persona(signals, channel, self.chat.personas, self.settings.default_persona)
            if persona is None and not await self._takes_part(key):
                return
            self._take_part(key)
            recorded = await self.chat.record_user_turn(
                key,
                message_id=message.id,
                author_id=message.author.id,
                author_name=message.author.display_name,
                content=signals.text,
                reply_to_id=ref.message_id if (ref := _replied_to(message)) else None,
            )
            if recorded and message.id in self._deleted:  # deleted (a moderation bot) while it waited its turn
                await self.chat.store.delete_message(message.id)
                return
            me = self.bot.user
            if recorded and me and (edited := message_text(message, me.id)) != signals.text:  # edited meanwhile
                await self.chat.store.edit_message(message.id, edited)
        if persona is not None and recorded:  # not recorded: Discord sent this message again; it had its answer
            await self.reply(message.channel, key, persona, asked=Asked(message.author.id, message.id))

    @contextlib.asynccontextmanager
    async def _in_arrival_order(self, key: ConversationKey) -> AsyncIterator[None]:
        """One message of a conversation at a time until it is stored, in the order Discord delivered
        them (asyncio.Lock is fair, and each handler reaches it without awaiting first): a message
        needing a lookup (a reply) must not be stored after the plain one sent just after it."""
        lock, waiting = self._arrivals.get(key) or (asyncio.Lock(), 0)
        self._arrivals[key] = (lock, waiting + 1)
        try:
            async with lock:
                yield
        finally:
            lock, waiting = self._arrivals[key]
            if waiting == 1:
                del self._arrivals[key]
            else:
                self._arrivals[key] = (lock, waiting - 1)

    async def _takes_part(self, key: ConversationKey) -> bool:
        known = self._takes_part_in.get(key)
        if known is None:
            known = self._takes_part_in[key] = await self.chat.store.has_history(key)
        return known

    def _take_part(self, key: ConversationKey) -> None:
        self._takes_part_in[key] = True

    async def _signals(self, message: discord.Message) -> Signals:
        me = self.bot.user
        assert me is not None
        reply_persona = None
        ref = _replied_to(message)
        if ref is not None and ref.message_id is not None:
            known = self.sent.get(ref.message_id)
            stored = None if known else await self.chat.store.find_message(ref.message_id)
            if known is not None:
                reply_persona = known
            elif stored is not None and stored.role == "assistant":
                reply_persona = stored.persona_id
        is_dm, mentions_bot, replies_to_bot = self._direct_signals(message)
        return Signals(
            text=message_text(message, me.id), is_dm=is_dm, mentions_bot=mentions_bot,
            replies_to_bot=replies_to_bot, reply_persona=reply_persona,
        )

    # ----- edits and deletions mirror into the store -----

    @commands.Cog.listener()
    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        message, me = payload.message, self.bot.user
        if "content" not in payload.data or message.author.bot or message.webhook_id or me is None:
            return
        with _store_trouble_logged("an edit"):
            await self.chat.store.edit_message(payload.message_id, message_text(message, me.id))

    @commands.Cog.listener()
    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        await self._note_deleted([payload.message_id])
        with _store_trouble_logged("a deletion"):
            await self.chat.store.delete_message(payload.message_id)

    @commands.Cog.listener()
    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        await self._note_deleted(payload.message_ids)
        with _store_trouble_logged("a bulk deletion"):
            for message_id in payload.message_ids:
                await self.chat.store.delete_message(message_id)

    async def _note_deleted(self, message_ids: Iterable[int]) -> None:
        """Remember deletions, and stop the replies being written to deleted messages."""
        for message_id in message_ids:
            self._deleted[message_id] = None
            if (pending := self._answering.get(message_id)) is not None:
                try:
                    await pending.cancel()
                except QueueUnavailable as exc:  # the reply is still withdrawn when it ends
                    log.warning("could not stop the reply to deleted message %s: %s", message_id, exc)

    async def _store_shown(self, key: ConversationKey, persona: Persona, text: str, message_ids: list[int]) -> None:
        """Store a reply shown in `message_ids`. A moderator may have deleted one of them while it was being
        written, when the deletion found nothing stored: then the stored turn is deleted too, so the text
        never comes back in a prompt (deleting any part deletes the whole turn)."""
        await self.chat.store_reply(key, persona, text, message_ids)
        gone = next((message_id for message_id in message_ids if message_id in self._deleted), None)
        if gone is not None:
            await self.chat.store.delete_message(gone)

    # ----- replying -----

    async def reply(
        self, channel: discord.abc.Messageable, key: ConversationKey, persona: Persona, *,
        asked: Asked | None = None, hand_offs: int | None = None,
    ) -> None:
        """Generate and stream one reply of `persona` to what was `asked` (None: a persona's hand-off); never
        raises for queue, worker or Discord trouble (a reply started by a command runs in the background,
        where nobody would see the error).

        A finished reply that starts with another active persona's name or wake word ("Sherlock, what do
        you make of this?") hands the turn to that persona, up to HERMES_PERSONA_HAND_OFFS times in a row.
        """
        if not may_speak(channel):
            log.info("not replying in %s: the bot may not send messages there", key)
            return
        try:
            with self._working():
                text = await self._reply(channel, key, persona, asked)
                left = self.settings.persona_hand_offs if hand_offs is None else hand_offs
                handing_off = text is not None and left > 0 and self.accepting  # no new reply once shutdown began
                if handing_off and (addressed := await self._addressed_persona(key, persona, text)):
                    await self.reply(channel, key, addressed, hand_offs=left - 1)
        except DISCORD_FAILURES as exc:  # e.g. Discord refused the busy notice: nothing to show it on
            log.warning("could not deliver a reply or notice in %s: %s", key, exc)
        except StoreUnavailable as exc:
            log.warning("database unavailable; no hand-off in %s: %s", key, exc)
        except QueueUnavailable as exc:  # e.g. cancelling a job after Discord refused its message
            log.warning("queue unavailable in %s: %s", key, exc)

    @contextlib.contextmanager
    def _working(self) -> Iterator[None]:
        """Counts as work in flight, which `drain` waits for (nested uses count once each)."""
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def introduce(self, channel: discord.abc.Messageable, key: ConversationKey, persona: Persona) -> None:
        """A persona that joins a channel posts its greeting, kept as its first turn there (in role-play
        the greeting sets the scene the model continues). Discord trouble is logged, not raised."""
        if not persona.greeting or not may_speak(channel):
            return
        live = await self._live_reply(channel, persona)
        try:
            await live.finish(persona.greeting)
        except DISCORD_FAILURES as exc:
            log.warning("could not post %s's greeting in %s: %s", persona.id, key, exc)
            return
        self._take_part(key)
        await self._store_shown(key, persona, persona.greeting, live.ids)

    async def _live_reply(self, channel: discord.abc.Messageable, persona: Persona) -> LiveReply:
        """Where a reply of `persona` here is shown; each of its messages is remembered as `persona`'s as
        soon as it is sent, and a moderator deleting the webhook gets it a new outlet."""
        async def reopen(gone: Outlet) -> Outlet:
            return await self.identities.replace(gone, channel, persona)  # type: ignore[arg-type]

        def remember(message_id: int) -> None:
            self.sent[message_id] = persona.id

        return LiveReply(await self.identities.outlet(channel, persona), reopen=reopen, on_send=remember)

    async def _addressed_persona(self, key: ConversationKey, speaker: Persona, text: str) -> Persona | None:
        """Another persona active here that `text` addresses at its start, as a person would. Most
        replies address nobody, so the channel's settings are read only when a name starts the text."""
        personas = self.chat.personas
        addressed = personas.find_addressed(text, [p.id for p in personas if p.id != speaker.id], speaker=speaker)
        if addressed is None:
            return None
        channel = await self.chat.store.get_settings(key)
        active = active_personas(channel, personas, self.settings.default_persona)
        return addressed if addressed.id in active else None

    async def _reply(
        self, channel: discord.abc.Messageable, key: ConversationKey, persona: Persona, asked: Asked | None
    ) -> str | None:
        """Stream one reply; its text when it finished normally and was shown, else None."""
        live = await self._live_reply(channel, persona)
        text, stored = None, False
        try:
            text, stored = await self._write_reply(channel, key, persona, live, asked)
        finally:
            if stored:
                self.unstored.pop(key, None)
            elif live.ids:
                self.unstored[key] = (persona.id, tuple(live.ids))
        return text

    async def _write_reply(
        self, channel: discord.abc.Messageable, key: ConversationKey, persona: Persona, live: LiveReply,
        asked: Asked | None,
    ) -> tuple[str | None, bool]:
        """Generate, show and store one reply through `live`: its text when it finished normally and was
        shown (else None), and whether its text was stored. A reply whose message is deleted while it is
        written (a moderator removing spam) is stopped and withdrawn, and not stored."""
        trigger, began = (asked.message_id if asked else None), time.monotonic()
        if self._left_out(key, began, trigger):  # deleted between being stored and now
            return None, False
        try:
            pending = await self.chat.start_reply(key, persona, asker=asked.user_id if asked else None)
        except QueueBusy as exc:
            metrics.count_error("busy")
            if self._busy_notice_due(key):
                await live.finish(str(exc))
            else:
                log.info("busy again in %s: the last notice still stands", key)
            return None, False
        except QueueUnavailable:
            metrics.count_error("queue_unavailable")
            await live.finish(UNAVAILABLE)
            return None, False
        except StoreUnavailable as exc:
            metrics.count_error("store_unavailable")
            log.warning("database unavailable; no reply in %s: %s", key, exc)
            await live.finish(STORE_DOWN)
            return None, False
        self.running.setdefault(key, []).append(pending)
        if trigger is not None:
            self._answering[trigger] = pending
        text, ending = "", FAILED
        try:
            if self._left_out(key, began, trigger):  # deleted while the job was being submitted
                await pending.cancel()
            text, ending = await self._stream(channel, live, pending, persona.name)
            if trigger in self._deleted:
                await live.withdraw()
                return None, False
            if ending is SUPERSEDED:  # no "stopped" nobody asked for; a job that never started shows nothing
                if not text.strip():
                    await live.withdraw()
                    return None, False
                ending = ""
            await live.finish(text + ending if text.strip() else ending or EMPTY)
        except (*DISCORD_FAILURES, Muted) as exc:  # e.g. no permission to post here: nothing to show it on
            log.warning("could not deliver reply in %s: %s", key, exc)
            await pending.cancel()
            ending = FAILED
        finally:
            pending.finished()
            if trigger is not None:
                del self._answering[trigger]
            self.running[key].remove(pending)
            if not self.running[key]:
                del self.running[key]
        if not (text.strip() and live.ids) or self._left_out(key, began, trigger):
            return None, False
        try:
            await self._store_shown(key, persona, text.strip(), live.ids)
            if self._left_out(key, began, trigger):  # a deletion or /reset came while it was being stored
                await self.chat.store.delete_message(live.ids[0])
                return None, False
        except StoreUnavailable as exc:  # shown, but the next prompt will not contain it
            metrics.count_error("store_unavailable")
            log.warning("reply shown in %s but not stored: %s", key, exc)
            return (None if ending else text.strip()), False
        return (None if ending else text.strip()), True

    def _left_out(self, key: ConversationKey, began: float, trigger: int | None) -> bool:
        """Whether a reply begun at `began` (time.monotonic()) is to stay out of the history: the message it
        answers was deleted, or the conversation was reset since."""
        return (trigger is not None and trigger in self._deleted) or self._reset_at.get(key, -1.0) >= began

    async def leave_out_running(self, key: ConversationKey) -> int:
        """Stop the replies being written in `key` and keep them out of its history (after a /reset: they
        answer the old conversation, and would be the first turn of the new one); how many there were."""
        self._reset_at[key] = time.monotonic()
        return await self.stop_running(key)

    async def stop_running(self, key: ConversationKey) -> int:
        """Cancel the replies being written in `key` (/stop, /reset); how many there were."""
        running = list(self.running.get(key, ()))
        for pending in running:
            await pending.cancel()
        return len(running)

    def _busy_notice_due(self, key: ConversationKey) -> bool:
        """True at most once per BUSY_NOTICE_EVERY_S per conversation (and then counts it as sent)."""
        now = time.monotonic()
        self._busy_noticed = {k: t for k, t in self._busy_noticed.items() if now - t < BUSY_NOTICE_EVERY_S}
        if key in self._busy_noticed:
            return False
        self._busy_noticed[key] = now
        return True

    async def _stream(
        self, channel: discord.abc.Messageable, live: LiveReply, pending: PendingReply, name: str
    ) -> tuple[str, str]:
        """Show text as it arrives, without a leading label of the persona's own `name` ("Mira: ...", which the
        model copies from other speakers' lines); returns the reply text and what to append (a notice) at the
        end."""
        if pending.position >= WAIT_NOTICE_POSITION:
            await live.show(WAITING.format(position=pending.position))
        typing = asyncio.create_task(_keep_typing(channel))
        raw, text, ending = "", "", ""
        try:
            async for event in pending.events():
                if isinstance(event, TextDelta):
                    raw += event.text
                    text = without_own_name(raw, name, partial=True)
                    if text.strip():
                        typing.cancel()
                        if not may_speak(channel):  # muted mid-reply: a webhook would go on posting
                            raise Muted(f"the bot may no longer send messages in {channel}")
                        await live.show(text)
                elif isinstance(event, Done):
                    ending = {"cancelled": STOPPED, "superseded": SUPERSEDED, "deadline": TOO_SLOW}.get(
                        event.finish_reason, ""
                    )
                elif isinstance(event, ErrorEvent):
                    metrics.count_failed_reply(event.kind)
                    log.warning("reply failed kind=%s: %s", event.kind, event.message)
                    ending = UNAVAILABLE if event.kind in ("timeout", "dead_letter", "unavailable") else FAILED
        except QueueUnavailable as exc:  # the queue went away mid-reply: say so under what was shown
            metrics.count_error("queue_unavailable")
            log.warning("queue unavailable while streaming: %s", exc)
            ending = UNAVAILABLE
        finally:
            typing.cancel()
        text = without_own_name(raw, name)
        if ending and ending not in (STOPPED, SUPERSEDED) and text.strip():
            ending = "\n\n" + ending
        return text, ending


@contextlib.contextmanager
def _store_trouble_logged(what: str) -> Iterator[None]:
    """Mirroring an event into a database that is down: log one line, not a traceback per event."""
    try:
        yield
    except StoreUnavailable as exc:
        metrics.count_error("store_unavailable")
        log.warning("database unavailable; %s was not mirrored: %s", what, exc)


async def _keep_typing(channel: discord.abc.Messageable) -> None:
    """Show "typing…" until cancelled; a failure to show it never affects the reply."""
    with contextlib.suppress(*DISCORD_FAILURES):
        while True:
            await channel.typing()
            await asyncio.sleep(TYPING_REFRESH_S)


def message_text(message: discord.Message, bot_id: int) -> str:
    """The text as people read it (mentions as @names), minus an @bot at the start, plus one line per
    attachment or sticker (the model cannot see them, but it should know they are there) and the text
    of a forwarded message."""
    text = message.clean_content
    ours = [u.display_name for u in message.mentions if u.id == bot_id]
    ours += [r.name for r in message.role_mentions if _is_role_of(bot_id, r)]  # "@Hermes" may pick its role
    for name in ours:
        text = re.sub(rf"^\s*@{re.escape(name)}[\s,:]*", "", text)
    notes = [f"[attached {_file_kind(a)}: {a.filename}]" for a in message.attachments]
    notes += [f"[sticker: {sticker.name}]" for sticker in message.stickers]
    notes += [f"[forwarded message] {_readable_mentions(snapshot.content, message.guild)}".strip()
              for snapshot in message.message_snapshots]
    return "\n".join([text.strip(), *notes]).strip()


_RAW_MENTION = re.compile(r"<(@!?|@&|#)(\d+)>")


def _readable_mentions(text: str, guild: discord.Guild | None) -> str:
    """A forward's raw `<@id>`, `<@&id>`, `<#id>` as names, the way `clean_content` shows a typed message:
    discord.py 2.7 reads no mentions from a forwarded snapshot, and the model should read names, not ids.
    Without the members intent a user is "@someone"; a channel of another server "#channel"."""
    def name(match: re.Match[str]) -> str:
        kind, snowflake = match[1], int(match[2])
        if kind == "#":
            channel = guild.get_channel_or_thread(snowflake) if guild else None
            return f"#{channel.name}" if channel else "#channel"
        if kind == "@&":
            role = guild.get_role(snowflake) if guild else None
            return f"@{role.name}" if role else "@role"
        member = guild.get_member(snowflake) if guild else None
        return f"@{member.display_name}" if member else "@someone"
    return _RAW_MENTION.sub(name, text)


def may_speak(channel: discord.abc.Messageable) -> bool:
    """Whether the bot may post in `channel` itself. A webhook posts even where moderators muted the bot
    (Discord checks no channel permission for it), so personas must ask this before they speak."""
    if not isinstance(channel, discord.abc.GuildChannel | discord.Thread):
        return True  # a DM
    permissions = channel.permissions_for(channel.guild.me)
    return permissions.send_messages_in_threads if isinstance(channel, discord.Thread) else permissions.send_messages


def _is_role_of(bot_id: int, role: discord.Role) -> bool:
    """The role Discord made for this bot when it joined: typing "@Hermes" offers it next to the bot, so
    people mention it as often as the bot itself."""
    return role.tags is not None and role.tags.bot_id == bot_id


def _replied_to(message: discord.Message) -> discord.MessageReference | None:
    """The message this one answers; a forward also references its original, but answers nothing."""
    ref = message.reference
    return ref if ref is not None and ref.type is discord.MessageReferenceType.reply else None


def _file_kind(attachment: discord.Attachment) -> str:
    kind = (attachment.content_type or "").split("/", 1)[0]
    return kind if kind in ("image", "video", "audio") else "file"
