"""FakeDiscord: a scripted Discord (REST + gateway) on 127.0.0.1 for the real discord.py client.

Tests build a world (guilds, channels, users, roles), then play users: `send_message`,
`edit_message`, `delete_message`, `invoke_slash` send real gateway events. Everything the client
does over REST is recorded (`requests`) and applied to the world (messages, webhooks, commands,
interaction responses) and echoed back over the gateway like Discord does. `wait_for` lets tests
wait on any of it without sleeping blindly.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from tests.fakediscord.gateway import GatewaySession
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
    Snowflakes,
    StoredMessage,
    User,
    Webhook,
    iso_now,
)
from tests.fakediscord.rest import RestApi
from tests.fakediscord.wire import LOADING_FLAG, RECORD, ApiError, json_response

T = TypeVar("T")
log = logging.getLogger(__name__)
API_PREFIX = "/api/v10"


DROP_CONNECTION = 599  # a fault's status that means: no answer at all, the connection closes
LOSE_ANSWER = 598  # a fault's status that means: the call is carried out, then its answer is lost on the way


@dataclass
class _Fault:
    method: str
    route: str
    remaining: int
    status: int
    body: dict[str, Any]
    headers: dict[str, str]

    def matches(self, rec: RecordedRequest) -> bool:
        return self.remaining > 0 and self.method == rec.method and self.route in (rec.route, rec.path)


class FakeDiscord:
    """The fake server and its world. Create, `await start()`, build a world, connect a client."""

    def __init__(self, *, token: str = "fake-bot-token", bot_name: str = "hermes") -> None:
        self.ids = Snowflakes()
        self.token = token
        self.application_id = self.ids.next()
        self.bot_user = User(self.ids.next(), bot_name, bot=True)
        self.app_owner = User(self.ids.next(), "app-owner")
        self.users: dict[int, User] = {u.id: u for u in (self.bot_user, self.app_owner)}
        self.guilds: dict[int, Guild] = {}
        self.channels: dict[int, Channel] = {}
        self.messages: dict[int, StoredMessage] = {}
        self.webhooks: dict[int, Webhook] = {}
        self.interactions: dict[int, InteractionRecord] = {}
        self.global_commands: list[dict[str, Any]] = []
        self.guild_commands: dict[int, list[dict[str, Any]]] = {}
        self.requests: list[RecordedRequest] = []
        self.sessions: list[GatewaySession] = []
        self._faults: list[_Fault] = []
        self._announced_dms: set[int] = set()
        self._waiters: set[asyncio.Event] = set()
        self._runner: web.AppRunner | None = None
        self.interaction_deadline_s = 3.0  # Discord drops interactions not answered in 3 s
        self.recommended_shards = 1  # what GET /gateway/bot tells an auto-sharded client
        self.port = 0

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def api_base(self) -> str:
        """Value for discord.http.Route.BASE / HERMES_DISCORD_API_BASE."""
        return f"http://127.0.0.1:{self.port}{API_PREFIX}"

    @property
    def gateway_url(self) -> str:
        """Value for DiscordWebSocket.DEFAULT_GATEWAY / HERMES_DISCORD_GATEWAY_URL."""
        return f"ws://127.0.0.1:{self.port}/gateway"

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/gateway", self._gateway)
        app.router.add_routes(RestApi(self).routes(API_PREFIX))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        for session in list(self.sessions):
            await session.ws.close(code=1001)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def end_sessions(self, code: int, reason: str) -> None:
        """Close every gateway session with `code`, as Discord ends a session for good (4004: the token
        was reset, 4014: an intent was turned off in the developer portal)."""
        for session in list(self.sessions):
            await session.ws.close(code=code, message=reason.encode())

    # ---- waiting ---------------------------------------------------------------------------

    def _notify(self) -> None:
        for event in self._waiters:
            event.set()

    async def wait_for(
        self,
        predicate: Callable[[], T | Awaitable[T]],
        timeout: float = 5.0,  # noqa: ASYNC109
        *,
        what: str = "",
    ) -> T:
        """Return predicate()'s first truthy value; re-checked on every change here and every 50 ms,
        so predicates over the client's state or (async ones) over a database work too.
        Times out with an AssertionError that lists the recent requests."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                recent = "\n  ".join(
                    f"{r.status} {r.method} {r.path} {r.json!r:.200}" for r in self.requests[-15:]
                )
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what or repr(predicate)}; last requests:\n  {recent}"
                )
            event = asyncio.Event()
            self._waiters.add(event)
            try:
                await asyncio.wait_for(event.wait(), min(remaining, 0.05))
            except TimeoutError:
                pass
            finally:
                self._waiters.discard(event)

    async def wait_for_request(
        self,
        method: str,
        route: str,
        *,
        count: int = 1,
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> list[RecordedRequest]:
        """Wait until `count` calls of METHOD to a route template or concrete path were answered."""

        def found() -> list[RecordedRequest]:
            hits = self.requests_to(method, route)
            return hits if len(hits) >= count else []

        return await self.wait_for(found, timeout, what=f"{count}x {method} {route}")

    async def wait_for_message(
        self,
        channel: Channel | int,
        predicate: Callable[[StoredMessage], bool] = lambda m: True,
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> StoredMessage:
        """The first live message in the channel that satisfies predicate."""
        cid = _id(channel)

        def found() -> StoredMessage | None:
            return next((m for m in self.channel_messages(cid) if predicate(m)), None)

        return await self.wait_for(found, timeout, what=f"a matching message in channel {cid}")

    @property
    def connected(self) -> bool:
        return any(s.identified for s in self.sessions)

    # ---- queries ---------------------------------------------------------------------------

    def requests_to(self, method: str, route: str) -> list[RecordedRequest]:
        """Answered calls of METHOD to a route template ('/channels/{channel_id}/messages') or path."""
        return [r for r in self.requests if r.method == method and route in (r.route, r.path) and r.status]

    def channel_messages(
        self, channel: Channel | int, *, include_deleted: bool = False
    ) -> list[StoredMessage]:
        cid = _id(channel)
        return [
            m for m in self.messages.values() if m.channel_id == cid and (include_deleted or not m.deleted)
        ]

    def bot_messages(self, channel: Channel | int) -> list[StoredMessage]:
        """Live messages the bot wrote in the channel, itself or through any webhook."""
        return [
            m
            for m in self.channel_messages(channel)
            if m.author.id == self.bot_user.id or m.webhook_id in self.webhooks
        ]

    def commands(self, guild: Guild | int | None = None) -> list[dict[str, Any]]:
        """The synced application commands: global ones, or one guild's."""
        return self.global_commands if guild is None else self.guild_commands.get(_id(guild), [])

    def channel_webhooks(self, channel: Channel | int) -> list[Webhook]:
        return [w for w in self.webhooks.values() if w.channel_id == _id(channel)]

    # ---- knobs -----------------------------------------------------------------------------

    def inject_429(
        self, method: str, route: str, *, times: int = 1, retry_after: float = 0.2, is_global: bool = False
    ) -> None:
        """Answer the next `times` calls of METHOD route with 429 and Discord's rate-limit headers."""
        headers = {
            "Retry-After": str(max(1, round(retry_after))),
            "X-RateLimit-Limit": "5",
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": f"{time.time() + retry_after:.3f}",
            "X-RateLimit-Reset-After": f"{retry_after:.3f}",
            "X-RateLimit-Bucket": _bucket(route),
            "X-RateLimit-Scope": "global" if is_global else "user",
            "Via": "1.1 google",
        }
        body = {"message": "You are being rate limited.", "retry_after": retry_after, "global": is_global}
        self._faults.append(_Fault(method, route, times, 429, body, headers))

    def inject_error(
        self,
        method: str,
        route: str,
        *,
        status: int,
        code: int = 0,
        message: str = "injected",
        times: int = 1,
    ) -> None:
        """Answer the next `times` calls of METHOD route with an error in Discord's JSON shape."""
        self._faults.append(_Fault(method, route, times, status, {"message": message, "code": code}, {}))

    def inject_disconnect(self, method: str, route: str, *, times: int = 1, after_handling: bool = False) -> None:
        """Drop the connection of the next `times` calls of METHOD route without an answer (a reset on
        the way: the client gets a network error, not an HTTP status). `after_handling`: Discord carried the
        call out (a message was stored) and only its answer was lost."""
        self._faults.append(_Fault(method, route, times, LOSE_ANSWER if after_handling else DROP_CONNECTION, {}, {}))

    # ---- building the world ----------------------------------------------------------------

    async def add_user(self, username: str, *, bot: bool = False, global_name: str | None = None) -> User:
        user = User(self.ids.next(), username, bot=bot, global_name=global_name)
        self.users[user.id] = user
        return user

    async def add_guild(
        self,
        name: str,
        *,
        bot_permissions: int = Perm.BOT_DEFAULT,
        everyone_permissions: int = Perm.EVERYONE_DEFAULT,
    ) -> Guild:
        """A guild the bot is in: @everyone, the bot's managed role (tagged with its id), an owner, the bot member."""
        gid = self.ids.next()
        owner = await self.add_user(f"{name}-owner")
        guild = Guild(gid, name, owner.id)
        guild.roles[gid] = Role(gid, gid, "@everyone", everyone_permissions, 0)
        bot_role = Role(self.ids.next(), gid, self.bot_user.username, bot_permissions, 1, bot_id=self.bot_user.id)
        guild.roles[bot_role.id] = bot_role
        guild.bot_role_id = bot_role.id
        guild.members[owner.id] = Member(owner, gid)
        guild.members[self.bot_user.id] = Member(self.bot_user, gid, [bot_role.id])
        self.guilds[gid] = guild
        await self._broadcast("GUILD_CREATE", guild.payload(), Intent.GUILDS, gid)
        return guild

    async def add_role(self, guild: Guild, name: str, permissions: int = 0) -> Role:
        role = Role(self.ids.next(), guild.id, name, permissions, len(guild.roles))
        guild.roles[role.id] = role
        await self._broadcast(
            "GUILD_ROLE_CREATE", {"guild_id": str(guild.id), "role": role.payload()}, Intent.GUILDS, guild.id
        )
        return role

    async def set_role_permissions(self, role: Role, permissions: int) -> None:
        role.permissions = permissions
        data = {"guild_id": str(role.guild_id), "role": role.payload()}
        await self._broadcast("GUILD_ROLE_UPDATE", data, Intent.GUILDS, role.guild_id)

    async def set_bot_permissions(self, guild: Guild, permissions: int) -> None:
        """E.g. `Perm.BOT_DEFAULT & ~Perm.MANAGE_WEBHOOKS` to make webhook calls answer 403/50013."""
        await self.set_role_permissions(guild.roles[guild.bot_role_id], permissions)

    async def add_member(self, guild: Guild, user: User, roles: Iterable[Role] = ()) -> Member:
        member = Member(user, guild.id, [r.id for r in roles])
        guild.members[user.id] = member
        data = {**member.payload(), "guild_id": str(guild.id)}
        await self._broadcast("GUILD_MEMBER_ADD", data, Intent.GUILD_MEMBERS, guild.id)
        return member

    async def add_channel(self, guild: Guild, name: str) -> Channel:
        channel = Channel(self.ids.next(), ChannelType.TEXT, name, guild.id, position=len(guild.channels))
        self._register_channel(guild, channel)
        await self._broadcast("CHANNEL_CREATE", channel.payload(), Intent.GUILDS, guild.id)
        return channel

    async def add_thread(self, parent: Channel, name: str, *, owner: User | None = None) -> Channel:
        """A public thread under a text channel, announced with THREAD_CREATE(newly_created)."""
        guild = self.guilds[_require(parent.guild_id)]
        owner_id = (owner or self.bot_user).id
        thread = Channel(self.ids.next(), ChannelType.PUBLIC_THREAD, name, guild.id, parent.id, owner_id)
        self._register_channel(guild, thread)
        await self._broadcast("THREAD_CREATE", {**thread.payload(), "newly_created": True}, Intent.GUILDS, guild.id)
        return thread

    async def open_dm(self, user: User) -> Channel:
        """The DM channel between the bot and `user` (Discord keeps one per pair)."""
        for channel in self.channels.values():
            if channel.type == ChannelType.DM and channel.recipient == user:
                return channel
        channel = Channel(self.ids.next(), ChannelType.DM, recipient=user)
        self.channels[channel.id] = channel
        return channel

    async def add_webhook(self, channel: Channel, name: str, *, creator: User) -> Webhook:
        """A webhook someone else made (an integration, a moderator): the bot must not take it over."""
        webhook = Webhook(
            id=self.ids.next(),
            token=secrets.token_urlsafe(32),
            channel_id=channel.id,
            guild_id=_require(channel.guild_id),
            name=name,
            creator=creator,
            application_id=self.application_id if creator == self.bot_user else 0,
        )
        self.webhooks[webhook.id] = webhook
        return webhook

    async def remove_webhook(self, webhook: Webhook) -> None:
        """A moderator deletes the webhook: later calls with it answer 404 Unknown Webhook (10015)."""
        del self.webhooks[webhook.id]
        self._notify()

    def _register_channel(self, guild: Guild, channel: Channel) -> None:
        guild.channels[channel.id] = channel
        self.channels[channel.id] = channel

    # ---- users acting ----------------------------------------------------------------------

    async def send_message(
        self,
        channel: Channel | int,
        author: User,
        content: str,
        *,
        mentions: Iterable[User] = (),
        reply_to: StoredMessage | int | None = None,
        mention_author: bool = True,
        message_id: int | None = None,
        attachments: Iterable[tuple[str, str]] = (),
        stickers: Iterable[str] = (),
    ) -> StoredMessage:
        """A user posts: stored, then MESSAGE_CREATE (CHANNEL_CREATE first for a new DM).

        `attachments` are (filename, content type) pairs, as uploaded files; `stickers` are names.
        """
        chan = self.channels[_id(channel)]
        if chan.type == ChannelType.DM and chan.id not in self._announced_dms:
            self._announced_dms.add(chan.id)
            await self._broadcast("CHANNEL_CREATE", chan.payload(), Intent.DIRECT_MESSAGES, None)
        mention_ids = [u.id for u in mentions] + [int(i) for i in re.findall(r"<@!?(\d+)>", content)]
        ref = self.messages[_id(reply_to)] if reply_to is not None else None
        if ref is not None and mention_author:
            mention_ids.append(ref.author.id)
        msg = StoredMessage(
            id=message_id or self.ids.next(),
            channel_id=chan.id,
            guild_id=chan.guild_id,
            author=author,
            content=content,
            reference_id=ref.id if ref else None,
            mention_ids=list(dict.fromkeys(mention_ids)),
            attachments=[self._attachment(chan, name, kind) for name, kind in attachments],
            sticker_items=[{"id": str(self.ids.next()), "name": name, "format_type": 1} for name in stickers],
        )
        await self.store_message(msg)
        return msg

    async def forward_message(self, source: StoredMessage, channel: Channel | int, author: User) -> StoredMessage:
        """A user forwards `source` into `channel`: an empty message whose snapshot carries the original."""
        chan = self.channels[_id(channel)]
        msg = StoredMessage(
            id=self.ids.next(), channel_id=chan.id, guild_id=chan.guild_id, author=author, content="",
            reference_id=source.id, forwarded=True,
        )
        await self.store_message(msg)
        return msg

    def _attachment(self, channel: Channel, filename: str, content_type: str) -> dict[str, Any]:
        attachment_id = self.ids.next()
        url = f"https://cdn.discordapp.com/attachments/{channel.id}/{attachment_id}/{filename}"
        return {"id": str(attachment_id), "filename": filename, "size": 1024, "url": url, "proxy_url": url,
                "content_type": content_type}

    async def edit_message(self, message: StoredMessage, content: str) -> StoredMessage:
        """Anyone's edit, as Discord reports it: MESSAGE_UPDATE with the full new message."""
        message.history.append(message.content)
        message.edit_times.append(time.monotonic())
        message.content = content
        message.edited_at = iso_now()
        message.flags &= ~LOADING_FLAG
        if not message.ephemeral:
            await self._broadcast_message("MESSAGE_UPDATE", message)
        self._notify()
        return message

    async def delete_message(self, message: StoredMessage) -> None:
        message.deleted = True
        data: dict[str, Any] = {"id": str(message.id), "channel_id": str(message.channel_id)}
        if message.guild_id:
            data["guild_id"] = str(message.guild_id)
        intent = Intent.GUILD_MESSAGES if message.guild_id else Intent.DIRECT_MESSAGES
        if not message.ephemeral:
            await self._broadcast("MESSAGE_DELETE", data, intent, message.guild_id)
        self._notify()

    async def invoke_slash(
        self,
        command: str,
        options: Mapping[str, Any] | None = None,
        *,
        user: User,
        channel: Channel,
        member_permissions: int | None = None,
    ) -> InteractionRecord:
        """A user runs `/command [group] [sub]` with options; the command must have been synced.

        Option types come from the synced definition, subcommands are nested as Discord does,
        and member.permissions is the member's role permissions unless `member_permissions` is given.
        """
        root, *path = command.split()
        guild = self.guilds.get(channel.guild_id or 0)
        definition, in_guild = self._find_command(root, guild)
        option_defs = definition.get("options", [])
        path_types: list[int] = []
        for sub in path:
            found = next((o for o in option_defs if o["name"] == sub and o.get("type") in (1, 2)), None)
            if found is None:
                raise LookupError(f"/{root} has no subcommand {sub!r} in the synced definition")
            path_types.append(found["type"])
            option_defs = found.get("options", [])
        resolved: dict[str, Any] = {}
        leaf = [
            self._option(name, value, option_defs, guild, resolved) for name, value in (options or {}).items()
        ]
        nested: list[dict[str, Any]] = leaf
        for sub, kind in reversed(list(zip(path, path_types, strict=True))):
            nested = [{"type": kind, "name": sub, "options": nested}]
        data: dict[str, Any] = {"id": definition["id"], "name": root, "type": 1, "options": nested}
        if resolved:
            data["resolved"] = resolved
        if in_guild and guild is not None:
            data["guild_id"] = str(guild.id)
        record = self._new_interaction(data, user, channel, guild, member_permissions)
        await self._broadcast("INTERACTION_CREATE", record.payload, None, channel.guild_id)
        return record

    def _find_command(self, name: str, guild: Guild | None) -> tuple[dict[str, Any], bool]:
        if guild is not None:
            for cmd in self.guild_commands.get(guild.id, []):
                if cmd["name"] == name:
                    return cmd, True
        for cmd in self.global_commands:
            if cmd["name"] == name:
                return cmd, False
        raise LookupError(f"/{name} is not a synced command (global or in this guild); sync the tree first")

    def _option(
        self, name: str, value: Any, defs: list[dict[str, Any]], guild: Guild | None, resolved: dict[str, Any]
    ) -> dict[str, Any]:
        definition = next((o for o in defs if o["name"] == name), None)
        if definition is None:
            raise LookupError(f"option {name!r} is not in the synced definition: {[o['name'] for o in defs]}")
        kind = definition["type"]
        if kind == 6:  # USER
            user = value if isinstance(value, User) else self.users[int(value)]
            resolved.setdefault("users", {})[str(user.id)] = user.payload()
            if guild is not None and user.id in guild.members:
                member = guild.members[user.id].payload(with_user=False)
                resolved.setdefault("members", {})[str(user.id)] = member
            value = str(user.id)
        elif kind not in (3, 4, 5, 10):
            raise NotImplementedError(f"fake Discord cannot send option type {kind} ({name!r})")
        return {"type": kind, "name": name, "value": value}

    def _new_interaction(
        self, data: dict[str, Any], user: User, channel: Channel, guild: Guild | None, perms: int | None
    ) -> InteractionRecord:
        iid, token = self.ids.next(), f"interaction-{secrets.token_hex(16)}"
        payload: dict[str, Any] = {
            "id": str(iid),
            "application_id": str(self.application_id),
            "type": 2,
            "data": data,
            "channel_id": str(channel.id),
            "channel": channel.payload(),
            "token": token,
            "version": 1,
            "locale": "en-US",
            "entitlements": [],
            "attachment_size_limit": 10 * 1024 * 1024,
        }
        if guild is not None:
            if user.id not in guild.members:
                raise LookupError(f"{user.username} is not a member of {guild.name}")
            member_perms = guild.permissions_of(user.id) if perms is None else perms
            payload.update(
                guild_id=str(guild.id),
                guild={"id": str(guild.id), "locale": "en-US", "features": []},
                guild_locale="en-US",
                member=guild.members[user.id].payload(permissions=member_perms),
                app_permissions=str(guild.permissions_of(self.bot_user.id)),
                authorizing_integration_owners={"0": str(guild.id)},
                context=0,
            )
        else:
            payload.update(
                user=user.payload(),
                app_permissions=str(Perm.EVERYONE_DEFAULT),
                authorizing_integration_owners={"1": str(user.id)},
                context=1,
            )
        record = InteractionRecord(iid, token, channel.id, channel.guild_id, user, payload)
        self.interactions[iid] = record
        return record

    # ---- messages: storage and gateway echo ------------------------------------------------

    async def store_message(self, msg: StoredMessage) -> None:
        """Keep a new message and announce it (ephemeral ones stay between client and user)."""
        self.messages[msg.id] = msg
        if not msg.ephemeral:
            await self._broadcast_message("MESSAGE_CREATE", msg)
        self._notify()

    def message_payload(self, msg: StoredMessage, *, nested: bool = False) -> dict[str, Any]:
        author = msg.author.payload()
        if msg.webhook_id and msg.username:
            author = {**author, "username": msg.username, "global_name": None}
        data: dict[str, Any] = {
            "id": str(msg.id),
            "channel_id": str(msg.channel_id),
            "author": author,
            "content": msg.content,
            "timestamp": msg.timestamp,
            "edited_timestamp": msg.edited_at,
            "tts": False,
            "mention_everyone": "everyone" in msg.pings(),
            "mentions": [self.users[i].payload() for i in msg.mention_ids if i in self.users],
            "mention_roles": list(dict.fromkeys(re.findall(r"<@&(\d+)>", msg.content))),
            "attachments": msg.attachments,
            "sticker_items": msg.sticker_items,
            "embeds": msg.embeds,
            "pinned": False,
            "type": 0,
            "flags": msg.flags,
            "components": [],
        }
        if msg.guild_id:
            data["guild_id"] = str(msg.guild_id)
            member = self.guilds[msg.guild_id].members.get(msg.author.id)
            if member is not None and msg.webhook_id is None:
                data["member"] = member.payload(with_user=False)
        if msg.webhook_id:
            data["webhook_id"] = str(msg.webhook_id)
        if msg.reference_id is not None:
            ref = self.messages.get(msg.reference_id)
            data["message_reference"] = {
                "type": 1 if msg.forwarded else 0,
                "message_id": str(msg.reference_id),
                "channel_id": str(ref.channel_id if ref is not None else msg.channel_id),
                **({"guild_id": str(msg.guild_id)} if msg.guild_id else {}),
            }
            if msg.forwarded and ref is not None:  # type stays 0: a forward is a plain message with a snapshot
                data["message_snapshots"] = [{"message": {
                    "type": 0, "content": ref.content, "embeds": ref.embeds, "attachments": ref.attachments,
                    "timestamp": ref.timestamp, "edited_timestamp": ref.edited_at, "flags": 0,
                }}]
            elif not msg.forwarded:
                data["type"] = 19
                if not nested:
                    data["referenced_message"] = (
                        None if ref is None or ref.deleted else self.message_payload(ref, nested=True)
                    )
        if msg.interaction_id is not None:
            record = self.interactions[msg.interaction_id]
            data["type"] = 20
            data["application_id"] = str(self.application_id)
            data["interaction_metadata"] = {
                "id": str(record.id),
                "type": 2,
                "user": record.user.payload(),
                "authorizing_integration_owners": record.payload["authorizing_integration_owners"],
            }
        return data

    async def redeliver(self, msg: StoredMessage) -> None:
        """MESSAGE_CREATE for a message already delivered, as Discord may send again (a replayed
        session, or two processes briefly holding one shard during a rolling deploy)."""
        await self._broadcast_message("MESSAGE_CREATE", msg)

    async def _broadcast_message(self, event: str, msg: StoredMessage) -> None:
        intent = Intent.GUILD_MESSAGES if msg.guild_id else Intent.DIRECT_MESSAGES
        full = self.message_payload(msg)
        for session in self._sessions_with(intent, msg.guild_id):
            data = full
            sees_content = (
                session.has_intent(Intent.MESSAGE_CONTENT)
                or not msg.guild_id
                or msg.author.id == self.bot_user.id
                or self.bot_user.id in msg.mention_ids
            )
            if not sees_content:
                data = {**full, "content": "", "embeds": [], "attachments": []}
            await session.dispatch(event, data)

    # ---- gateway ---------------------------------------------------------------------------

    def _sessions_with(self, intent: int | None, guild_id: int | None) -> list[GatewaySession]:
        """Identified sessions with the intent, on the shard that carries the guild (DMs: shard 0)."""
        return [
            s for s in self.sessions
            if s.identified and (intent is None or s.has_intent(intent)) and s.carries(guild_id)
        ]

    async def _broadcast(self, event: str, data: dict[str, Any], intent: int | None, guild_id: int | None) -> None:
        for session in self._sessions_with(intent, guild_id):
            await session.dispatch(event, data)
        self._notify()

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        if request.query.get("encoding", "json") != "json":
            raise web.HTTPBadRequest(text="fake Discord speaks encoding=json only")
        ws = web.WebSocketResponse()
        session = GatewaySession(ws, request.query.get("compress"), token=self.token)
        await ws.prepare(request)
        self.sessions.append(session)
        try:
            await session.serve(self._on_identify, self._on_request_members)
        finally:
            self.sessions.remove(session)
            self._notify()
        return ws

    async def _on_identify(self, session: GatewaySession, data: dict[str, Any]) -> None:
        guilds = [g for g in self.guilds.values() if self.bot_user.id in g.members and session.carries(g.id)]
        ready = {
            "v": 10,
            "user": {**self.bot_user.payload(), "verified": True, "mfa_enabled": False, "flags": 0},
            "guilds": [{"id": str(g.id), "unavailable": True} for g in guilds],
            "session_id": session.session_id,
            "resume_gateway_url": self.gateway_url,
            "application": {"id": str(self.application_id), "flags": 0},
            "shard": list(session.shard),
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "user_settings": {},
            "geo_ordered_rtc_regions": [],
            "guild_join_requests": [],
        }
        await session.dispatch("READY", ready)
        if session.has_intent(Intent.GUILDS):
            for guild in guilds:
                await session.dispatch("GUILD_CREATE", guild.payload())

    async def _on_request_members(self, session: GatewaySession, data: dict[str, Any]) -> None:
        guild = self.guilds[int(data["guild_id"])]
        chunk = {
            "guild_id": str(guild.id),
            "members": [m.payload() for m in guild.members.values()],
            "chunk_index": 0,
            "chunk_count": 1,
            "not_found": [],
        }
        if data.get("nonce"):
            chunk["nonce"] = data["nonce"]
        await session.dispatch("GUILD_MEMBERS_CHUNK", chunk)

    # ---- REST plumbing ---------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if not request.path.startswith(API_PREFIX):
            return await handler(request)
        resource = request.match_info.route.resource
        canonical = resource.canonical if resource is not None else request.path
        rec = RecordedRequest(
            method=request.method,
            path=request.path[len(API_PREFIX) :],
            route=canonical[len(API_PREFIX) :] if canonical.startswith(API_PREFIX) else canonical,
            query=dict(request.query),
            json=await _read_body(request),
            time=time.monotonic(),
        )
        self.requests.append(rec)
        request[RECORD] = rec
        response = self._fault_for(rec)
        lose_answer = response is not None and response.status == LOSE_ANSWER
        if response is not None and response.status == DROP_CONNECTION:
            assert request.transport is not None
            request.transport.close()
        elif response is None or lose_answer:
            try:
                if _needs_bot_auth(rec.route) and request.headers.get("Authorization") != f"Bot {self.token}":
                    raise ApiError(401, 0, "401: Unauthorized")
                response = await handler(request)
            except ApiError as exc:
                response = json_response({"message": exc.message, "code": exc.code}, exc.status)
            except web.HTTPException as exc:
                # A route the fake lacks: say so plainly instead of aiohttp's text/plain page.
                message = f"fake Discord has no route {request.method} {rec.path} ({exc.reason})"
                log.warning(message)
                response = json_response({"message": message, "code": 0}, exc.status)
            except Exception as exc:  # a fake bug must fail the test fast, not 500-retry
                log.exception("fake Discord failed on %s %s", request.method, rec.path)
                message = f"fake Discord error on {request.method} {rec.path}: {exc!r}"
                response = json_response({"message": message, "code": 0}, 400)
            if lose_answer:
                assert request.transport is not None
                request.transport.close()
        rec.status = LOSE_ANSWER if lose_answer else response.status
        self._notify()
        return response

    def _fault_for(self, rec: RecordedRequest) -> web.Response | None:
        for fault in self._faults:
            if fault.matches(rec):
                fault.remaining -= 1
                if fault.status in (DROP_CONNECTION, LOSE_ANSWER):
                    return web.Response(status=fault.status)
                return json_response(fault.body, fault.status, fault.headers)
        return None

    def rate_limit_headers(self, route: str) -> dict[str, str]:
        """Headers of a healthy bucket, as Discord sends them on every answer."""
        return {
            "X-RateLimit-Limit": "50",
            "X-RateLimit-Remaining": "49",
            "X-RateLimit-Reset": f"{time.time() + 1:.3f}",
            "X-RateLimit-Reset-After": "1.000",
            "X-RateLimit-Bucket": _bucket(route),
        }


def _needs_bot_auth(route: str) -> bool:
    """Webhook-token and interaction routes are authorized by their token, not the bot token."""
    return not (route.startswith("/webhooks/{webhook_id}/{token}") or route.startswith("/interactions/"))


async def _read_body(request: web.Request) -> Any:
    """JSON bodies as parsed JSON; multipart (files) as payload_json plus the file names."""
    if request.content_type == "application/json":
        return await request.json()
    if request.content_type.startswith("multipart/"):
        body: dict[str, Any] = {}
        files: list[dict[str, Any]] = []
        reader = await request.multipart()
        async for part in reader:
            data = await part.read()  # type: ignore[union-attr]
            if part.name == "payload_json":
                body.update(json.loads(data))
            else:
                files.append({"filename": part.filename, "size": len(data)})  # type: ignore[union-attr]
        if files:
            body["_files"] = files
        return body
    return None


def _bucket(route: str) -> str:
    return hashlib.sha1(route.encode()).hexdigest()[:16]


def _id(obj: Any) -> int:
    return obj if isinstance(obj, int) else obj.id


def _require(value: int | None) -> int:
    if value is None:
        raise ValueError("a guild channel is required here")
    return value
