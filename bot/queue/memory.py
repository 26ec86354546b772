"""In-process transport: the embedded default, where the worker runs inside the bot's event loop.

A delivery belongs to the asyncio task that fetched it. If that task ends (crash, cancellation)
while the job is unfinished, the job goes back to the front of the line and is redelivered with
its resume text: the in-process counterpart of a Redis worker dying. Event ids are "1", "2", ...
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from bot.config import Settings
from bot.queue.base import (
    DEADLINE_GRACE_S,
    MAX_DEAD_LETTERS,
    Delivery,
    JobQueue,
    QueueBusy,
    QueueEvent,
    dead_letter_message,
    resume_point,
)
from bot.queue.jobs import DeadLetter, Done, ErrorEvent, GenerationJob, is_final

# Finished jobs keep their events this long, so a reader that starts late still sees them. Its reader is
# in this process and starts at once, and each job holds its prompt and every delta (~175 KB for 50 turns):
# Redis's five minutes would keep ~50 MB at one reply a second for nobody.
EVENTS_TTL_S = 30.0


@dataclass
class _JobState:
    job: GenerationJob
    events: list[QueueEvent] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    attempt: int = 0
    owner: asyncio.Task[object] | None = None
    cancelled: bool = False

    @property
    def final(self) -> bool:
        return bool(self.events) and is_final(self.events[-1])


class MemoryQueue(JobQueue):
    def __init__(self, settings: Settings, *, deadline_grace_s: float = DEADLINE_GRACE_S) -> None:
        self._max_waiting = settings.queue_max_waiting
        self._max_per_conversation = settings.queue_max_per_conversation
        self._max_deliveries = settings.queue_max_deliveries
        self._job_timeout_s = settings.job_timeout_s
        self._grace_s = deadline_grace_s
        self._jobs: dict[str, _JobState] = {}
        self._waiting: deque[str] = deque()
        self._work = asyncio.Event()
        self._watched: set[asyncio.Task[object]] = set()
        self._dead: deque[DeadLetter] = deque(maxlen=MAX_DEAD_LETTERS)

    # ----- bot side -----

    async def submit(self, job: GenerationJob, *, supersede: bool = False) -> int:
        if job.job_id in self._jobs:
            raise ValueError(f"job {job.job_id} was already submitted")
        self._end_expired_waiting()
        same = [jid for jid in self._waiting if self._jobs[jid].job.conversation_key == job.conversation_key]
        if supersede:
            for jid in same:
                self._waiting.remove(jid)
                self._finish(self._jobs[jid], Done(job_id=jid, finish_reason="superseded"))
        elif len(same) >= self._max_per_conversation:
            raise QueueBusy(len(same), "conversation", self._max_per_conversation)
        if len(self._waiting) >= self._max_waiting:
            raise QueueBusy(len(self._waiting), "queue", self._max_waiting)
        if job.deadline is None:
            job.deadline = job.created_at + self._job_timeout_s
        self._jobs[job.job_id] = _JobState(job)
        self._waiting.append(job.job_id)
        self._work.set()
        return len(self._waiting)

    async def stream(self, job_id: str, *, after: str | None = None) -> AsyncIterator[tuple[str, QueueEvent]]:
        state = self._jobs.get(job_id)
        if state is None:
            yield "", ErrorEvent(job_id=job_id, kind="unknown_job", message="this reply is no longer available")
            return
        index = int(after) if after else 0
        give_up = (state.job.deadline or time.time()) + self._grace_s
        while True:
            while index < len(state.events):
                event = state.events[index]
                index += 1
                yield str(index), event
                if is_final(event):
                    return
            changed = state.changed
            try:
                await asyncio.wait_for(changed.wait(), timeout=max(0.0, give_up - time.time()))
            except TimeoutError:
                yield "", ErrorEvent(job_id=job_id, kind="timeout", message="no reply arrived in time")
                return

    async def cancel(self, job_id: str) -> None:
        state = self._jobs.get(job_id)
        if state is None or state.final:
            return
        if job_id in self._waiting:
            self._waiting.remove(job_id)
            self._finish(state, Done(job_id=job_id, finish_reason="cancelled"))
        else:
            state.cancelled = True

    async def depth(self) -> int:
        return len(self._waiting)

    async def position(self, job_id: str) -> int | None:
        try:
            return self._waiting.index(job_id) + 1
        except ValueError:
            return None

    # ----- worker side -----

    async def fetch(self, max_jobs: int, block_ms: int) -> list[Delivery]:
        deadline = time.monotonic() + block_ms / 1000
        while True:
            deliveries = self._take(max_jobs)
            remaining = deadline - time.monotonic()
            if deliveries or remaining <= 0:
                return deliveries
            self._work.clear()
            try:
                await asyncio.wait_for(self._work.wait(), timeout=remaining)
            except TimeoutError:
                return []

    def _take(self, max_jobs: int) -> list[Delivery]:
        owner = asyncio.current_task()
        deliveries: list[Delivery] = []
        while self._waiting and len(deliveries) < max_jobs:
            state = self._jobs[self._waiting.popleft()]
            state.attempt += 1
            job = state.job
            if state.cancelled:
                self._finish(state, Done(job_id=job.job_id, finish_reason="cancelled"))
            elif job.expired():
                self._finish(state, Done(job_id=job.job_id, finish_reason="deadline"))
            elif state.attempt > self._max_deliveries:
                reason = dead_letter_message(self._max_deliveries)
                self._dead.append(DeadLetter.of(job, state.attempt - 1, reason))
                self._finish(state, ErrorEvent(job_id=job.job_id, kind="dead_letter", message=reason))
            else:
                state.owner = owner
                resume, next_seq = resume_point(state.events)
                deliveries.append(Delivery(job=job, attempt=state.attempt, resume_text=resume, next_seq=next_seq))
        if deliveries and owner is not None and owner not in self._watched:
            self._watched.add(owner)
            owner.add_done_callback(self._owner_ended)
        return deliveries

    def _owner_ended(self, task: asyncio.Task[object]) -> None:
        """The fetching task is gone: its unfinished jobs go back to the front of the line."""
        self._watched.discard(task)
        held = [s for s in self._jobs.values() if s.owner is task]
        for state in held:
            state.owner = None
        orphans = [s.job.job_id for s in held if not s.final]
        self._waiting.extendleft(reversed(orphans))
        if orphans:
            self._work.set()

    async def publish(self, event: QueueEvent) -> None:
        state = self._jobs.get(event.job_id)
        if state is None or state.owner is None or state.final:
            return
        self._append(state, event)

    async def complete(self, job_id: str) -> None:
        state = self._jobs.get(job_id)
        if state is None or state.owner is None:
            return
        state.owner = None
        if not state.final:
            self._finish(state, ErrorEvent(job_id=job_id, kind="incomplete", message="the reply ended unexpectedly"))

    async def release(self, job_id: str) -> None:
        state = self._jobs.get(job_id)
        if state is None or state.owner is None or state.final:
            return
        state.owner = None
        self._waiting.appendleft(job_id)
        self._work.set()

    async def is_cancelled(self, job_id: str) -> bool:
        state = self._jobs.get(job_id)
        return state is None or state.cancelled or state.owner is None or state.final

    async def dead_letters(self, count: int = 100) -> list[DeadLetter]:
        return list(self._dead)[-count:]

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._work.set()

    # ----- internals -----

    def _end_expired_waiting(self) -> None:
        """End waiting jobs past their deadline as a worker taking them would (Done(deadline)): the bot has
        given up on them, so they must not hold places in line (their conversation's, the queue's) until a
        worker is free."""
        now = time.time()
        expired = [self._jobs[job_id] for job_id in self._waiting if self._jobs[job_id].job.expired(now)]
        for state in expired:
            self._waiting.remove(state.job.job_id)
            self._finish(state, Done(job_id=state.job.job_id, finish_reason="deadline"))

    def _append(self, state: _JobState, event: QueueEvent) -> None:
        state.events.append(event)
        changed, state.changed = state.changed, asyncio.Event()
        changed.set()
        if is_final(event):
            asyncio.get_running_loop().call_later(EVENTS_TTL_S, self._jobs.pop, event.job_id, None)

    def _finish(self, state: _JobState, event: QueueEvent) -> None:
        if not state.final:
            self._append(state, event)

