"""The remote engine: any OpenAI-compatible `/v1/chat/completions` server, streamed over SSE.

LM Studio, llama.cpp's server, vLLM and Ollama all speak this. We send the persona's messages
(control-token look-alikes defanged, since the server tokenizes text itself; the oldest turns left out
to fit `HERMES_CONTEXT_TOKENS` with the reply, by an estimate of their length), its sampling (plus the
`top_k` / `repeat_penalty` extras those servers accept) and its stop strings. Stop strings are also
applied here, because servers differ in how many they honour.

Retries: a refused connection, a timeout or a 429/5xx is retried with exponential backoff, but only
before the first token; after that a retry would repeat text the user has already seen.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from bot.config import Settings
from bot.engine.base import Engine, EngineError, Finish, GenerationRequest, GenerationStream, TextChunk
from bot.engine.text import StopMatcher
from bot.prompt import PromptTooLong, defang_control_tokens, encode_messages

log = logging.getLogger(__name__)

RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
MAX_SERVER_STOPS = 4  # OpenAI's own limit; we apply the rest ourselves
# Lengths in tokens are estimated from text: the server's tokenizer is not at hand. Llama/Mistral
# tokenizers spend about a token on four characters of English, on two of Cyrillic, Greek or Arabic
# (two-byte UTF-8), and on every CJK character or emoji (three or more bytes, often byte tokens). The
# estimate weighs each character so (in quarters of a token): it overcounts a little rather than sending a
# server more than its context. ChatML spends a few more tokens on each message's markers and role.
TWO_BYTE_CHARS = re.compile("[\u0080-\u07ff]")  # half a token each
WIDE_CHARS = re.compile("[\u0800-\U0010ffff]")  # a whole token each
TOKENS_PER_MESSAGE = 5


def _quarters(text: str) -> int:
    if text.isascii():
        return len(text)
    return len(text) + len(TWO_BYTE_CHARS.findall(text)) + 3 * len(WIDE_CHARS.findall(text))


def estimated_tokens(text: str) -> int:
    return -(-_quarters(text) // 4)


class LengthEstimate:
    """A stand-in tokenizer for `encode_messages`, which then fits a prompt to the context the same way
    for this engine as for the transformers one (oldest turns dropped first, the newest turn's start cut
    last), by estimated lengths: its "ids" are pieces of text of about one token each."""

    chat_template = "estimated"  # not ChatML's template: nothing is rendered

    def apply_chat_template(self, messages: list[dict[str, str]], **_: Any) -> dict[str, list[int]]:
        length = sum(TOKENS_PER_MESSAGE + estimated_tokens(m["content"]) for m in messages) + TOKENS_PER_MESSAGE
        return {"input_ids": [0] * length}

    def encode(self, text: str, **_: Any) -> list[str]:
        pieces, piece, quarters = [], "", 0
        for char in text:
            weight = _quarters(char)
            if quarters + weight > 4:
                pieces.append(piece)
                piece, quarters = "", 0
            piece, quarters = piece + char, quarters + weight
        return [*pieces, piece] if piece else pieces

    def decode(self, pieces: list[str], **_: Any) -> str:
        return "".join(pieces)


class _Retryable(Exception):
    """A failure before the first token that is worth another try."""


class OpenAIEngine(Engine):
    name = "openai"

    def __init__(
        self, settings: Settings, *, attempts: int = 4, backoff_s: float = 0.5, timeout_s: float = 120.0
    ) -> None:
        self.settings = settings
        self.attempts, self.backoff_s, self.timeout_s = attempts, backoff_s, timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"{(self.settings.openai_base_url or '').rstrip('/')}/chat/completions"

    async def start(self) -> None:
        if not self.settings.openai_base_url:
            raise EngineError("HERMES_ENGINE=openai needs HERMES_OPENAI_BASE_URL, e.g. http://localhost:1234/v1")
        headers = {"Accept": "text/event-stream"}
        if self.settings.openai_api_key is not None:
            headers["Authorization"] = f"Bearer {self.settings.openai_api_key.get_secret_value()}"
        timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=self.timeout_s)
        self._session = aiohttp.ClientSession(headers=headers, timeout=timeout)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def submit(self, request: GenerationRequest) -> GenerationStream:
        if self._session is None:
            raise EngineError("the openai engine is not started")
        stream = GenerationStream(request)
        task = asyncio.create_task(self._serve(stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return stream

    def payload(self, request: GenerationRequest) -> dict[str, Any]:
        """The JSON body for `request`, as sent to the server: the messages that fit the context with the
        reply, and a `max_tokens` within what is left of both (a resumed reply's text counts as written)."""
        s, context = request.sampling, self.settings.context_tokens
        try:
            prompt = encode_messages(LengthEstimate(), request.messages, context_tokens=context,
                                     max_new_tokens=s.max_new_tokens)
        except PromptTooLong as exc:
            raise EngineError(str(exc)) from None
        messages = [{"role": m["role"], "content": defang_control_tokens(m["content"])} for m in prompt.messages]
        written = estimated_tokens(request.assistant_prefix)
        body: dict[str, Any] = {
            "model": self.settings.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": max(1, min(s.max_new_tokens - written, context - len(prompt.ids) - written)),
            "top_k": s.top_k,
            "repeat_penalty": s.repetition_penalty,  # llama.cpp, LM Studio, Ollama
            "repetition_penalty": s.repetition_penalty,  # vLLM
        }
        if request.stop:
            body["stop"] = list(request.stop)[:MAX_SERVER_STOPS]
        if request.assistant_prefix:  # resume: continue the partial assistant turn
            messages.append({"role": "assistant", "content": defang_control_tokens(request.assistant_prefix)})
            body.update(continue_final_message=True, add_generation_prompt=False)
        return body

    async def _serve(self, stream: GenerationStream) -> None:
        work = asyncio.create_task(self._generate(stream))
        cancel = asyncio.create_task(stream.cancel_requested.wait())
        try:
            await asyncio.wait({work, cancel}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cancel.cancel()
            if not work.done():
                work.cancel()
        if work.cancelled() or not work.done():
            stream.feed([Finish(stream.cancel_reason or "cancelled")])
        elif work.exception() is not None:
            error = work.exception()
            stream.fail(error if isinstance(error, EngineError) else EngineError(f"openai engine: {error!r}"))

    async def _generate(self, stream: GenerationStream) -> None:
        body = self.payload(stream.request)
        stops = stream.request.stop_matcher()
        state = {"tokens": 0, "prompt_tokens": 0, "completion_tokens": 0, "reason": "stop"}
        for attempt in range(self.attempts):
            try:
                await self._attempt(stream, body, stops, state)
                break
            except _Retryable as exc:
                if state["tokens"] or attempt == self.attempts - 1:
                    raise EngineError(str(exc)) from None
                delay = self.backoff_s * 2**attempt
                log.warning("openai engine: %s; retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
        completion = state["completion_tokens"] or state["tokens"]
        stream.feed([Finish(state["reason"], int(state["prompt_tokens"]), int(completion))])

    async def _attempt(
        self, stream: GenerationStream, body: dict[str, Any], stops: StopMatcher, state: dict[str, Any]
    ) -> None:
        assert self._session is not None
        try:
            async with self._session.post(self.url, json=body) as resp:
                if resp.status != 200:
                    detail = _error_detail(await resp.text())
                    message = f"the OpenAI-compatible server at {self.url} answered {resp.status}: {detail}"
                    if resp.status in RETRYABLE_STATUS:
                        raise _Retryable(message)
                    raise EngineError(message)
                await self._read_events(resp, stream, stops, state)
        except (TimeoutError, aiohttp.ClientError) as exc:
            reason = str(exc) or type(exc).__name__
            if state["tokens"]:
                raise EngineError(f"the connection to {self.url} broke mid-reply: {reason}") from None
            raise _Retryable(f"cannot reach the OpenAI-compatible server at {self.url}: {reason}") from None

    async def _read_events(
        self, resp: aiohttp.ClientResponse, stream: GenerationStream, stops: StopMatcher, state: dict[str, Any]
    ) -> None:
        finished = False
        async for data in _event_data(resp):
            if data == "[DONE]":
                break
            try:
                chunk = json.loads(data)
            except json.JSONDecodeError:
                chunk = None
            if not isinstance(chunk, dict):
                raise EngineError(f"the server at {self.url} sent a malformed event: {data[:200]!r}")
            if "error" in chunk:
                raise EngineError(f"the server at {self.url} reported an error: {_error_detail(data)}")
            usage = chunk.get("usage") or {}
            state["prompt_tokens"] = usage.get("prompt_tokens", state["prompt_tokens"])
            state["completion_tokens"] = usage.get("completion_tokens", state["completion_tokens"])
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content") or ""
                if text and not finished:
                    state["tokens"] += 1
                    safe, stopped = stops.feed(text)
                    if safe:
                        stream.feed([TextChunk(safe)])
                    if stopped:  # done now: leaving closes the connection, which ends the server's work too
                        state["reason"] = "stop"
                        return
                if choice.get("finish_reason") and not finished:
                    finished = True
                    state["reason"] = "length" if choice["finish_reason"] == "length" else "stop"
        else:
            if not finished and not state["tokens"]:
                raise _Retryable(f"the server at {self.url} closed the stream before any text")
            if not finished:  # a complete reply says so: finish_reason or [DONE]
                raise EngineError(f"the server at {self.url} ended the stream mid-reply, without a finish_reason")
        if rest := stops.flush():  # the text held back in case it began a stop string
            stream.feed([TextChunk(rest)])


async def _event_data(resp: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The data of each server-sent event: its `data:` lines joined by newlines, as the SSE standard
    says (comments, keep-alives and `event:` lines carry none)."""
    lines: list[str] = []
    async for raw in resp.content:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if line.startswith("data:"):
            lines.append(line[5:].removeprefix(" "))
        elif not line and lines:  # a blank line ends the event
            yield "\n".join(lines).strip()
            lines = []
    if lines:
        yield "\n".join(lines).strip()


def _error_detail(body: str) -> str:
    """The human part of an OpenAI-style error body ({"error": {"message": ...}}), else the body's start."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return body.strip()[:300] or "(empty body)"
    error = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, dict):
        return str(error.get("message") or error)[:300]
    return str(error)[:300]
