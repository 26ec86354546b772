"""A small OpenAI-compatible server on 127.0.0.1 for tests: scripted replies, SSE streaming, error modes.

Usage (any test, e.g. the Discord tests can point HERMES_OPENAI_BASE_URL at it):

    async with OpenAITestServer() as server:           # listens on a free loopback port
        server.script(Reply("Hello there!"))            # next request streams this text
        server.script(Fail(503, "overloaded"), Reply("ok"))  # first request fails, the retry succeeds
        settings = Settings(engine="openai", openai_base_url=server.base_url, ...)
        ...
        server.requests[-1]                             # the JSON body the client sent

With nothing scripted, a request is answered with `default_reply` (by default: "echo: " + the last
user message). Streams end with `[DONE]`; a `usage` chunk is sent when the client asked for it.
The server honours `stop` like real servers do (the text ends before the first stop string).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web


@dataclass
class Reply:
    """Stream `text` in chunks of `chunk_chars`, `delay_s` apart; `finish_reason` on the last chunk.

    `multiline`: each event's JSON spread over several `data:` lines (valid SSE, rarely sent).
    `clean_end_early`: end the response properly right after the text, without finish_reason or [DONE].
    """

    text: str
    chunk_chars: int = 3
    delay_s: float = 0.0
    finish_reason: str = "stop"
    multiline: bool = False
    clean_end_early: bool = False


@dataclass
class Fail:
    """Answer with an HTTP error and an OpenAI-style error body."""

    status: int
    message: str = "scripted failure"


@dataclass
class Drop:
    """Stream `text_before` then cut the connection without [DONE]."""

    text_before: str = ""


@dataclass
class Stall:
    """Accept the request, then send nothing for `seconds` (for cancellation and timeout tests)."""

    seconds: float = 30.0


Behaviour = Reply | Fail | Drop | Stall


def _echo(body: dict[str, Any]) -> Reply:
    users = [m.get("content", "") for m in body.get("messages", []) if m.get("role") == "user"]
    return Reply("echo: " + (users[-1] if users else ""))


class OpenAITestServer:
    """Serves POST /v1/chat/completions (streaming and not) and GET /v1/models on 127.0.0.1."""

    def __init__(self, default_reply: Callable[[dict[str, Any]], Behaviour] = _echo) -> None:
        self.default_reply = default_reply
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._script: deque[Behaviour] = deque()
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *behaviours: Behaviour) -> None:
        """Queue behaviours for the next requests, in order."""
        self._script.extend(behaviours)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.base_url

    async def close(self) -> None:
        self._closing.set()  # ends stalled requests now instead of after their full delay
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> OpenAITestServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "test-model", "object": "model"}]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        behaviour = self._script.popleft() if self._script else self.default_reply(body)
        if isinstance(behaviour, Fail):
            return web.json_response(
                {"error": {"message": behaviour.message, "type": "server_error"}}, status=behaviour.status
            )
        if isinstance(behaviour, Stall):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), behaviour.seconds)
            return web.json_response({"error": {"message": "stalled"}}, status=504)
        text = behaviour.text if isinstance(behaviour, Reply) else behaviour.text_before
        for stop in body.get("stop") or []:
            if stop in text:
                text = text[: text.index(stop)]
        if not body.get("stream"):
            return web.json_response(self._completion(body, text))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        size = behaviour.chunk_chars if isinstance(behaviour, Reply) else 3
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        multiline = isinstance(behaviour, Reply) and behaviour.multiline
        for piece in pieces:
            await response.write(self._event(body, {"content": piece}, None, multiline=multiline))
            if isinstance(behaviour, Reply) and behaviour.delay_s:
                await asyncio.sleep(behaviour.delay_s)
        if isinstance(behaviour, Drop):
            assert request.transport is not None
            request.transport.close()
            return response
        if behaviour.clean_end_early:
            await response.write_eof()
            return response
        await response.write(self._event(body, {}, behaviour.finish_reason, multiline=multiline))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 11, "completion_tokens": len(pieces), "total_tokens": 11 + len(pieces)}
            await response.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    @staticmethod
    def _event(body: dict[str, Any], delta: dict[str, str], finish: str | None, *, multiline: bool = False) -> bytes:
        chunk = {
            "id": "chatcmpl-test",
            "object": "chat.completion.chunk",
            "model": body.get("model", "test-model"),
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        lines = json.dumps(chunk, indent=1 if multiline else None).splitlines()
        return b"".join(b"data: " + line.encode() + b"\n" for line in lines) + b"\n"

    @staticmethod
    def _completion(body: dict[str, Any], text: str) -> dict[str, Any]:
        return {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "model": body.get("model", "test-model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": len(text.split()), "total_tokens": 0},
        }
