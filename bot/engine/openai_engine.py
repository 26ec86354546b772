"""The remote engine: any OpenAI-compatible `/v1/chat/completions` server, streamed over SSE.

LM Studio, llama.cpp's server, vLLM and Ollama all speak this. We send the persona's messages
(control-token look-alikes defanged, since the server tokenizes text itself; the oldest turns left out
to fit `HERMES_CONTEXT_TOKENS` with the reply, by an estimate of their length), its sampling (plus the
`top_k` / `repeat_penalty` extras those servers accept) and its stop strings. Stop strings are also
applied here, because servers differ in how many they honour.

Retries: a refused connection, a timeout or a 429/5xx (an HTTP status, or the code of an error the server
reports in the stream) is retried with exponential backoff, but only before the first token; after that a
retry would repeat text the user has already seen. A prompt the server refuses as longer than its context
(the estimate of its length fell short, or HERMES_CONTEXT_TOKENS is above the server's context) is sent once
more with fewer turns, fitted to 3/4 of HERMES_CONTEXT_TOKENS, also only before the first token.

Auth: HERMES_OPENAI_API_KEY goes as a Bearer token, or a user and password in HERMES_OPENAI_BASE_URL (a
proxy's) as Basic auth; not both. Messages, which reach logs and Discord, show that password as `***`.

Readiness: `ready()` asks the server for `GET {base}/models`, so a worker's /readyz says when the server
(LM Studio, say) is down; `start()` only warns then, since a compose stack may start the worker first.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from bot.config import Settings, without_password
from bot.engine.base import Engine, EngineError, Finish, GenerationRequest, GenerationStream, TextChunk
from bot.engine.text import StopMatcher
from bot.prompt import PromptTooLong, alternating, defang_control_tokens, encode_messages
from bot.text_safety import well_formed

log = logging.getLogger(__name__)

RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
MAX_SERVER_STOPS = 4  # OpenAI's own limit; we apply the rest ourselves
READY_TIMEOUT_S = 1.5  # within the ops server's 2 s for a readiness check
# Lengths in tokens are estimated from text: the server's tokenizer is not at hand. The estimate errs high,
# as a server refuses (vLLM: 400) a prompt that with the reply is longer than its context. Its weights were
# measured against Mistral-7B's SentencePiece tokenizer (v1, 32000 pieces: OpenHermes 2.5's, the default
# model) on role-play lines, the personas and the README: it overestimates plain English by about 15% and
# role-play by 5 to 20%; French, Spanish or German words split more than English ones and may be
# underestimated by about 10%, which the retry with a smaller prompt after a context error covers.
# ChatML spends a few more tokens on each message's markers and role.
TOKENS_PER_MESSAGE = 5
QUARTERS = tuple((re.compile(chars), extra) for chars, extra in (  # quarters of a token: 1 a character, plus
    ("[^A-Za-z \u0080-\U0010ffff]", 3),  # ASCII digits, punctuation, symbols, newlines: a token each
    ("[A-Z0-9]", 1),  # a capital often starts a new piece, a number takes one more for the space before it
    ("[\u0400-\u04ff]", 1),  # Cyrillic: about two letters a token
    ("[\u0080-\u03ff\u0500-\u07ff]", 4),  # accented Latin, Greek, Hebrew, Arabic: a token, and the space before
    ("[\u0800-\uffff]", 5),  # CJK, kana, Hangul, typographic punctuation: a token, rarer CJK 3 byte tokens
    ("[\U00010000-\U0010ffff]", 15),  # emoji: up to 4 byte tokens
))
# A server's answer to a prompt that with the reply is longer than its context (matched case-insensitively):
# vLLM and OpenAI "This model's maximum context length is 8192 tokens. However, you requested ..." (OpenAI's
# code: context_length_exceeded), vLLM's "... longer than the maximum model length of 8192", llama.cpp's
# "the request exceeds the available context size" (exceed_context_size_error), LM Studio's "... the model
# is loaded with context length of only 8192 tokens" (at times with status 200), MLX's "Context size has
# been exceeded", Ollama's "exceeded max context length", TGI's 422 "Input validation error: `inputs` tokens +
# `max_new_tokens` must be <= 4096". Such a prompt is sent once more, fitted to REFIT_CONTEXT of
# HERMES_CONTEXT_TOKENS: the estimate fell short, or the server's context is smaller. Whatever the status or
# error code (some servers report it with a 500): the same prompt again would only be refused again.
CONTEXT_EXCEEDED = re.compile(
    r"context[ _](length|size|window)|maximum model length|`?inputs`? tokens \+ `?max_new_tokens`? must be",
    re.IGNORECASE,
)
REFIT_CONTEXT = 3 / 4
# A server whose chat template takes one system message and then user and assistant by turns (vLLM serving
# Mistral Instruct, Llama 2, Gemma): "Conversation roles must alternate user/assistant/user/assistant/...".
ROLES_MUST_ALTERNATE = re.compile(r"roles must alternate", re.IGNORECASE)


def _quarters(text: str) -> int:
    return len(text) + sum(extra * len(chars.findall(text)) for chars, extra in QUARTERS)


@functools.lru_cache(maxsize=4096)  # fitting a prompt weighs the same turns again and again
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
        """`text` in as many pieces as it is estimated tokens, each as long as it takes to reach the next
        token; a character of several tokens (an emoji) is followed by empty pieces."""
        pieces: list[str] = []
        quarters = 0
        for char in text:
            quarters += _quarters(char)
            if (tokens := -(-quarters // 4)) > len(pieces):
                pieces += [char] + [""] * (tokens - len(pieces) - 1)
            else:
                pieces[-1] += char
        return pieces

    def decode(self, pieces: list[str], **_: Any) -> str:
        return "".join(pieces)


class _Retryable(Exception):
    """A failure before the first token that is worth another try."""


class _ContextExceeded(Exception):
    """The server refused the prompt as longer than its context: worth one try with a shorter one."""


class _RolesMustAlternate(Exception):
    """The server's chat template refused system lines between turns or two turns of one role in a row."""


def check_settings(settings: Settings) -> None:
    """EngineError for settings this engine cannot work with, asking no server (bot.engine.check_settings)."""
    if not settings.openai_base_url:
        raise EngineError("HERMES_ENGINE=openai needs HERMES_OPENAI_BASE_URL, e.g. http://localhost:1234/v1")
    if settings.openai_api_key is not None and urlsplit(settings.openai_base_url).username is not None:
        # Both are the Authorization header (Bearer, Basic): aiohttp refuses every request that has both.
        raise EngineError("HERMES_OPENAI_BASE_URL holds a user and password (Basic auth) and HERMES_OPENAI_API_KEY "
                          "is set (Bearer auth): a request can carry only one; remove the other")


class OpenAIEngine(Engine):
    name = "openai"

    def __init__(
        self, settings: Settings, *, attempts: int = 4, backoff_s: float = 0.5, timeout_s: float = 120.0
    ) -> None:
        self.settings = settings
        self.attempts, self.backoff_s, self.timeout_s = attempts, backoff_s, timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.alternate = False  # the server's template wants user and assistant by turns: learnt from its refusal

    @property
    def base_url(self) -> str:
        return (self.settings.openai_base_url or "").rstrip("/")

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    @property
    def models_url(self) -> str:
        return f"{self.base_url}/models"

    @property
    def shown_url(self) -> str:
        """`url` as messages name it: they reach logs and Discord, which a password in the URL must not."""
        return without_password(self.url)

    @property
    def base_url_hint(self) -> str:
        """Added to answers that suggest a wrong path: these servers serve the API under /v1, and a base URL
        without it reaches an unknown path (LM Studio even answers that 200, with an error in JSON)."""
        if self.base_url.endswith("/v1"):
            return ""
        return f" (check that HERMES_OPENAI_BASE_URL ends in /v1: it is {without_password(self.base_url)})"

    async def start(self) -> None:
        check_settings(self.settings)
        headers = {"Accept": "text/event-stream"}
        if self.settings.openai_api_key is not None:
            headers["Authorization"] = f"Bearer {self.settings.openai_api_key.get_secret_value()}"
        timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=self.timeout_s)
        self._session = aiohttp.ClientSession(headers=headers, timeout=timeout)
        if problem := await self._probe():
            log.warning("openai engine: the server at %s does not answer: %s; replies fail until it does",
                        without_password(self.models_url), problem)

    async def ready(self) -> bool:
        """Whether the server answers: the engine itself holds no model that could be missing."""
        return await self._probe() is None

    async def _probe(self) -> str | None:
        """Why `GET {base}/models` shows the server unusable (unreachable, slow, an error answer), or None
        when it answers 2xx within READY_TIMEOUT_S; never raises, as readiness checks must not."""
        if self._session is None:
            return "the openai engine is not started"
        try:
            timeout = aiohttp.ClientTimeout(total=READY_TIMEOUT_S)
            async with self._session.get(self.models_url, headers={"Accept": "application/json"},
                                         timeout=timeout) as resp:
                body = (await resp.read()).decode("utf-8", errors="replace")
        except (TimeoutError, aiohttp.ClientError) as exc:
            return _reason(exc)
        if not 200 <= resp.status < 300:
            return f"answered {resp.status}: {_error_detail(body)}{self.base_url_hint}"
        if _error_field(_json(body)) is not None:
            return f"answered an error: {_error_detail(body)}{self.base_url_hint}"
        return None

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
        task.add_done_callback(functools.partial(self._served, stream))
        return stream

    def _served(self, stream: GenerationStream, task: asyncio.Task[None]) -> None:
        """Ends the stream of a serve task that `close()` cancelled (started or not): the Finish or error
        it would have fed never comes, and the stream's reader would wait forever."""
        self._tasks.discard(task)
        if task.cancelled():
            message = f"the openai engine is shutting down: the reply from {self.shown_url} was cut off"
            stream.fail(EngineError(message))

    def payload(self, request: GenerationRequest, context: int | None = None) -> dict[str, Any]:
        """The JSON body for `request`, as sent to the server: the messages that fit the context (by default
        HERMES_CONTEXT_TOKENS) with the reply, and a `max_tokens` within what is left of both (a resumed
        reply's text counts as written)."""
        s, context = request.sampling, context or self.settings.context_tokens
        try:
            prompt = encode_messages(LengthEstimate(), request.messages, context_tokens=context,
                                     max_new_tokens=s.max_new_tokens)
        except PromptTooLong as exc:
            raise EngineError(str(exc)) from None
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt.messages]  # defanged by encode_messages
        if self.alternate:
            messages = alternating(messages)
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
        attempt, refitted = 0, False
        while True:
            try:
                await self._attempt(stream, body, stops, state)
                break
            except _ContextExceeded as exc:  # once, before any text, and only with a shorter prompt
                smaller = None if refitted or state["tokens"] else self._refitted(stream.request, body)
                context, refit = self.settings.context_tokens, int(self.settings.context_tokens * REFIT_CONTEXT)
                if smaller is None:
                    also = f"also with the prompt fitted to {refit} tokens; " if refitted else ""
                    raise EngineError(f"{exc} ({also}HERMES_CONTEXT_TOKENS={context} is probably above the "
                                      "server's context: set it to the server's context size or below)") from None
                log.warning("openai engine: %s; retrying once with the prompt fitted to %d tokens: "
                            "HERMES_CONTEXT_TOKENS=%d is probably above the server's context", exc, refit, context)
                body, refitted = smaller, True
            except _RolesMustAlternate as exc:  # from now on this server gets its messages turn by turn
                if self.alternate or state["tokens"]:
                    raise EngineError(str(exc)) from None
                log.warning("openai engine: %s; sending messages turn by turn from now on", exc)
                self.alternate = True
                body = {**body, "messages": alternating(body["messages"])}
            except _Retryable as exc:
                if state["tokens"] or attempt == self.attempts - 1:
                    raise EngineError(str(exc)) from None
                delay = self.backoff_s * 2**attempt
                log.warning("openai engine: %s; retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                attempt += 1
        completion = state["completion_tokens"] or state["tokens"]
        stream.feed([Finish(state["reason"], int(state["prompt_tokens"]), int(completion))])

    def _refitted(self, request: GenerationRequest, body: dict[str, Any]) -> dict[str, Any] | None:
        """`body` with its prompt fitted to REFIT_CONTEXT of the context, or None when that is no shorter."""
        try:
            smaller = self.payload(request, int(self.settings.context_tokens * REFIT_CONTEXT))
        except EngineError:  # even the system prompt does not fit
            return None
        return None if smaller == body else smaller

    async def _attempt(
        self, stream: GenerationStream, body: dict[str, Any], stops: StopMatcher, state: dict[str, Any]
    ) -> None:
        assert self._session is not None
        try:
            async with self._session.post(self.url, json=body) as resp:
                if resp.status != 200:
                    text = await resp.text()
                    detail = _error_detail(text)
                    hint = self.base_url_hint if resp.status in (404, 405) else ""
                    message = (f"the OpenAI-compatible server at {self.shown_url} answered {resp.status}: "
                               f"{detail}{hint}")
                    if CONTEXT_EXCEEDED.search(text):  # before the retryable statuses: a retry gets the same
                        raise _ContextExceeded(message)
                    if ROLES_MUST_ALTERNATE.search(text):
                        raise _RolesMustAlternate(message)
                    if resp.status in RETRYABLE_STATUS:
                        raise _Retryable(message)
                    raise EngineError(message)
                if resp.content_type.endswith("json"):  # not an event stream: retrying would not change it
                    text = await resp.text()
                    if _error_field(_json(text)) is None:
                        what = "JSON"
                    elif CONTEXT_EXCEEDED.search(text):  # LM Studio, at times: 200 and a context error
                        raise _ContextExceeded(f"the server at {self.shown_url} answered an error: "
                                               f"{_error_detail(text)}")
                    else:
                        what = f"an error: {_error_detail(text)}"
                    raise EngineError(
                        f"the server at {self.shown_url} answered {what} instead of an event stream"
                        f"{self.base_url_hint}"
                    )
                await self._read_events(resp, stream, stops, state)
        except (TimeoutError, aiohttp.ClientError) as exc:
            reason = _reason(exc)
            if state["tokens"]:
                raise EngineError(f"the connection to {self.shown_url} broke mid-reply: {reason}") from None
            raise _Retryable(f"cannot reach the OpenAI-compatible server at {self.shown_url}: {reason}") from None

    async def _read_events(
        self, resp: aiohttp.ClientResponse, stream: GenerationStream, stops: StopMatcher, state: dict[str, Any]
    ) -> None:
        finished = False
        async for kind, data in _events(resp):
            if kind == "error":
                raise self._reported_error(data)
            if data == "[DONE]":
                break
            chunk = _json(data)
            if not isinstance(chunk, dict):
                raise EngineError(f"the server at {self.shown_url} sent a malformed event: {data[:200]!r}")
            if _error_field(chunk) is not None:
                raise self._reported_error(data)
            usage = chunk.get("usage") or {}  # a null count is unknown: keep what we have (0 at first)
            state["prompt_tokens"] = usage.get("prompt_tokens") or state["prompt_tokens"]
            state["completion_tokens"] = usage.get("completion_tokens") or state["completion_tokens"]
            for choice in chunk.get("choices") or []:
                # JSON may escape a lone surrogate, which json.loads keeps and nothing downstream can encode.
                text = well_formed((choice.get("delta") or {}).get("content") or "")
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
                raise _Retryable(f"the server at {self.shown_url} closed the stream before any text")
            if not finished:  # a complete reply says so: finish_reason or [DONE]
                raise EngineError(
                    f"the server at {self.shown_url} ended the stream mid-reply, without a finish_reason"
                )
        if rest := stops.flush():  # the text held back in case it began a stop string
            stream.feed([TextChunk(rest)])

    def _reported_error(self, data: str) -> Exception:
        """The error the server reported in the stream, with its message; worth another try (before any
        text) when its code says the trouble passes (429, 5xx), or one with a shorter prompt when it says
        the context is full (llama.cpp), not for another 400."""
        message = f"the server at {self.shown_url} reported an error: {_error_detail(data)}"
        if CONTEXT_EXCEEDED.search(data):  # also with a 5xx code: the same prompt again is refused again
            return _ContextExceeded(message)
        return _Retryable(message) if _error_code(data) in RETRYABLE_STATUS else EngineError(message)


async def _events(resp: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, str]]:
    """Each server-sent event as (type, data): its `data:` lines joined by newlines, as the SSE standard
    says, and the type its `event:` line names ("message" without one; comments and keep-alives carry
    nothing). Some llama.cpp server builds send an error as an `error:` line instead: an "error" event."""
    kind, lines = "message", []
    async for line in _lines(resp):
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            lines.append(value)
        elif field == "event":
            kind = value.strip()
        elif field == "error":
            kind = "error"
            lines.append(value)
        elif not line:  # a blank line ends the event
            if lines or kind == "error":
                yield kind, "\n".join(lines).strip()
            kind, lines = "message", []


async def _lines(resp: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The body's lines, then a blank one: the end of the stream ends its last event too."""
    async for raw in resp.content:
        yield raw.decode("utf-8", errors="replace").rstrip("\r\n")
    yield ""


def _reason(exc: BaseException) -> str:
    """What went wrong, for a message: aiohttp names a URL it cannot use (a mistyped port) with its password."""
    return without_password(str(exc) or type(exc).__name__)


def _json(text: str) -> Any:
    """`text` parsed as JSON, or None when it is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _error_field(data: Any) -> Any:
    """The `error` of an OpenAI-style JSON object ({"error": {"message": ...}}, LM Studio's {"error": "..."}),
    or None (also when it is null, as some servers send in every chunk)."""
    return data.get("error") if isinstance(data, dict) else None


def _error_object(body: str) -> Any:
    """The error an error body describes: its `error`, else the body itself (llama.cpp's error events
    are {"code": ..., "message": ...})."""
    data = _json(body)
    return _error_field(data) or data


def _error_detail(body: str) -> str:
    """The human part of an error body: its error's message, else the body's start, so that an error
    without a usable message is still reported with what the server sent. Well-formed: it reaches logs, Discord
    and the queue's JSON, and the server's JSON may escape a lone surrogate."""
    error = _error_object(body)
    message = error.get("message") if isinstance(error, dict) else error
    if isinstance(message, str) and message.strip():
        return well_formed(message.strip()[:300])
    return body.strip()[:300] or "(empty body)"


def _error_code(body: str) -> int | None:
    """The HTTP-like status code an error body carries (llama.cpp: "code": 400; vLLM: "code": 500)."""
    error = _error_object(body)
    code = error.get("code") if isinstance(error, dict) else None
    if isinstance(code, str) and code.isdigit():
        return int(code)
    return code if isinstance(code, int) else None
