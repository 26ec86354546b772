"""One gateway websocket connection: HELLO, IDENTIFY, heartbeats, and compressed dispatches.

discord.py asks for `compress=zlib-stream` (zstd-stream only where a zstd module is installed, which
this project does not use), so the server compresses like Discord does: one zlib stream per connection, each message flushed with
Z_SYNC_FLUSH so the client sees the 00 00 ff ff suffix it waits for.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import WSMsgType, web

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_MS = 41250


class Op:
    DISPATCH = 0
    HEARTBEAT = 1
    IDENTIFY = 2
    PRESENCE = 3
    RESUME = 6
    REQUEST_MEMBERS = 8
    INVALID_SESSION = 9
    HELLO = 10
    HEARTBEAT_ACK = 11


class _Compressor:
    def __init__(self, kind: str | None) -> None:
        if kind not in (None, "zlib-stream"):
            # discord.py picks zstd-stream only when a zstd module is importable; this fake (and
            # the project's environment) speak zlib-stream, so say so instead of failing obscurely.
            raise web.HTTPBadRequest(text=f"fake Discord supports compress=zlib-stream only, got {kind!r}")
        self._zlib = zlib.compressobj() if kind == "zlib-stream" else None

    def frame(self, text: str) -> str | bytes:
        if self._zlib is None:
            return text
        return self._zlib.compress(text.encode()) + self._zlib.flush(zlib.Z_SYNC_FLUSH)


IdentifyHandler = Callable[["GatewaySession", dict[str, Any]], Awaitable[None]]
OpHandler = Callable[["GatewaySession", dict[str, Any]], Awaitable[None]]


class GatewaySession:
    """Serves one client connection; the server decides what READY and later dispatches contain."""

    def __init__(self, ws: web.WebSocketResponse, compress: str | None, *, token: str) -> None:
        self.ws = ws
        self.token = token
        self.session_id = uuid.uuid4().hex
        self.intents = 0
        self.shard = (0, 1)  # (shard id, shard count) from IDENTIFY
        self.identified = False
        self.seq = 0
        self.heartbeats = 0
        self._compressor = _Compressor(compress)
        self._send_lock = asyncio.Lock()

    def has_intent(self, bit: int) -> bool:
        return bool(self.intents & bit)

    def carries(self, guild_id: int | None) -> bool:
        """Discord's rule: a guild's events go to shard (guild_id >> 22) % count; DMs to shard 0."""
        shard_id, count = self.shard
        return shard_id == (0 if guild_id is None else (guild_id >> 22) % count)

    async def send(self, op: int, data: Any, event: str | None = None) -> None:
        payload: dict[str, Any] = {"op": op, "d": data, "s": None, "t": event}
        async with self._send_lock:  # frames of one zlib stream must leave in the order compressed
            if op == Op.DISPATCH:
                self.seq += 1
                payload["s"] = self.seq
            frame = self._compressor.frame(json.dumps(payload))
            if self.ws.closed:
                return
            if isinstance(frame, bytes):
                await self.ws.send_bytes(frame)
            else:
                await self.ws.send_str(frame)

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        await self.send(Op.DISPATCH, data, event)

    async def serve(self, on_identify: IdentifyHandler, on_request_members: OpHandler) -> None:
        """Run until the client closes; IDENTIFY with a wrong token closes with 4004 like Discord."""
        await self.send(Op.HELLO, {"heartbeat_interval": HEARTBEAT_INTERVAL_MS})
        async for msg in self.ws:
            if msg.type != WSMsgType.TEXT:
                if msg.type == WSMsgType.BINARY:
                    await self.ws.close(code=4002, message=b"binary payloads are not supported")
                break
            frame = json.loads(msg.data)
            op, data = frame.get("op"), frame.get("d")
            if op == Op.HEARTBEAT:
                self.heartbeats += 1
                await self.send(Op.HEARTBEAT_ACK, None)
            elif op == Op.IDENTIFY:
                if data.get("token") != self.token:
                    await self.ws.close(code=4004, message=b"Authentication failed.")
                    break
                self.intents = int(data.get("intents", 0))
                shard_id, count = data.get("shard", (0, 1))
                self.shard = (int(shard_id), int(count))
                await on_identify(self, data)
                self.identified = True
            elif op == Op.RESUME:
                # Sessions are not kept across connections: ask the client to identify afresh.
                await self.send(Op.INVALID_SESSION, False)
            elif op == Op.REQUEST_MEMBERS:
                await on_request_members(self, data)
            elif op == Op.PRESENCE:
                continue
            else:
                log.warning("fake gateway ignoring op %s", op)
