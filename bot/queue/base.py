"""The one queue interface the bot and the workers share; transports implement it.

Lifecycle of a job (both transports):

    submit ──> waiting (has a position) ──fetch──> in flight (a worker owns it) ──complete──> gone
                  │                                   │  publish(TextDelta...), publish(Done|ErrorEvent)
                  └─cancel: Done(cancelled)            └─release / owner died: back in line, redelivered
                    supersede: Done(superseded)           with resume_text + next_seq (attempt + 1)

Retry semantics: a job is delivered at most `max_deliveries` times; the next delivery instead moves it
to the dead letters and the bot receives `ErrorEvent(kind="dead_letter")`. Exactly one final event
(Done or ErrorEvent) reaches the bot per job. A worker that lost a job (another worker took it over)
is fenced: its publishes are dropped and `is_cancelled` answers True, so it simply stops.

The bot side gives up waiting at the job's deadline plus a grace period and yields
`ErrorEvent(kind="timeout")` (not stored, so a later `stream(..., after=...)` can still see a late reply).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from bot.queue.jobs import DeadLetter, Done, ErrorEvent, GenerationJob, TextDelta

QueueEvent = TextDelta | Done | ErrorEvent

# How long the bot keeps waiting past a job's deadline for the worker's own final event.
DEADLINE_GRACE_S = 5.0


MAX_DEAD_LETTERS = 1000  # dead letters a queue keeps, newest first (redis_lua's XADD MAXLEN says it again)


def dead_letter_message(max_deliveries: int) -> str:
    """What the bot is told when a job was given up after too many deliveries."""
    return f"generation failed {max_deliveries} times; the request was set aside"


def resume_point(events: Iterable[QueueEvent]) -> tuple[str, int]:
    """From a job's published events: the reply text the bot already has and the seq of the next TextDelta."""
    deltas = [e for e in events if isinstance(e, TextDelta)]
    return "".join(d.text for d in deltas), (deltas[-1].seq + 1 if deltas else 0)


class QueueBusy(Exception):
    """The job was not queued; `str(exc)` can be shown to the user as it is."""

    def __init__(self, depth: int, scope: Literal["queue", "conversation", "user"], limit: int) -> None:
        self.depth = depth
        self.scope = scope
        self.limit = limit
        replies = "1 reply" if depth == 1 else f"{depth} replies"
        if scope == "queue":
            waiting = "is" if depth == 1 else "are"
            text = f"I'm busy right now: {replies} {waiting} already waiting. Please try again in a moment."
        else:
            whose = "This conversation already has" if scope == "conversation" else "You already have"
            text = f"{whose} {replies} on the way (limit {limit}). Please wait for them before asking again."
        super().__init__(text)


class QueueUnavailable(Exception):
    """The queue backend cannot be reached (e.g. Redis is down); retry later."""


@dataclass
class Delivery:
    """A job handed to a worker.

    On a redelivery (attempt > 1) `resume_text` is the reply text the bot has already received and
    `next_seq` the seq of the next TextDelta: the worker appends resume_text to the prompt and
    continues, so the bot sees one seamless stream.
    """

    job: GenerationJob
    attempt: int
    resume_text: str = ""
    next_seq: int = 0


class JobQueue(ABC):
    """One object serves both sides; a process may use only the bot half, only the worker half, or both."""

    # ----- bot side -----

    @abstractmethod
    async def submit(self, job: GenerationJob, *, supersede: bool = False) -> int:
        """Queue `job`; returns its 1-based position in line.

        Raises QueueBusy when the queue holds `queue_max_waiting` waiting jobs, or when the job's
        conversation already holds `queue_max_per_conversation` of them. With `supersede=True`
        the conversation's older waiting jobs end (their streams with Done(superseded)) instead of
        raising for the per-conversation limit. A job without a
        deadline gets `now + job_timeout_s`.
        """

    @abstractmethod
    def stream(self, job_id: str, *, after: str | None = None) -> AsyncIterator[tuple[str, QueueEvent]]:
        """Yield (event_id, event) for a job until its final Done/ErrorEvent.

        `after` is the last event id already seen, to resume after a reconnect; None means from the start.
        """

    @abstractmethod
    async def cancel(self, job_id: str) -> None:
        """Stop a job: a waiting one ends at once, an in-flight one when its worker notices."""

    @abstractmethod
    async def depth(self) -> int:
        """Number of waiting (not yet fetched) jobs."""

    @abstractmethod
    async def position(self, job_id: str) -> int | None:
        """1-based place in line of a waiting job; None once a worker has it (or it is unknown)."""

    # ----- worker side -----

    @abstractmethod
    async def fetch(self, max_jobs: int, block_ms: int) -> list[Delivery]:
        """Take up to `max_jobs` jobs (redeliveries first), waiting up to `block_ms` when there are none.

        Cancelled, expired (Done(deadline)) and over-delivered (dead letter) jobs are finished here
        and never handed out.
        """

    @abstractmethod
    async def publish(self, event: QueueEvent) -> None:
        """Send an event of an in-flight job to the bot. Dropped if this worker no longer owns the job."""

    async def publish_many(self, events: Sequence[QueueEvent]) -> None:
        """Publish several events in order, in one round trip where possible (a batch's decode step)."""
        for event in events:
            await self.publish(event)

    @abstractmethod
    async def complete(self, job_id: str) -> None:
        """Acknowledge a finished job (after its final event). Only then is it gone for good."""

    @abstractmethod
    async def release(self, job_id: str) -> None:
        """Hand an unfinished job back (e.g. graceful shutdown); another worker resumes it."""

    @abstractmethod
    async def is_cancelled(self, job_id: str) -> bool:
        """True when the worker should stop this job: cancelled by the bot, or taken over by another worker.

        Cheap enough to poll between decode steps; a batching worker may use `cancelled` instead.
        """

    async def cancelled(self, job_ids: Collection[str]) -> set[str]:
        """The subset of `job_ids` for which `is_cancelled` is True (one round trip where possible)."""
        flags = await asyncio.gather(*(self.is_cancelled(job_id) for job_id in job_ids))
        return {job_id for job_id, flag in zip(job_ids, flags, strict=True) if flag}

    @abstractmethod
    async def dead_letters(self, count: int = 100) -> list[DeadLetter]:
        """The newest `count` dead-lettered jobs, oldest first, for inspection."""

    @abstractmethod
    async def ping(self) -> bool:
        """True when the backend answers (for /readyz); never raises."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections and background tasks. Does not release in-flight jobs (call release)."""
