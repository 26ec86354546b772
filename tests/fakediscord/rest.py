"""The REST endpoints discord.py calls, answering like Discord (shapes, status codes, error codes).

Checks Discord makes that a bot could trip over are kept: 2,000-character content, empty
messages, Manage Webhooks for webhook management, 15 webhooks per channel, no webhooks on threads,
thread_id for webhook messages in threads, one callback per interaction within
`fake.interaction_deadline_s` (3 s, like Discord).
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from tests.fakediscord.models import (
    Channel,
    ChannelType,
    InteractionRecord,
    Perm,
    StoredMessage,
    User,
    Webhook,
)
from tests.fakediscord.wire import EPHEMERAL_FLAG, LOADING_FLAG, RECORD, ApiError, json_response

if TYPE_CHECKING:
    from tests.fakediscord.server import FakeDiscord

MAX_CONTENT = 2000
MAX_WEBHOOKS_PER_CHANNEL = 15


def _form_error(field: str, code: str, message: str) -> ApiError:
    return ApiError(400, 50035, f"Invalid Form Body ({field}: {code}: {message})")


class RestApi:
    """Handlers bound to one FakeDiscord; `routes()` mounts them under the API prefix."""

    def __init__(self, fake: FakeDiscord) -> None:
        self.fake = fake

    def routes(self, prefix: str) -> list[web.RouteDef]:
        p = prefix
        return [
            web.get(p + "/users/{user_id}", self.get_user),
            web.post(p + "/users/@me/channels", self.create_dm),
            web.get(p + "/oauth2/applications/@me", self.get_application),
            web.get(p + "/applications/@me", self.get_application),
            web.get(p + "/gateway", self.get_gateway),
            web.get(p + "/gateway/bot", self.get_gateway),
            web.get(p + "/applications/{app_id}/commands", self.get_commands),
            web.put(p + "/applications/{app_id}/commands", self.put_commands),
            web.get(p + "/applications/{app_id}/guilds/{guild_id}/commands", self.get_commands),
            web.put(p + "/applications/{app_id}/guilds/{guild_id}/commands", self.put_commands),
            web.get(p + "/guilds/{guild_id}", self.get_guild),
            web.get(p + "/guilds/{guild_id}/channels", self.get_guild_channels),
            web.get(p + "/guilds/{guild_id}/roles", self.get_guild_roles),
            web.get(p + "/guilds/{guild_id}/members/{user_id}", self.get_member),
            web.get(p + "/channels/{channel_id}", self.get_channel),
            web.get(p + "/channels/{channel_id}/messages", self.get_messages),
            web.post(p + "/channels/{channel_id}/messages", self.create_message),
            web.get(p + "/channels/{channel_id}/messages/{message_id}", self.get_message),
            web.patch(p + "/channels/{channel_id}/messages/{message_id}", self.edit_message),
            web.delete(p + "/channels/{channel_id}/messages/{message_id}", self.delete_message),
            web.put(
                p + "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me", self.add_reaction
            ),
            web.delete(
                p + "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me", self.remove_reaction
            ),
            web.post(p + "/channels/{channel_id}/typing", self.typing),
            web.get(p + "/channels/{channel_id}/webhooks", self.get_channel_webhooks),
            web.post(p + "/channels/{channel_id}/webhooks", self.create_webhook),
            web.get(p + "/webhooks/{webhook_id}", self.get_webhook),
            web.delete(p + "/webhooks/{webhook_id}", self.delete_webhook),
            web.get(p + "/webhooks/{webhook_id}/{token}", self.get_webhook),
            web.post(p + "/webhooks/{webhook_id}/{token}", self.execute_webhook),
            web.get(p + "/webhooks/{webhook_id}/{token}/messages/{message_id}", self.get_webhook_message),
            web.patch(p + "/webhooks/{webhook_id}/{token}/messages/{message_id}", self.edit_webhook_message),
            web.delete(
                p + "/webhooks/{webhook_id}/{token}/messages/{message_id}", self.delete_webhook_message
            ),
            web.post(p + "/interactions/{interaction_id}/{token}/callback", self.interaction_callback),
        ]

    # ---- helpers ---------------------------------------------------------------------------

    def _ok(self, request: web.Request, data: Any = None, status: int = 200) -> web.Response:
        headers = self.fake.rate_limit_headers(request[RECORD].route)
        if data is None:
            return web.Response(status=204, headers=headers)
        return json_response(data, status, headers)

    def _channel(self, request: web.Request) -> Channel:
        channel = self.fake.channels.get(int(request.match_info["channel_id"]))
        if channel is None:
            raise ApiError(404, 10003, "Unknown Channel")
        return channel

    def _message(self, request: web.Request, channel: Channel) -> StoredMessage:
        msg = self.fake.messages.get(int(request.match_info["message_id"]))
        if msg is None or msg.deleted or msg.channel_id != channel.id:
            raise ApiError(404, 10008, "Unknown Message")
        return msg

    def _require(self, channel: Channel, perm: int) -> None:
        if channel.guild_id is None:
            return
        if not self.fake.guilds[channel.guild_id].permissions_of(self.fake.bot_user.id) & perm:
            raise ApiError(403, 50013, "Missing Permissions")

    def _body(self, request: web.Request) -> dict[str, Any]:
        body = request[RECORD].json
        return body if isinstance(body, dict) else {}

    @staticmethod
    def _validate(body: dict[str, Any], *, creating: bool) -> None:
        content = body.get("content") or ""
        if len(content) > MAX_CONTENT:
            raise _form_error("content", "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_CONTENT} or fewer in length.")
        if len(body.get("embeds") or []) > 10:
            raise _form_error("embeds", "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length.")
        if creating and not (content or body.get("embeds") or body.get("_files") or body.get("components")):
            raise ApiError(400, 50006, "Cannot send an empty message")

    @staticmethod
    def _mentions(content: str, allowed: dict[str, Any] | None) -> list[int]:
        ids = [int(i) for i in re.findall(r"<@!?(\d+)>", content)]
        if allowed is None or "users" in allowed.get("parse", []):
            return ids
        explicit = {int(u) for u in allowed.get("users", [])}
        return [i for i in ids if i in explicit]

    def _new_message(
        self, channel: Channel, author: User, body: dict[str, Any], *, webhook: Webhook | None = None
    ) -> StoredMessage:
        allowed = body.get("allowed_mentions")
        content = body.get("content") or ""
        return StoredMessage(
            id=self.fake.ids.next(),
            channel_id=channel.id,
            guild_id=channel.guild_id,
            author=author,
            content=content,
            webhook_id=webhook.id if webhook else None,
            username=body.get("username") if webhook else None,
            avatar_url=body.get("avatar_url") if webhook else None,
            allowed_mentions=allowed,
            mention_ids=self._mentions(content, allowed),
            embeds=list(body.get("embeds") or []),
            attachments=[
                {"id": str(self.fake.ids.next()), "url": f"https://cdn.invalid/{f['filename']}", **f}
                for f in body.get("_files", [])
            ],
            flags=int(body.get("flags") or 0),
        )

    async def _apply_edit(self, msg: StoredMessage, body: dict[str, Any]) -> StoredMessage:
        self._validate(body, creating=False)
        if "allowed_mentions" in body:
            msg.allowed_mentions = body["allowed_mentions"]
        if "embeds" in body:
            msg.embeds = list(body["embeds"] or [])
        content = body["content"] or "" if "content" in body else msg.content
        msg.mention_ids = self._mentions(content, msg.allowed_mentions)
        return await self.fake.edit_message(msg, content)

    # ---- users, application, gateway -------------------------------------------------------

    async def get_user(self, request: web.Request) -> web.Response:
        uid = request.match_info["user_id"]
        if uid == "@me":
            me = self.fake.bot_user.payload()
            return self._ok(request, {**me, "verified": True, "mfa_enabled": False, "flags": 0})
        user = self.fake.users.get(int(uid))
        if user is None:
            raise ApiError(404, 10013, "Unknown User")
        return self._ok(request, user.payload())

    async def create_dm(self, request: web.Request) -> web.Response:
        user = self.fake.users.get(int(self._body(request).get("recipient_id", 0)))
        if user is None:
            raise ApiError(404, 10013, "Unknown User")
        return self._ok(request, (await self.fake.open_dm(user)).payload())

    async def get_application(self, request: web.Request) -> web.Response:
        fake = self.fake
        return self._ok(
            request,
            {
                "id": str(fake.application_id),
                "name": fake.bot_user.username,
                "icon": None,
                "description": "",
                "summary": "",
                "type": None,
                "bot_public": True,
                "bot_require_code_grant": False,
                "verify_key": "0" * 64,
                "flags": 0,
                "owner": fake.app_owner.payload(),
                "team": None,
                "bot": fake.bot_user.payload(),
                "redirect_uris": [],
                "interactions_endpoint_url": None,
            },
        )

    async def get_gateway(self, request: web.Request) -> web.Response:
        limit = {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1}
        shards = self.fake.recommended_shards
        return self._ok(request, {"url": self.fake.gateway_url, "shards": shards, "session_start_limit": limit})

    # ---- application commands --------------------------------------------------------------

    def _check_app(self, request: web.Request) -> int | None:
        if int(request.match_info["app_id"]) != self.fake.application_id:
            raise ApiError(403, 50001, "Missing Access")
        gid = request.match_info.get("guild_id")
        if gid is not None and int(gid) not in self.fake.guilds:
            raise ApiError(403, 50001, "Missing Access")
        return int(gid) if gid is not None else None

    async def get_commands(self, request: web.Request) -> web.Response:
        return self._ok(request, self.fake.commands(self._check_app(request)))

    async def put_commands(self, request: web.Request) -> web.Response:
        """Bulk overwrite, keeping ids of commands that survive by (name, type) like Discord."""
        gid = self._check_app(request)
        body = request[RECORD].json
        if not isinstance(body, list):
            raise _form_error("body", "LIST_TYPE_CONVERT", "Must be a list.")
        previous = {(c["name"], c["type"]): c["id"] for c in self.fake.commands(gid)}
        stored = []
        for index, cmd in enumerate(body):
            kind = int(cmd.get("type", 1))
            name = cmd.get("name", "")
            if kind == 1 and not re.fullmatch(r"[-_a-z0-9]{1,32}", name):
                raise _form_error(
                    f"{index}.name", "APPLICATION_COMMAND_INVALID_NAME", f"Invalid name {name!r}"
                )
            if kind == 1 and not 1 <= len(cmd.get("description", "")) <= 100:
                raise _form_error(f"{index}.description", "BASE_TYPE_BAD_LENGTH", "Must be 1-100 characters.")
            entry = {
                "application_id": str(self.fake.application_id),
                "version": str(self.fake.ids.next()),
                "description": "",
                "options": [],
                "default_member_permissions": None,
                "dm_permission": True,
                "nsfw": False,
                **cmd,
                "type": kind,
                "id": previous.get((name, kind)) or str(self.fake.ids.next()),
            }
            if gid is not None:
                entry["guild_id"] = str(gid)
            stored.append(entry)
        if gid is None:
            self.fake.global_commands = stored
        else:
            self.fake.guild_commands[gid] = stored
        return self._ok(request, stored)

    # ---- guilds ----------------------------------------------------------------------------

    def _guild(self, request: web.Request) -> Any:
        guild = self.fake.guilds.get(int(request.match_info["guild_id"]))
        if guild is None:
            raise ApiError(404, 10004, "Unknown Guild")
        return guild

    async def get_guild(self, request: web.Request) -> web.Response:
        return self._ok(request, self._guild(request).payload())

    async def get_guild_channels(self, request: web.Request) -> web.Response:
        guild = self._guild(request)
        return self._ok(request, [c.payload() for c in guild.channels.values() if not c.is_thread])

    async def get_guild_roles(self, request: web.Request) -> web.Response:
        return self._ok(request, [r.payload() for r in self._guild(request).roles.values()])

    async def get_member(self, request: web.Request) -> web.Response:
        member = self._guild(request).members.get(int(request.match_info["user_id"]))
        if member is None:
            raise ApiError(404, 10007, "Unknown Member")
        return self._ok(request, member.payload())

    # ---- channels and messages -------------------------------------------------------------

    async def get_channel(self, request: web.Request) -> web.Response:
        return self._ok(request, self._channel(request).payload())

    async def get_messages(self, request: web.Request) -> web.Response:
        channel = self._channel(request)
        self._require(channel, Perm.READ_MESSAGE_HISTORY)
        q = request.query
        limit = min(int(q.get("limit", 50)), 100)
        msgs = sorted(self.fake.channel_messages(channel), key=lambda m: m.id, reverse=True)
        if "before" in q:
            msgs = [m for m in msgs if m.id < int(q["before"])]
        if "after" in q:
            msgs = [m for m in msgs if m.id > int(q["after"])][-limit:]
        return self._ok(request, [self.fake.message_payload(m) for m in msgs[:limit]])

    async def create_message(self, request: web.Request) -> web.Response:
        channel = self._channel(request)
        self._require(channel, Perm.VIEW_CHANNEL)
        self._require(channel, Perm.SEND_MESSAGES_IN_THREADS if channel.is_thread else Perm.SEND_MESSAGES)
        body = self._body(request)
        self._validate(body, creating=True)
        msg = self._new_message(channel, self.fake.bot_user, body)
        ref = body.get("message_reference")
        if ref:
            target = self.fake.messages.get(int(ref["message_id"]))
            if target is not None and not target.deleted and target.channel_id == channel.id:
                msg.reference_id = target.id
            elif ref.get("fail_if_not_exists", True):
                raise _form_error("message_reference", "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "Unknown message")
        await self.fake.store_message(msg)
        return self._ok(request, self.fake.message_payload(msg))

    async def get_message(self, request: web.Request) -> web.Response:
        channel = self._channel(request)
        return self._ok(request, self.fake.message_payload(self._message(request, channel)))

    async def edit_message(self, request: web.Request) -> web.Response:
        channel = self._channel(request)
        msg = self._message(request, channel)
        if msg.author.id != self.fake.bot_user.id or msg.webhook_id is not None:
            raise ApiError(403, 50005, "Cannot edit a message authored by another user")
        await self._apply_edit(msg, self._body(request))
        return self._ok(request, self.fake.message_payload(msg))

    async def delete_message(self, request: web.Request) -> web.Response:
        channel = self._channel(request)
        msg = self._message(request, channel)
        if msg.author.id != self.fake.bot_user.id:
            self._require(channel, Perm.MANAGE_MESSAGES)
        await self.fake.delete_message(msg)
        return self._ok(request)

    async def add_reaction(self, request: web.Request) -> web.Response:
        msg = self._message(request, self._channel(request))
        msg.reactions.append(request.match_info["emoji"])
        return self._ok(request)

    async def remove_reaction(self, request: web.Request) -> web.Response:
        msg = self._message(request, self._channel(request))
        emoji = request.match_info["emoji"]
        if emoji in msg.reactions:
            msg.reactions.remove(emoji)
        return self._ok(request)

    async def typing(self, request: web.Request) -> web.Response:
        self._channel(request)
        return self._ok(request)

    # ---- webhooks --------------------------------------------------------------------------

    def _webhook_channel(self, request: web.Request) -> Channel:
        channel = self._channel(request)
        if channel.type != ChannelType.TEXT:
            raise ApiError(400, 50024, "Cannot execute action on this channel type")
        self._require(channel, Perm.MANAGE_WEBHOOKS)
        return channel

    async def get_channel_webhooks(self, request: web.Request) -> web.Response:
        channel = self._webhook_channel(request)
        return self._ok(request, [w.payload() for w in self.fake.channel_webhooks(channel)])

    async def create_webhook(self, request: web.Request) -> web.Response:
        channel = self._webhook_channel(request)
        name = self._body(request).get("name") or ""
        _check_webhook_name(name, "name")
        if len(self.fake.channel_webhooks(channel)) >= MAX_WEBHOOKS_PER_CHANNEL:
            raise ApiError(400, 30007, f"Maximum number of webhooks reached ({MAX_WEBHOOKS_PER_CHANNEL})")
        webhook = await self.fake.add_webhook(channel, name, creator=self.fake.bot_user)
        return self._ok(request, webhook.payload())

    def _webhook(self, request: web.Request) -> Webhook:
        webhook = self.fake.webhooks.get(int(request.match_info["webhook_id"]))
        if webhook is None:
            raise ApiError(404, 10015, "Unknown Webhook")
        token = request.match_info.get("token")
        if token is None:
            if request.headers.get("Authorization") != f"Bot {self.fake.token}":
                raise ApiError(401, 0, "401: Unauthorized")
        elif token != webhook.token:
            raise ApiError(401, 50027, "Invalid Webhook Token")
        return webhook

    async def get_webhook(self, request: web.Request) -> web.Response:
        return self._ok(request, self._webhook(request).payload())

    async def delete_webhook(self, request: web.Request) -> web.Response:
        webhook = self._webhook(request)
        self._require(self.fake.channels[webhook.channel_id], Perm.MANAGE_WEBHOOKS)
        del self.fake.webhooks[webhook.id]
        return self._ok(request)

    def _target_channel(self, request: web.Request, webhook: Webhook) -> Channel:
        """The webhook's channel, or the thread named by ?thread_id= under it."""
        thread_id = request.query.get("thread_id")
        if thread_id is None:
            return self.fake.channels[webhook.channel_id]
        thread = self.fake.channels.get(int(thread_id))
        if thread is None or thread.parent_id != webhook.channel_id:
            raise ApiError(400, 10003, "Unknown Channel")
        return thread

    def _interaction(self, request: web.Request) -> InteractionRecord | None:
        """Webhook routes under the application id are an interaction's followup webhook."""
        if int(request.match_info["webhook_id"]) != self.fake.application_id:
            return None
        token = request.match_info["token"]
        record = next((r for r in self.fake.interactions.values() if r.token == token), None)
        if record is None or not record.responded:
            raise ApiError(404, 10015, "Unknown Webhook")
        return record

    async def execute_webhook(self, request: web.Request) -> web.Response:
        body = self._body(request)
        self._validate(body, creating=True)
        record = self._interaction(request)
        if record is not None and record.original is not None and record.original.flags & LOADING_FLAG:
            # Like Discord, the first followup after a deferral fills in the "thinking" message.
            msg = await self._apply_edit(record.original, body)
            return self._ok(request, self.fake.message_payload(msg))
        if record is not None:
            msg = self._interaction_message(record, body)
            record.followups.append(msg)
        else:
            webhook = self._webhook(request)
            if body.get("username") is not None:
                _check_webhook_name(body["username"], "username")
            author = User(webhook.id, body.get("username") or webhook.name, bot=True)
            msg = self._new_message(self._target_channel(request, webhook), author, body, webhook=webhook)
            msg.username = msg.username or webhook.name
        await self.fake.store_message(msg)
        if request.query.get("wait", "false").lower() not in ("1", "true"):
            return self._ok(request)
        return self._ok(request, self.fake.message_payload(msg))

    def _webhook_message(self, request: web.Request) -> StoredMessage:
        record = self._interaction(request)
        mid = request.match_info["message_id"]
        if record is not None:
            candidates = ([record.original] if record.original else []) + record.followups
            wanted = record.original if mid == "@original" else None
            msg = wanted or next((m for m in candidates if str(m.id) == mid), None)
        else:
            webhook = self._webhook(request)
            channel = self._target_channel(request, webhook)
            msg = self.fake.messages.get(int(mid)) if mid.isdigit() else None
            if msg is not None and (msg.webhook_id != webhook.id or msg.channel_id != channel.id):
                msg = None
        if msg is None or msg.deleted:
            raise ApiError(404, 10008, "Unknown Message")
        return msg

    async def get_webhook_message(self, request: web.Request) -> web.Response:
        return self._ok(request, self.fake.message_payload(self._webhook_message(request)))

    async def edit_webhook_message(self, request: web.Request) -> web.Response:
        msg = self._webhook_message(request)
        await self._apply_edit(msg, self._body(request))
        return self._ok(request, self.fake.message_payload(msg))

    async def delete_webhook_message(self, request: web.Request) -> web.Response:
        await self.fake.delete_message(self._webhook_message(request))
        return self._ok(request)

    # ---- interactions ----------------------------------------------------------------------

    def _interaction_message(self, record: InteractionRecord, body: dict[str, Any]) -> StoredMessage:
        channel = self.fake.channels[record.channel_id]
        msg = self._new_message(channel, self.fake.bot_user, body)
        msg.webhook_id = self.fake.application_id
        msg.interaction_id = record.id
        return msg

    async def interaction_callback(self, request: web.Request) -> web.Response:
        """Types 4 (message) and 5 (deferred) create the original response; one callback only."""
        record = self.fake.interactions.get(int(request.match_info["interaction_id"]))
        if record is None or record.token != request.match_info["token"]:
            raise ApiError(404, 10062, "Unknown interaction")
        if time.monotonic() - record.created > self.fake.interaction_deadline_s:
            raise ApiError(404, 10062, "Unknown interaction")
        if record.responded:
            raise ApiError(400, 40060, "Interaction has already been acknowledged.")
        body = self._body(request)
        kind = int(body.get("type", 0))
        data = body.get("data") or {}
        msg: StoredMessage | None = None
        if kind == 4:
            self._validate(data, creating=True)
            msg = self._interaction_message(record, data)
        elif kind == 5:
            msg = self._interaction_message(record, {"flags": int(data.get("flags") or 0) | LOADING_FLAG})
        record.callbacks.append(body)
        if msg is not None:
            record.original = msg
            await self.fake.store_message(msg)
        if request.query.get("with_response") not in ("1", "true", "True"):
            return self._ok(request)
        resource: dict[str, Any] = {"type": kind}
        if msg is not None:
            resource["message"] = self.fake.message_payload(msg)
        return self._ok(
            request,
            {
                "interaction": {
                    "id": str(record.id),
                    "type": 2,
                    "response_message_id": str(msg.id) if msg else None,
                    "response_message_loading": kind == 5,
                    "response_message_ephemeral": bool(msg and msg.flags & EPHEMERAL_FLAG),
                },
                "resource": resource,
            },
        )


def _check_webhook_name(name: str, field: str) -> None:
    """Discord refuses webhook names (and per-message usernames) containing these words."""
    if not 1 <= len(name) <= 80:
        raise _form_error(field, "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 80 in length.")
    lowered = name.lower()
    if "clyde" in lowered or "discord" in lowered:
        raise _form_error(field, "USERNAME_INVALID_CONTAINS", f"{field} cannot contain 'clyde' or 'discord'")
