"""The engine interface the worker drives: submit many requests, stream each one's text, cancel any.

An engine owns the model (or the connection to a model server). The worker never sees tokens or
tensors: it submits a `GenerationRequest` and reads a `GenerationStream` of `TextChunk`s that ends
with exactly one `Finish`. Engines that produce text on another thread (the transformers engine)
feed the stream through `GenerationStream.feed_threadsafe`, so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from bot.engine.text import StopMatcher
from bot.personas import Sampling

FinishReason = Literal["stop", "length", "cancelled", "deadline", "released"]


class EngineError(RuntimeError):
    """Generation failed (model server down, bad reply, prompt too long); the message says why."""


@dataclass(frozen=True)
class GenerationRequest:
    """One reply to generate. `assistant_prefix` is text the reply already starts with (a resumed job)."""

    request_id: str
    messages: list[dict[str, str]]
    sampling: Sampling = field(default_factory=Sampling)
    stop: Sequence[str] = ()
    assistant_prefix: str = ""

    def stop_matcher(self) -> StopMatcher:
        """The stops of this reply, seeing what it continues: its written start, or the line break that
        opens an assistant turn (so a reply that opens as "Bob: ..." is stopped like a later line)."""
        return StopMatcher(self.stop, before=self.assistant_prefix or "\n")


@dataclass(frozen=True)
class TextChunk:
    """New reply text, in order, never splitting a UTF-8 character and never containing stop text."""

    text: str


@dataclass(frozen=True)
class Finish:
    """The last item of every stream."""

    reason: FinishReason
    prompt_tokens: int = 0
    completion_tokens: int = 0


StreamItem = TextChunk | Finish


class GenerationStream:
    """Async iterator over one request's `TextChunk`s, ending after its `Finish` (or raising EngineError).

    `cancel(reason)` asks the engine to stop; the stream then ends with `Finish(reason)`. Engines call
    `feed`/`fail` (event-loop thread) or `feed_threadsafe` (any thread).
    """

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.request = request
        self.loop = loop or asyncio.get_running_loop()
        self.cancel_reason: FinishReason | None = None
        self.cancel_requested = asyncio.Event()  # for engines that wait on I/O (openai)
        self._items: asyncio.Queue[StreamItem | EngineError] = asyncio.Queue()
        self._done = False

    @property
    def cancelled(self) -> bool:
        return self.cancel_reason is not None

    def cancel(self, reason: FinishReason = "cancelled") -> None:
        """Ask the engine to stop (call on the event loop); idempotent, and the first reason wins."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
            self.cancel_requested.set()

    def feed(self, items: Sequence[StreamItem | EngineError]) -> None:
        for item in items:
            self._items.put_nowait(item)

    def feed_threadsafe(self, items: Sequence[StreamItem | EngineError]) -> None:
        self.loop.call_soon_threadsafe(self.feed, list(items))

    def fail(self, error: EngineError) -> None:
        self._items.put_nowait(error)

    def __aiter__(self) -> AsyncIterator[StreamItem]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[StreamItem]:
        async for batch in self.batches():
            for item in batch:
                yield item

    async def batches(self) -> AsyncIterator[list[StreamItem]]:
        """The items in order, everything already waiting at once, so a worker can publish a whole
        batch in one queue round trip (decode steps pile up while the event loop is busy)."""
        while not self._done:
            batch = [await self._items.get()]
            while not self._items.empty() and not isinstance(batch[-1], Finish | EngineError):
                batch.append(self._items.get_nowait())
            last = batch[-1]
            if isinstance(last, EngineError):
                self._done = True
                if len(batch) > 1:
                    yield batch[:-1]  # type: ignore[misc]
                raise last
            self._done = isinstance(last, Finish)
            yield batch  # type: ignore[misc]


class Engine(ABC):
    """Owns one model; generates for many requests at once. Lifecycle: `await start()` ... `await close()`."""

    name: str = "engine"

    @abstractmethod
    async def start(self) -> None:
        """Load the model / check the server. Called once before `submit`."""

    @abstractmethod
    async def close(self) -> None:
        """Stop generating, end every open stream, free the model."""

    @abstractmethod
    def submit(self, request: GenerationRequest) -> GenerationStream:
        """Start generating `request` now (the engine batches it with the others in flight)."""

    def capacity(self, wanted: int) -> int:
        """How many of `wanted` requests (HERMES_MAX_BATCH_SIZE) it generates for at once once started: fewer
        where its memory holds fewer, so a worker does not take jobs that would only wait inside it."""
        return wanted

    async def ready(self) -> bool:
        """Whether the engine can generate now, for a worker's readiness check (asked once started): an
        engine holding its model can; one that talks to a model server asks that server. Never raises."""
        return True

    async def generate_text(self, request: GenerationRequest) -> tuple[str, Finish]:
        """Convenience for tests and tools: the whole reply and its Finish."""
        parts: list[str] = []
        finish = Finish("stop")
        async for item in self.submit(request):
            if isinstance(item, TextChunk):
                parts.append(item.text)
            else:
                finish = item
        return "".join(parts), finish
