"""The inference worker: takes jobs from the queue, drives an engine, publishes token deltas.

One `Worker` holds up to `max_batch_size` jobs at once (fewer where its engine has memory for fewer) and submits them all to its engine, which
batches them. Per job it publishes `TextDelta`s in order (continuing from `next_seq` on a redelivery,
with the already-sent text as the start of the reply), then exactly one `Done` or `ErrorEvent`, and
only then `complete`s the job. A watcher polls the queue for cancellations and enforces deadlines.
While the queue is unreachable (a Redis restart) a job keeps what it could not publish and tries again
until its deadline: the job stays queued and this worker its owner, so the reply goes on afterwards.

Two ways to run it:
- `hermes-bot worker` (`run_worker`): its own process on a Redis queue; SIGTERM/SIGINT stop taking
  jobs, let held ones finish for `shutdown_grace_s`, and `release` the rest for another worker.
- in-process, with `memory://`: `worker = Worker.in_process(settings, queue)`, then run
  `asyncio.create_task(worker.run())` next to the bot and `await worker.shutdown()` on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import signal
import sys
import time
from collections.abc import Sequence

from bot import metrics
from bot.config import Settings
from bot.engine import Engine, EngineError, GenerationRequest, GenerationStream, TextChunk, make_engine
from bot.logging_setup import log_context
from bot.queue.base import Delivery, JobQueue, QueueEvent, QueueUnavailable
from bot.queue.jobs import Done, ErrorEvent, GenerationJob, TextDelta
from bot.text_safety import storable

log = logging.getLogger(__name__)

OUTAGE_REMINDER_S = 60.0
# Pauses between tries to publish while the queue is unreachable, the last one repeated until the job's
# deadline (each try itself resends for a few seconds, see redis_streams.RETRY_DELAYS_S).
PUBLISH_RETRY_S = (0.5, 1.0, 2.0, 5.0)


class QueueTrouble:
    """Log a failing queue call once, then a reminder each OUTAGE_REMINDER_S, then once when it works
    again: an idle worker asks the queue several times a second, and a Redis outage wrote thousands of
    identical warnings an hour."""

    def __init__(self, call: str) -> None:
        self.call = call
        self._since: float | None = None
        self._said = 0.0

    def failed(self, exc: Exception) -> None:
        now = time.monotonic()
        if self._since is None:
            self._since = self._said = now
            log.warning("%s failed: %s", self.call, exc)
        elif now - self._said >= OUTAGE_REMINDER_S:
            self._said = now
            log.warning("%s still failing after %.0f s: %s", self.call, now - self._since, exc)

    def succeeded(self) -> None:
        if self._since is not None:
            log.info("%s works again after %.0f s", self.call, time.monotonic() - self._since)
            self._since = None


class Worker:
    """Consumes `queue` with `engine`. `run()` starts the engine and returns after `shutdown()`."""

    def __init__(
        self, settings: Settings, queue: JobQueue, engine: Engine, *,
        poll_s: float = 0.2, shutdown_grace_s: float | None = None,
    ) -> None:
        self.settings, self.queue, self.engine = settings, queue, engine
        self.poll_s = poll_s
        self.shutdown_grace_s = settings.shutdown_grace_s if shutdown_grace_s is None else shutdown_grace_s
        self._held: dict[str, tuple[GenerationJob, GenerationStream | None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._watch_done = asyncio.Event()
        self._slot_free = asyncio.Event()
        self._letting_go = asyncio.Event()  # the shutdown grace is over: held jobs stop waiting for the queue
        self.started = asyncio.Event()

    @classmethod
    def in_process(cls, settings: Settings, queue: JobQueue) -> Worker:
        """A worker with the engine from settings, to run as a task beside the bot (memory:// queue)."""
        return cls(settings, queue, make_engine(settings))

    @property
    def held(self) -> int:
        return len(self._held)

    async def ready(self) -> bool:
        """The "model" readiness check: the engine started, and (the openai engine) its server answers."""
        return self.started.is_set() and await self.engine.ready()

    async def run(self) -> None:
        await self.engine.start()
        self.started.set()
        watcher = asyncio.create_task(self._watch())
        try:
            await self._take_jobs()
            await self._drain()
        finally:
            # A stop flag, not watcher.cancel(): redis-py 8.1 often loses a cancellation that lands
            # mid-command (the command returns), and the watcher would then poll forever.
            self._watch_done.set()
            await watcher
            await self.engine.close()
            self._stopped.set()

    def request_stop(self) -> None:
        """Begin a graceful shutdown without waiting (safe from a signal handler)."""
        self._stopping.set()

    async def shutdown(self) -> None:
        """Stop taking jobs; held jobs finish (up to shutdown_grace_s) or are released. Waits for run()."""
        self._stopping.set()
        if self.started.is_set():
            await self._stopped.wait()

    async def _take_jobs(self) -> None:
        capacity = self.engine.capacity(self.settings.max_batch_size)
        fetching = QueueTrouble("fetching jobs")
        while not self._stopping.is_set():
            free = capacity - len(self._held)
            if free <= 0:
                self._slot_free.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot_free.wait(), self.poll_s)
                continue
            try:
                deliveries = await self.queue.fetch(free, block_ms=250)
            except Exception as exc:  # queue down: keep trying, the held jobs go on
                fetching.failed(exc)
                await asyncio.sleep(1.0)
                continue
            fetching.succeeded()
            for delivery in deliveries:
                self._held[delivery.job.job_id] = (delivery.job, None)
                task = asyncio.create_task(self._serve(delivery))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _drain(self) -> None:
        """Give held jobs shutdown_grace_s to finish, then release the rest to the queue."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.shutdown_grace_s)
        self._letting_go.set()
        while self._tasks:
            for _, stream in list(self._held.values()):
                if stream is not None:
                    stream.cancel("released")
            await asyncio.wait(set(self._tasks), timeout=self.poll_s)

    async def _watch(self) -> None:
        """Every poll_s: cancel streams whose job was cancelled (or taken over) or whose deadline passed."""
        checking = QueueTrouble("checking the queue")
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._watch_done.wait(), self.poll_s)
                return
            metrics.set_active_conversations(len(self._held))
            try:
                metrics.set_queue_depth(await self.queue.depth())
                cancelled = await self.queue.cancelled(list(self._held)) if self._held else set()
            except Exception as exc:
                checking.failed(exc)
                cancelled = set()
            else:
                checking.succeeded()
            now = time.time()
            for job_id, (job, stream) in list(self._held.items()):
                if stream is None:
                    continue
                if job_id in cancelled:
                    stream.cancel("cancelled")
                elif job.expired(now):
                    stream.cancel("deadline")

    async def _serve(self, delivery: Delivery) -> None:
        job = delivery.job
        with log_context(job=job.job_id, conversation=job.conversation_key):
            try:
                await self._generate(delivery)
            except QueueUnavailable as exc:  # down until the deadline (or shutdown): no word reaches the bot
                log.warning("letting the job go, the queue is unreachable: %s", exc)
                await self._let_go(job)
            except Exception as exc:  # a bug: end the job so the user is not left waiting
                log.exception("serving job failed")
                metrics.count_error("worker")
                self._stop_generating(job)
                try:
                    await self._finish(job, ErrorEvent(job_id=job.job_id, kind="worker", message=str(exc)))
                except Exception:  # the queue is unreachable: let the job go, to be taken over once it is back
                    await self._let_go(job)
            finally:
                self._held.pop(job.job_id, None)
                self._slot_free.set()

    async def _generate(self, delivery: Delivery) -> None:
        job, seq = delivery.job, delivery.next_seq
        started = time.time()
        if delivery.attempt == 1:  # a resumed job waited once; its later deliveries include its first run
            metrics.observe_job_wait(started - job.created_at)
        if job.expired(started):
            await self._finish(job, Done(job_id=job.job_id, finish_reason="deadline"))
            return
        request = GenerationRequest(job.job_id, job.messages, job.sampling, job.stop, delivery.resume_text)
        try:
            stream = self.engine.submit(request)
            self._held[job.job_id] = (job, stream)
            async for batch in stream.batches():  # one queue round trip per batch, not per token
                events: list[QueueEvent] = []
                for item in batch:
                    if isinstance(item, TextChunk):
                        # A model's byte fallback may write NUL, which PostgreSQL cannot store: the reply
                        # shown must be the one stored.
                        if not (text := storable(item.text)):
                            continue
                        if seq == delivery.next_seq:
                            metrics.observe_first_token(time.time() - started)
                        events.append(TextDelta(job_id=job.job_id, seq=seq, text=text))
                        seq += 1
                    elif item.reason == "released":
                        await self.queue.publish_many(events)
                        await self.queue.release(job.job_id)
                        log.info("released job for another worker after %d deltas", seq)
                        return
                    else:
                        metrics.observe_generation(time.time() - started, item.completion_tokens)
                        events.append(Done(
                            job_id=job.job_id, finish_reason=item.reason,
                            prompt_tokens=item.prompt_tokens, completion_tokens=item.completion_tokens,
                        ))
                if not events:  # the batch was NUL only
                    continue
                await self._publish(job, events)
                if isinstance(events[-1], Done):
                    await self.queue.complete(job.job_id)
        except EngineError as exc:
            metrics.count_error("engine")
            log.warning("generation failed: %s", exc)
            await self._finish(job, ErrorEvent(job_id=job.job_id, kind="engine", message=str(exc)))

    async def _finish(self, job: GenerationJob, event: Done | ErrorEvent) -> None:
        await self._publish(job, [event])
        await self.queue.complete(job.job_id)

    async def _publish(self, job: GenerationJob, events: Sequence[QueueEvent]) -> None:
        """Publish `events`, trying again while the queue is unreachable: a Redis restart or failover keeps
        the job queued and this worker its owner, so the reply goes on once Redis is back (a resent delta is
        dropped there), where an error would end it. Raises QueueUnavailable at the job's deadline (the next
        worker to take the job ends it) or once the shutdown grace is over (the job is taken over)."""
        publishing = QueueTrouble("publishing the reply")
        pauses = itertools.chain(PUBLISH_RETRY_S, itertools.repeat(PUBLISH_RETRY_S[-1]))
        while True:
            try:
                await self.queue.publish_many(events)
            except QueueUnavailable as exc:
                left = (job.deadline or math.inf) - time.time()
                if left <= 0 or self._letting_go.is_set():
                    raise
                publishing.failed(exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._letting_go.wait(), min(next(pauses), left))
            else:
                publishing.succeeded()
                return

    def _stop_generating(self, job: GenerationJob) -> None:
        """Stop the engine on a job that ended early: it would otherwise write the whole reply for nobody."""
        _, stream = self._held.get(job.job_id, (job, None))
        if stream is not None:
            stream.cancel("cancelled")

    async def _let_go(self, job: GenerationJob) -> None:
        """Hand back a job this worker cannot go on with. If the queue cannot hear that either, the job's
        heartbeat stops all the same, so another worker takes it over once the queue is back."""
        self._stop_generating(job)
        with contextlib.suppress(Exception):
            await self.queue.release(job.job_id)


def run_worker(settings: Settings) -> int:
    """`hermes-bot worker`: consume the Redis queue until SIGTERM/SIGINT, then shut down gracefully."""
    from bot.logging_setup import configure_logging

    configure_logging(settings)
    if settings.queue_url == "memory://":
        print(
            "hermes-bot: `hermes-bot worker` needs a shared queue (HERMES_QUEUE_URL=redis://host:6379/0); "
            "with memory:// the worker runs inside `hermes-bot run` and `hermes-bot chat`.",
            file=sys.stderr,
        )
        return 2
    asyncio.run(_serve_forever(settings))  # an EngineError is reported by cli.main
    return 0


async def _serve_forever(settings: Settings) -> None:
    from bot.health import serve_ops
    from bot.queue.factory import open_queue

    queue = open_queue(settings)
    worker = Worker(settings, queue, make_engine(settings))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.request_stop)
    ops = await serve_ops(settings, {"queue": queue.ping, "model": worker.ready})
    try:
        log.info("worker started engine=%s queue=%s", worker.engine.name, settings.queue_url.split("@")[-1])
        await worker.run()
    finally:
        if ops is not None:
            await ops.close()
        await queue.close()
    log.info("worker stopped")
