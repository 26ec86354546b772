"""The fake Discord's world: users, guilds, roles, channels, messages, webhooks, and their JSON payloads.

Payloads follow Discord API v10 closely enough that discord.py 2.7 parses them as it parses the real
thing; what the real API sends but discord.py never reads is left out.
"""

from __future__ import annotations

import datetime as dt
import itertools
import re
import time
from dataclasses import dataclass, field
from typing import Any

DISCORD_EPOCH_MS = 1420070400000


class Perm:
    """Permission bits (Discord's values) so tests need not import discord.py to describe a world."""

    CREATE_INSTANT_INVITE = 1 << 0
    ADMINISTRATOR = 1 << 3
    MANAGE_CHANNELS = 1 << 4
    ADD_REACTIONS = 1 << 6
    VIEW_CHANNEL = 1 << 10
    SEND_MESSAGES = 1 << 11
    MANAGE_MESSAGES = 1 << 13
    EMBED_LINKS = 1 << 14
    ATTACH_FILES = 1 << 15
    READ_MESSAGE_HISTORY = 1 << 16
    MENTION_EVERYONE = 1 << 17
    MANAGE_ROLES = 1 << 28
    MANAGE_WEBHOOKS = 1 << 29
    USE_APPLICATION_COMMANDS = 1 << 31
    CREATE_PUBLIC_THREADS = 1 << 35
    SEND_MESSAGES_IN_THREADS = 1 << 38

    EVERYONE_DEFAULT = (
        VIEW_CHANNEL
        | SEND_MESSAGES
        | READ_MESSAGE_HISTORY
        | ADD_REACTIONS
        | EMBED_LINKS
        | ATTACH_FILES
        | USE_APPLICATION_COMMANDS
        | SEND_MESSAGES_IN_THREADS
        | CREATE_PUBLIC_THREADS
    )
    BOT_DEFAULT = EVERYONE_DEFAULT | MANAGE_WEBHOOKS | MANAGE_MESSAGES


class Intent:
    GUILDS = 1 << 0
    GUILD_MEMBERS = 1 << 1
    GUILD_MESSAGES = 1 << 9
    DIRECT_MESSAGES = 1 << 12
    MESSAGE_CONTENT = 1 << 15


class ChannelType:
    TEXT = 0
    DM = 1
    PUBLIC_THREAD = 11
    PRIVATE_THREAD = 12
    THREADS = (11, 12)


class Snowflakes:
    """Increasing snowflake ids with real timestamps, so discord.py's created_at makes sense."""

    def __init__(self) -> None:
        self._counter = itertools.count(1)

    def next(self) -> int:
        ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
        return (ms << 22) | (next(self._counter) & 0x3FFFFF)


def iso_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


@dataclass
class User:
    id: int
    username: str
    bot: bool = False
    global_name: str | None = None

    def payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "username": self.username,
            "global_name": self.global_name,
            "discriminator": "0",
            "avatar": None,
            "bot": self.bot,
            "public_flags": 0,
        }

    @property
    def mention(self) -> str:
        return f"<@{self.id}>"


@dataclass
class Role:
    id: int
    guild_id: int
    name: str
    permissions: int
    position: int = 0
    bot_id: int | None = None  # the role Discord gives a bot when it joins (managed, tagged with the bot)

    def payload(self) -> dict[str, Any]:
        tags = {"tags": {"bot_id": str(self.bot_id)}} if self.bot_id is not None else {}
        return {
            **tags,
            "id": str(self.id),
            "name": self.name,
            "permissions": str(self.permissions),
            "position": self.position,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "managed": self.bot_id is not None,
            "mentionable": True,
            "flags": 0,
            "icon": None,
            "unicode_emoji": None,
        }

    @property
    def mention(self) -> str:
        return f"<@&{self.id}>"


@dataclass
class Member:
    user: User
    guild_id: int
    roles: list[int] = field(default_factory=list)
    nick: str | None = None
    joined_at: str = field(default_factory=iso_now)

    def payload(self, *, with_user: bool = True, permissions: int | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "roles": [str(r) for r in self.roles],
            "nick": self.nick,
            "avatar": None,
            "joined_at": self.joined_at,
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "pending": False,
            "flags": 0,
            "communication_disabled_until": None,
        }
        if with_user:
            data["user"] = self.user.payload()
        if permissions is not None:
            data["permissions"] = str(permissions)
        return data


@dataclass
class Channel:
    id: int
    type: int
    name: str | None = None
    guild_id: int | None = None
    parent_id: int | None = None
    owner_id: int | None = None
    position: int = 0
    recipient: User | None = None
    archived: bool = False

    @property
    def is_thread(self) -> bool:
        return self.type in ChannelType.THREADS

    @property
    def mention(self) -> str:
        return f"<#{self.id}>"

    def payload(self) -> dict[str, Any]:
        if self.type == ChannelType.DM:
            assert self.recipient is not None
            return {
                "id": str(self.id),
                "type": self.type,
                "last_message_id": None,
                "recipients": [self.recipient.payload()],
                "flags": 0,
            }
        data: dict[str, Any] = {
            "id": str(self.id),
            "type": self.type,
            "guild_id": str(self.guild_id),
            "name": self.name,
            "position": self.position,
            "permission_overwrites": [],
            "nsfw": False,
            "parent_id": str(self.parent_id) if self.parent_id else None,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "topic": None,
            "flags": 0,
        }
        if self.is_thread:
            data.update(
                owner_id=str(self.owner_id) if self.owner_id else None,
                member_count=1,
                message_count=0,
                total_message_sent=0,
                thread_metadata={
                    "archived": self.archived,
                    "auto_archive_duration": 1440,
                    "archive_timestamp": iso_now(),
                    "locked": False,
                    "create_timestamp": iso_now(),
                },
            )
        return data


@dataclass
class Guild:
    id: int
    name: str
    owner_id: int
    bot_role_id: int = 0
    roles: dict[int, Role] = field(default_factory=dict)
    channels: dict[int, Channel] = field(default_factory=dict)
    members: dict[int, Member] = field(default_factory=dict)

    @property
    def everyone(self) -> Role:
        return self.roles[self.id]

    def permissions_of(self, user_id: int) -> int:
        """Guild-level permissions of a member (no channel overwrites: the fake has none)."""
        if user_id == self.owner_id:
            return (1 << 53) - 1
        member = self.members.get(user_id)
        if member is None:
            return 0
        value = self.everyone.permissions
        for role_id in member.roles:
            value |= self.roles[role_id].permissions
        if value & Perm.ADMINISTRATOR:
            return (1 << 53) - 1
        return value

    def payload(self) -> dict[str, Any]:
        channels = [c for c in self.channels.values() if not c.is_thread]
        threads = [c for c in self.channels.values() if c.is_thread and not c.archived]
        return {
            "id": str(self.id),
            "name": self.name,
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "banner": None,
            "description": None,
            "owner_id": str(self.owner_id),
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "preferred_locale": "en-US",
            "system_channel_id": None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "public_updates_channel_id": None,
            "vanity_url_code": None,
            "features": [],
            "emojis": [],
            "stickers": [],
            "roles": [r.payload() for r in self.roles.values()],
            "channels": [c.payload() for c in channels],
            "threads": [c.payload() for c in threads],
            "members": [m.payload() for m in self.members.values()],
            "member_count": len(self.members),
            "voice_states": [],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
            "large": False,
            "unavailable": False,
            "lazy": True,
            "joined_at": iso_now(),
            "application_id": None,
        }


@dataclass
class StoredMessage:
    """A message as the fake keeps it: current state plus everything tests assert on."""

    id: int
    channel_id: int
    guild_id: int | None
    author: User
    content: str
    created: float = field(default_factory=time.monotonic)
    webhook_id: int | None = None
    username: str | None = None
    avatar_url: str | None = None
    allowed_mentions: dict[str, Any] | None = None
    reference_id: int | None = None
    forwarded: bool = False  # the reference is a forward: the referenced message's snapshot goes along
    mention_ids: list[int] = field(default_factory=list)
    embeds: list[dict[str, Any]] = field(default_factory=list)
    attachments: list[dict[str, Any]] = field(default_factory=list)
    sticker_items: list[dict[str, Any]] = field(default_factory=list)
    flags: int = 0
    interaction_id: int | None = None
    history: list[str] = field(default_factory=list)
    edit_times: list[float] = field(default_factory=list)
    reactions: list[str] = field(default_factory=list)
    edited_at: str | None = None
    deleted: bool = False
    timestamp: str = field(default_factory=iso_now)

    @property
    def edits(self) -> int:
        return len(self.history)

    @property
    def display_name(self) -> str:
        """The name Discord shows: the webhook's per-message username, else the author's name."""
        return self.username or self.author.global_name or self.author.username

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & 64)

    def pings(self) -> set[str]:
        """What this message would notify under its allowed_mentions: 'everyone', 'roles', 'users'."""
        allowed = self.allowed_mentions
        parse = set(allowed.get("parse", [])) if allowed is not None else {"everyone", "roles", "users"}
        explicit_roles = allowed.get("roles", []) if allowed is not None else []
        explicit_users = allowed.get("users", []) if allowed is not None else []
        out: set[str] = set()
        if ("@everyone" in self.content or "@here" in self.content) and "everyone" in parse:
            out.add("everyone")
        roles = re.findall(r"<@&(\d+)>", self.content)
        if roles and ("roles" in parse or any(r in map(str, explicit_roles) for r in roles)):
            out.add("roles")
        users = re.findall(r"<@!?(\d+)>", self.content)
        if users and ("users" in parse or any(u in map(str, explicit_users) for u in users)):
            out.add("users")
        return out


@dataclass
class Webhook:
    id: int
    token: str
    channel_id: int
    guild_id: int
    name: str
    creator: User
    application_id: int

    def payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "type": 1,
            "guild_id": str(self.guild_id),
            "channel_id": str(self.channel_id),
            "name": self.name,
            "avatar": None,
            "token": self.token,
            "application_id": str(self.application_id) if self.application_id else None,
            "user": self.creator.payload(),
        }


@dataclass
class InteractionRecord:
    """One slash-command invocation and everything the client answered to it."""

    id: int
    token: str
    channel_id: int
    guild_id: int | None
    user: User
    payload: dict[str, Any]
    created: float = field(default_factory=time.monotonic)
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    original: StoredMessage | None = None
    followups: list[StoredMessage] = field(default_factory=list)

    @property
    def responded(self) -> bool:
        return bool(self.callbacks)

    @property
    def callback_type(self) -> int | None:
        return self.callbacks[0]["type"] if self.callbacks else None

    @property
    def deferred(self) -> bool:
        return self.callback_type == 5

    def texts(self) -> list[str]:
        """Every text the user saw: the original response (if it has content) and the followups."""
        messages = ([self.original] if self.original else []) + self.followups
        return [m.content for m in messages if not m.deleted and m.content]


@dataclass
class RecordedRequest:
    """One REST call as the fake received it (including ones it answered with an injected error)."""

    method: str
    path: str
    route: str
    query: dict[str, str]
    json: Any
    time: float
    status: int = 0
