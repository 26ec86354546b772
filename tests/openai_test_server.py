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
`OpenAITestServer(unknown_paths_200=True)` answers other paths as LM Studio does: 200, with an error in JSON.
`OpenAITestServer(max_model_len=2048)` answers 400 as vLLM does to a request longer than that context: its
messages counted at `chars_per_token` (3: more tokens than the engine estimates for plain letters) plus
its max_tokens; such a request uses up nothing scripted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web


@dataclass
class Reply:
    """Stream `text` in chunks of `chunk_chars`, `delay_s` apart; `finish_reason` on the last chunk.

    `multiline`: each event's JSON spread over several `data:` lines (valid SSE, rarely sent).
    `clean_end_early`: end the response properly right after the text, without finish_reason or [DONE].
    `extra`: added to every chunk (some servers send `"error": null` in each).
    `usage`: the usage chunk's counts instead of the real ones (some servers send nulls).
    """

    text: str
    chunk_chars: int = 3
    delay_s: float = 0.0
    finish_reason: str = "stop"
    multiline: bool = False
    clean_end_early: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    usage: dict[str, Any] | None = None


@dataclass
class Fail:
    """Answer with an HTTP error and an OpenAI-style error body (with `code`, when given)."""

    status: int
    message: str = "scripted failure"
    code: str | int | None = None


@dataclass
class Drop:
    """Stream `text_before` then cut the connection without [DONE]."""

    text_before: str = ""


@dataclass
class StreamError:
    """Stream `text_before`, then report `error` in the stream, in one of the shapes servers use:
    "error-line" (some llama.cpp builds: an `error: {...}` line), "event" (`event: error` and a data line)
    or "data" (`data: {"error": {...}}`, OpenAI style); then `[DONE]` if `done`, else the end."""

    error: dict[str, Any]
    shape: Literal["error-line", "event", "data"] = "data"
    text_before: str = ""
    done: bool = True


@dataclass
class NotStreamed:
    """Answer 200 with the whole completion as JSON although the client asked for a stream (some proxies)."""

    text: str


@dataclass
class Stall:
    """Accept the request, then send nothing for `seconds` (for cancellation and timeout tests)."""

    seconds: float = 30.0


Behaviour = Reply | Fail | Drop | StreamError | NotStreamed | Stall


def _echo(body: dict[str, Any]) -> Reply:
    users = [m.get("content", "") for m in body.get("messages", []) if m.get("role") == "user"]
    return Reply("echo: " + (users[-1] if users else ""))


class OpenAITestServer:
    """Serves POST /v1/chat/completions (streaming and not) and GET /v1/models on 127.0.0.1."""

    def __init__(
        self, default_reply: Callable[[dict[str, Any]], Behaviour] = _echo, *, unknown_paths_200: bool = False,
        max_model_len: int | None = None, chars_per_token: float = 3.0, roles_by_turns: bool = False,
    ) -> None:
        self.default_reply = default_reply
        self.roles_by_turns = roles_by_turns  # refuse, as vLLM with Mistral Instruct's template, all but one system
        # message first and then user and assistant by turns
        self.unknown_paths_200 = unknown_paths_200
        self.max_model_len, self.chars_per_token = max_model_len, chars_per_token
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.unknown: list[str] = []  # "METHOD /path" of each request to another path
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
        if self.unknown_paths_200:
            app.router.add_route("*", "/{path:.*}", self._unknown_path)
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

    async def _unknown_path(self, request: web.Request) -> web.Response:
        self.unknown.append(f"{request.method} {request.path}")
        return web.json_response({"error": f"Unexpected endpoint or method. ({request.method} {request.path})"})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if refusal := self._too_long(body) or self._out_of_turn(body):
            return web.json_response(
                {"error": {"message": refusal, "type": "BadRequestError", "param": None, "code": 400}}, status=400
            )
        behaviour = self._script.popleft() if self._script else self.default_reply(body)
        if isinstance(behaviour, Fail):
            error = {"message": behaviour.message, "type": "server_error"}
            if behaviour.code is not None:
                error["code"] = behaviour.code
            return web.json_response({"error": error}, status=behaviour.status)
        if isinstance(behaviour, Stall):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), behaviour.seconds)
            return web.json_response({"error": {"message": "stalled"}}, status=504)
        text = behaviour.text if isinstance(behaviour, Reply | NotStreamed) else behaviour.text_before
        for stop in body.get("stop") or []:
            if stop in text:
                text = text[: text.index(stop)]
        if not body.get("stream") or isinstance(behaviour, NotStreamed):
            return web.json_response(self._completion(body, text))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        size = behaviour.chunk_chars if isinstance(behaviour, Reply) else 3
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        multiline = isinstance(behaviour, Reply) and behaviour.multiline
        extra = behaviour.extra if isinstance(behaviour, Reply) else {}
        for piece in pieces:
            await response.write(self._event(body, {"content": piece}, None, multiline=multiline, extra=extra))
            if isinstance(behaviour, Reply) and behaviour.delay_s:
                await asyncio.sleep(behaviour.delay_s)
        if isinstance(behaviour, Drop):
            assert request.transport is not None
            request.transport.close()
            return response
        if isinstance(behaviour, StreamError):
            await response.write(self._error_event(behaviour))
            if behaviour.done:
                await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        if behaviour.clean_end_early:
            await response.write_eof()
            return response
        await response.write(self._event(body, {}, behaviour.finish_reason, multiline=multiline, extra=extra))
        if (body.get("stream_options") or {}).get("include_usage"):
            counted = {"prompt_tokens": 11, "completion_tokens": len(pieces), "total_tokens": 11 + len(pieces)}
            usage = counted if behaviour.usage is None else behaviour.usage
            await response.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _out_of_turn(self, body: dict[str, Any]) -> str | None:
        roles = [m.get("role") for m in body.get("messages") or []]
        turns = roles[1:] if roles[:1] == ["system"] else roles
        if not self.roles_by_turns or turns == ["user", "assistant"] * (len(turns) // 2) + ["user"] * (len(turns) % 2):
            return None
        return "Conversation roles must alternate user/assistant/user/assistant/..."

    def _too_long(self, body: dict[str, Any]) -> str | None:
        """vLLM's answer to a request longer than `max_model_len`, or None when it fits."""
        if self.max_model_len is None:
            return None
        messages = body.get("messages") or []
        prompt = sum(5 + int(len(m.get("content", "")) / self.chars_per_token) for m in messages) + 5
        completion = int(body.get("max_tokens") or 0)
        if prompt + completion <= self.max_model_len:
            return None
        return (f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt + completion} tokens ({prompt} in the messages, {completion} in the completion). "
                "Please reduce the length of the messages or completion.")

    @staticmethod
    def _error_event(behaviour: StreamError) -> bytes:
        error = json.dumps(behaviour.error).encode()
        if behaviour.shape == "error-line":
            return b"error: " + error + b"\n\n"
        if behaviour.shape == "event":
            return b"event: error\ndata: " + error + b"\n\n"
        return b"data: " + json.dumps({"error": behaviour.error}).encode() + b"\n\n"

    @staticmethod
    def _event(
        body: dict[str, Any], delta: dict[str, str], finish: str | None, *, multiline: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> bytes:
        chunk = {
            "id": "chatcmpl-test",
            "object": "chat.completion.chunk",
            "model": body.get("model", "test-model"),
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **(extra or {}),
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
