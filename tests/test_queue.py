"""The same queue cases against the in-process transport and a real redis-server."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ReadOnlyError

from bot.cli import main
from bot.config import Settings
from bot.queue import redis_lua, redis_streams
from bot.queue.base import Delivery, JobQueue, QueueBusy, QueueEvent, QueueUnavailable, dead_letter_message
from bot.queue.factory import open_queue
from bot.queue.jobs import DeadLetter, Done, ErrorEvent, GenerationJob, TextDelta
from bot.queue.memory import MemoryQueue
from bot.queue.redis_streams import RedisStreamsQueue
from tests.queue_worker_proc import TOTAL_PIECES, full_text, slow_worker
from tests.tcp_proxy import CuttingProxy
from tests.waiting import eventually

ROOT = Path(__file__).resolve().parent.parent
CLAIM_IDLE_MS = 300
GRACE_S = 0.3


class Harness:
    """Opens bot-side and worker-side queues of one transport; memory shares one object, as in-process."""

    def __init__(self, kind: str, redis_url: str | None) -> None:
        self.kind = kind
        self.redis_url = redis_url
        self.prefix = f"test:{uuid.uuid4().hex[:8]}"
        self.settings = Settings()
        self._opened: list[JobQueue] = []
        self.bot: JobQueue

    def start(self, **overrides: Any) -> JobQueue:
        url = self.redis_url if self.kind == "redis" else "memory://"
        self.settings = Settings(**{"queue_url": url, "queue_claim_idle_ms": CLAIM_IDLE_MS, **overrides})
        self.bot = self._open()
        return self.bot

    def worker(self, **overrides: Any) -> JobQueue:
        """A worker-side queue (with Redis, its own object: `overrides` change its settings)."""
        return self.bot if self.kind == "memory" else self._open(self.settings.model_copy(update=overrides))

    def _open(self, settings: Settings | None = None) -> JobQueue:
        settings = settings or self.settings
        queue: JobQueue
        if self.kind == "memory":
            queue = MemoryQueue(settings, deadline_grace_s=GRACE_S)
        else:
            queue = RedisStreamsQueue(settings, prefix=self.prefix, deadline_grace_s=GRACE_S)
        self._opened.append(queue)
        return queue

    async def aclose(self) -> None:
        for queue in self._opened:
            await queue.close()


@pytest.fixture(params=["memory", "redis"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    h = Harness(request.param, redis_url)
    yield h
    await h.aclose()


@pytest.fixture
async def redis_harness(redis_url: str) -> AsyncIterator[Harness]:
    h = Harness("redis", redis_url)
    yield h
    await h.aclose()


@pytest.fixture
async def redis_admin(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client on the test Redis, to break things behind the queue's back."""
    admin = aioredis.from_url(redis_url, decode_responses=True)
    yield admin
    await admin.aclose()


def job(conversation: str = "chan-1", **fields: Any) -> GenerationJob:
    return GenerationJob(
        conversation_key=conversation, persona_id="hermes", messages=[{"role": "user", "content": "hi"}], **fields
    )


async def collect(queue: JobQueue, job_id: str, *, after: str | None = None) -> list[tuple[str, QueueEvent]]:
    async with asyncio.timeout(10):
        return [item async for item in queue.stream(job_id, after=after)]


async def fetch_one(queue: JobQueue) -> Delivery:
    deliveries = await queue.fetch(1, 2000)
    assert len(deliveries) == 1
    return deliveries[0]


async def test_submit_and_stream(harness: Harness) -> None:
    bot = harness.start()
    worker = harness.worker()
    j = job()
    assert await bot.submit(j) == 1
    assert j.deadline is not None and j.deadline > time.time()
    delivery = await fetch_one(worker)
    assert (delivery.job, delivery.attempt, delivery.resume_text, delivery.next_seq) == (j, 1, "", 0)
    await worker.publish(TextDelta(job_id=j.job_id, seq=0, text="Hel"))
    await worker.publish_many([
        TextDelta(job_id=j.job_id, seq=1, text="lo <@everyone>"),
        Done(job_id=j.job_id, finish_reason="stop", prompt_tokens=7, completion_tokens=2),
    ])
    await worker.complete(j.job_id)

    events = await collect(bot, j.job_id)
    assert [e for _, e in events] == [
        TextDelta(job_id=j.job_id, seq=0, text="Hel"),
        TextDelta(job_id=j.job_id, seq=1, text="lo <@everyone>"),
        Done(job_id=j.job_id, finish_reason="stop", prompt_tokens=7, completion_tokens=2),
    ]
    # A reader that reconnects after the first event gets exactly the rest.
    resumed = await collect(bot, j.job_id, after=events[0][0])
    assert resumed == events[1:]
    # Published after the final event: dropped.
    await worker.publish(TextDelta(job_id=j.job_id, seq=2, text="late"))
    assert await collect(bot, j.job_id) == events
    assert await bot.depth() == 0


async def test_many_jobs_in_one_fetch(harness: Harness) -> None:
    bot = harness.start()
    worker = harness.worker()
    jobs = [job(f"chan-{i}") for i in range(5)]
    for j in jobs:
        await bot.submit(j)
    assert await bot.depth() == 5
    deliveries = await worker.fetch(8, 2000)
    assert [d.job.job_id for d in deliveries] == [j.job_id for j in jobs]
    assert await bot.depth() == 0
    assert await worker.fetch(8, 0) == []


async def test_fetch_waits_for_a_job(harness: Harness) -> None:
    bot = harness.start()
    worker = harness.worker()
    j = job()
    fetching = asyncio.create_task(worker.fetch(4, 3000))
    await asyncio.sleep(0.1)
    await bot.submit(j)
    async with asyncio.timeout(2):
        deliveries = await fetching
    assert [d.job.job_id for d in deliveries] == [j.job_id]


async def test_cancel_waiting_job(harness: Harness) -> None:
    bot = harness.start()
    worker = harness.worker()
    j = job()
    await bot.submit(j)
    await bot.cancel(j.job_id)
    assert [e for _, e in await collect(bot, j.job_id)] == [Done(job_id=j.job_id, finish_reason="cancelled")]
    assert await worker.fetch(4, 0) == []
    assert await bot.depth() == 0


async def test_cancel_in_flight_job(harness: Harness) -> None:
    bot = harness.start()
    worker = harness.worker()
    a, b = job("a"), job("b")
    await bot.submit(a)
    await bot.submit(b)
    assert len(await worker.fetch(2, 2000)) == 2
    assert await worker.cancelled([a.job_id, b.job_id]) == set()
    await worker.publish(TextDelta(job_id=a.job_id, seq=0, text="partial"))
    await bot.cancel(a.job_id)
    assert await worker.is_cancelled(a.job_id)
    assert await worker.cancelled([a.job_id, b.job_id]) == {a.job_id}
    await worker.publish(Done(job_id=a.job_id, finish_reason="cancelled", completion_tokens=1))
    await worker.complete(a.job_id)
    events = [e for _, e in await collect(bot, a.job_id)]
    assert [type(e) for e in events] == [TextDelta, Done]
    assert isinstance(events[-1], Done) and events[-1].finish_reason == "cancelled"


async def test_backpressure_busy(harness: Harness) -> None:
    bot = harness.start(queue_max_waiting=3, queue_max_per_conversation=10)
    worker = harness.worker()
    positions = [await bot.submit(job(f"c{i}")) for i in range(3)]
    assert positions == [1, 2, 3]
    with pytest.raises(QueueBusy) as info:
        await bot.submit(job("c9"))
    assert info.value.depth == 3 and info.value.scope == "queue"
    assert "busy" in str(info.value) and "3" in str(info.value)
    assert await bot.depth() == 3
    await fetch_one(worker)
    assert await bot.submit(job("c9")) == 3


async def test_position_in_line(harness: Harness) -> None:
    bot = harness.start()
    worker = harness.worker()
    jobs = [job(f"c{i}") for i in range(3)]
    for j in jobs:
        await bot.submit(j)
    assert [await bot.position(j.job_id) for j in jobs] == [1, 2, 3]
    await fetch_one(worker)
    assert [await bot.position(j.job_id) for j in jobs] == [None, 1, 2]
    assert await bot.position("no-such-job") is None


async def test_fairness_per_conversation(harness: Harness) -> None:
    bot = harness.start(queue_max_per_conversation=2)
    worker = harness.worker()
    chatty = [job("chatty") for _ in range(2)]
    for j in chatty:
        await bot.submit(j)
    with pytest.raises(QueueBusy) as info:
        await bot.submit(job("chatty"))
    assert info.value.scope == "conversation" and info.value.depth == 2
    quiet = job("quiet")
    assert await bot.submit(quiet) == 3

    # Superseding: the newest message of the conversation replaces its stale waiting ones.
    newest = job("chatty")
    assert await bot.submit(newest, supersede=True) == 2
    for j in chatty:
        assert [e for _, e in await collect(bot, j.job_id)] == [Done(job_id=j.job_id, finish_reason="superseded")]
    deliveries = await worker.fetch(8, 2000)
    assert [d.job.job_id for d in deliveries] == [quiet.job_id, newest.job_id]


async def test_release_resumes_then_dead_letter(harness: Harness) -> None:
    bot = harness.start(queue_max_deliveries=2)
    worker = harness.worker()
    j = job()
    await bot.submit(j)
    first = await fetch_one(worker)
    await worker.publish(TextDelta(job_id=j.job_id, seq=0, text="Hello"))
    await worker.release(j.job_id)
    assert await bot.position(j.job_id) == 1
    # Released: this worker no longer owns it, its late events are dropped.
    assert await worker.is_cancelled(j.job_id)
    await worker.publish(TextDelta(job_id=j.job_id, seq=1, text=" stale"))

    second = await fetch_one(worker)
    assert (first.attempt, second.attempt) == (1, 2)
    assert (second.resume_text, second.next_seq) == ("Hello", 1)
    await worker.release(j.job_id)

    assert await worker.fetch(4, 500) == []
    events = [e for _, e in await collect(bot, j.job_id)]
    assert events[0] == TextDelta(job_id=j.job_id, seq=0, text="Hello")
    assert isinstance(events[-1], ErrorEvent) and events[-1].kind == "dead_letter"
    assert len(events) == 2
    (dead,) = await bot.dead_letters()  # both queues keep the same record, none of the conversation
    assert (dead.job_id, dead.conversation_key, dead.deliveries, dead.reason) == (
        j.job_id, j.conversation_key, 2, events[-1].message
    )
    assert isinstance(dead, DeadLetter) and "messages" not in dead.model_dump()


async def test_expired_job_is_not_delivered(harness: Harness) -> None:
    bot = harness.start()
    worker = harness.worker()
    j = job(deadline=time.time() + 0.2)
    await bot.submit(j)
    await asyncio.sleep(0.3)
    assert await worker.fetch(4, 0) == []
    assert [e for _, e in await collect(bot, j.job_id)] == [Done(job_id=j.job_id, finish_reason="deadline")]


async def test_stream_gives_up_after_deadline(harness: Harness) -> None:
    bot = harness.start()
    j = job(deadline=time.time() + 0.2)
    await bot.submit(j)
    events = [e for _, e in await collect(bot, j.job_id)]
    assert len(events) == 1 and isinstance(events[0], ErrorEvent) and events[0].kind == "timeout"
    unknown = [e for _, e in await collect(bot, "no-such-job")]
    assert len(unknown) == 1 and isinstance(unknown[0], ErrorEvent) and unknown[0].kind == "unknown_job"


async def test_live_worker_keeps_its_job(harness: Harness) -> None:
    """A job is reclaimed only when its worker is gone, not merely slow."""
    bot = harness.start()
    holder, other = harness.worker(), harness.worker()
    j = job()
    await bot.submit(j)
    await fetch_one(holder)
    stop = time.monotonic() + 4 * CLAIM_IDLE_MS / 1000
    while time.monotonic() < stop:
        assert await other.fetch(4, 50) == []
    assert not await holder.is_cancelled(j.job_id)


async def test_worker_killed_mid_job_is_resumed(harness: Harness) -> None:
    bot = harness.start()
    j = job()
    await bot.submit(j)
    kill, first = await _start_doomed_worker(harness)
    received: list[TextDelta] = []
    final: QueueEvent | None = None
    rescuer: asyncio.Task[Delivery] | None = None
    async with asyncio.timeout(20):
        async for _, event in bot.stream(j.job_id):
            if isinstance(event, TextDelta):
                received.append(event)
            else:
                final = event
            if len(received) == 5 and rescuer is None:
                await kill()
                rescuer = asyncio.create_task(slow_worker(harness.worker(), delay_s=0))
        assert rescuer is not None
        second = await rescuer
    assert [d.seq for d in received] == list(range(TOTAL_PIECES))
    assert "".join(d.text for d in received) == full_text()
    assert final == Done(job_id=j.job_id, finish_reason="stop", completion_tokens=TOTAL_PIECES)
    assert second.attempt == 2 and second.next_seq >= 5
    assert second.resume_text == full_text()[: len(second.resume_text)]
    await first()


async def _start_doomed_worker(harness: Harness) -> tuple[Any, Any]:
    """A slow worker that the test kills: a real process (SIGKILL) on Redis, a task (cancel) in-process."""
    if harness.kind == "memory":
        task = asyncio.create_task(slow_worker(harness.bot, delay_s=0.05))

        async def cancel() -> None:
            task.cancel()

        async def reap_task() -> None:
            with pytest.raises(asyncio.CancelledError):
                await task

        return cancel, reap_task
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.queue_worker_proc", str(harness.redis_url), harness.prefix,
        str(CLAIM_IDLE_MS), "0.05", cwd=ROOT,
    )

    async def sigkill() -> None:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()

    async def reap_proc() -> None:
        assert proc.returncode == -signal.SIGKILL

    return sigkill, reap_proc


async def test_stalled_worker_is_fenced_after_takeover(redis_harness: Harness) -> None:
    """A worker paused past the claim idle time (SIGSTOP) loses its job; when it wakes its output is dropped."""
    h = redis_harness
    bot = h.start()
    j = job()
    await bot.submit(j)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.queue_worker_proc", str(h.redis_url), h.prefix, str(CLAIM_IDLE_MS), "0.05",
        cwd=ROOT,
    )
    try:
        received: list[TextDelta] = []
        rescuer: asyncio.Task[Delivery] | None = None
        async with asyncio.timeout(20):
            async for _, event in bot.stream(j.job_id):
                if isinstance(event, TextDelta):
                    received.append(event)
                if len(received) == 3 and rescuer is None:
                    proc.send_signal(signal.SIGSTOP)
                    rescuer = asyncio.create_task(slow_worker(h.worker(), delay_s=0.02))
                    await asyncio.sleep(3 * CLAIM_IDLE_MS / 1000)
                    proc.send_signal(signal.SIGCONT)
            assert rescuer is not None
            assert (await rescuer).attempt == 2
            assert await proc.wait() == 0  # it noticed it lost the job and stopped cleanly
        assert [d.seq for d in received] == list(range(TOTAL_PIECES))
        assert "".join(d.text for d in received) == full_text()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_scripts_reload_after_redis_forgets_them(redis_harness: Harness, redis_admin: aioredis.Redis) -> None:
    """SCRIPT FLUSH (or a Redis restart) must not break submit, fetch or publish."""
    bot = redis_harness.start()
    worker = redis_harness.worker()
    j = job()
    await redis_admin.script_flush()
    await bot.submit(j)
    await redis_admin.script_flush()
    await fetch_one(worker)
    await redis_admin.script_flush()
    await worker.publish_many([Done(job_id=j.job_id, finish_reason="stop")])
    assert [e for _, e in await collect(bot, j.job_id)] == [Done(job_id=j.job_id, finish_reason="stop")]

    # Flushed while a worker waits with XREAD BLOCK and the read script queued behind it.
    waiting = asyncio.create_task(worker.fetch(4, 3000))
    await asyncio.sleep(0.2)
    await redis_admin.script_flush()
    await bot.submit(second := job())
    async with asyncio.timeout(3):
        assert [d.job.job_id for d in await waiting] == [second.job_id]


async def test_a_redis_restart_does_not_fail_the_first_call_after_it(
    redis_harness: Harness, redis_admin: aioredis.Redis
) -> None:
    """A restart forgets the scripts (even with AOF) and closes every connection: the scripts were loaded
    again on redis-py's pooled connection, closed too, and the first submit, cancel or publish of each
    process after a restart failed with "the Redis queue is unreachable"."""
    bot = redis_harness.start()
    await bot.depth()  # the pooled connection is open, as a worker's watcher keeps it
    await bot.submit(job())
    await redis_admin.script_flush()
    await redis_admin.client_kill_filter(_type="normal", skipme=True)
    assert await bot.submit(job("chan-2")) == 2


async def test_a_reply_whose_job_redis_lost_ends_without_waiting_out_its_deadline(
    redis_harness: Harness, redis_admin: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis lost the job (a restart without persistence, a failover, FLUSHDB): no event will ever come, yet
    the bot waited out the job's deadline (three minutes by default) before telling the user."""
    monkeypatch.setattr(redis_streams, "MAX_BLOCK_MS", 200)  # how long a read waits before it looks
    bot = redis_harness.start()
    worker = redis_harness.worker()
    j = job()
    await bot.submit(j)
    await fetch_one(worker)
    await worker.publish(TextDelta(job_id=j.job_id, seq=0, text="Hello"))
    reading = bot.stream(j.job_id)
    assert (await anext(reading))[1] == TextDelta(job_id=j.job_id, seq=0, text="Hello")
    p = redis_harness.prefix
    await redis_admin.delete(f"{p}:job:{j.job_id}", f"{p}:events:{j.job_id}")
    async with asyncio.timeout(5):
        rest = [event async for _, event in reading]
    assert len(rest) == 1 and isinstance(rest[0], ErrorEvent) and rest[0].kind == "unavailable"


async def test_worker_recovers_when_the_stream_vanishes(redis_harness: Harness, redis_admin: aioredis.Redis) -> None:
    """After a Redis restart without persistence the consumer group is gone; workers recreate it."""
    bot = redis_harness.start()
    worker = redis_harness.worker()
    assert await worker.fetch(4, 0) == []
    await redis_admin.delete(f"{redis_harness.prefix}:jobs")
    j = job()
    await bot.submit(j)
    assert [d.job.job_id for d in await worker.fetch(4, 1000)] == [j.job_id]


async def test_dead_consumers_are_forgotten_once_empty(redis_harness: Harness, redis_admin: aioredis.Redis) -> None:
    h = redis_harness
    bot = h.start(queue_claim_idle_ms=50)  # consumers idle 10 x 50 ms with nothing pending are pruned
    worker = h.worker()
    jobs_key = f"{h.prefix}:jobs"
    assert await worker.fetch(1, 0) == []  # creates the group
    await redis_admin.xgroup_createconsumer(jobs_key, "workers", "ghost-empty")
    await bot.submit(job())
    await redis_admin.xreadgroup("workers", "ghost-holding", {jobs_key: ">"}, count=1)  # died holding a job
    await asyncio.sleep(0.6)
    await redis_admin.xgroup_createconsumer(jobs_key, "workers", "fresh")
    prune_now = h.worker()
    # Prunes the idle empty consumer, then reclaims the job of the one that died holding it.
    assert len(await prune_now.fetch(1, 0)) == 1
    names = {c["name"] for c in await redis_admin.xinfo_consumers(jobs_key, "workers")}
    assert "ghost-empty" not in names
    assert {"ghost-holding", "fresh"} <= names


async def test_unreachable_redis_is_reported() -> None:
    from tests.services import free_port

    queue = RedisStreamsQueue(Settings(queue_url=f"redis://127.0.0.1:{free_port()}/0"))
    try:
        assert not await queue.ping()
        with pytest.raises(QueueUnavailable, match="unreachable"):
            await queue.submit(job())
    finally:
        await queue.close()


async def test_open_queue_picks_transport(redis_url: str) -> None:
    memory = open_queue(Settings(queue_url="memory://"))
    redis_queue = open_queue(Settings(queue_url=redis_url))
    try:
        assert isinstance(memory, MemoryQueue) and isinstance(redis_queue, RedisStreamsQueue)
        assert await memory.ping() and await redis_queue.ping()
    finally:
        await memory.close()
        await redis_queue.close()


def test_busy_text_counts_in_words() -> None:
    assert "1 reply is already waiting" in str(QueueBusy(1, "queue", 1))
    assert "3 replies are already waiting" in str(QueueBusy(3, "queue", 3))
    assert "already has 2 replies on the way (limit 2)" in str(QueueBusy(2, "conversation", 2))
    assert str(QueueBusy(1, "user", 1)).startswith("You already have 1 reply on the way (limit 1).")


async def test_cli_lists_dead_letters_from_redis(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = redis_url.rsplit("/", 1)[0] + "/7"  # a database of its own: other tests' dead letters stay out
    settings = Settings(queue_url=url, queue_max_deliveries=1, queue_claim_idle_ms=CLAIM_IDLE_MS)
    admin = aioredis.from_url(url)
    await admin.flushdb()
    await admin.aclose()
    bot, worker = RedisStreamsQueue(settings), RedisStreamsQueue(settings)
    try:
        dead = job()
        await bot.submit(dead)
        await fetch_one(worker)
        await worker.release(dead.job_id)
        assert await worker.fetch(4, 500) == []  # its one delivery is spent: dead-lettered
    finally:
        await bot.close()
        await worker.close()
    monkeypatch.setenv("HERMES_QUEUE_URL", url)
    assert await asyncio.to_thread(main, ["queue", "dead-letters"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    record = json.loads(line)
    assert (record["job_id"], record["conversation_key"], record["deliveries"]) == (dead.job_id, "chan-1", 1)
    assert "messages" not in record
    with pytest.raises(SystemExit):  # argparse's usage error; XREVRANGE COUNT 0 was a traceback
        main(["queue", "dead-letters", "--count", "0"])
    assert "argument --count: must be at least 1 (got 0)" in capsys.readouterr().err
    monkeypatch.setenv("HERMES_QUEUE_URL", "memory://")
    assert await asyncio.to_thread(main, ["queue", "dead-letters"]) == 2
    assert "keeps its dead letters inside the bot's own process" in capsys.readouterr().err


async def test_a_worker_that_lost_its_job_cannot_publish_into_it(
    redis_harness: Harness, redis_admin: aioredis.Redis
) -> None:
    """Fencing in Redis itself: once the job's attempt moved on (another worker took it over), this
    worker's events are dropped by the PUBLISH script, even if the worker never asks `is_cancelled`."""
    bot = redis_harness.start()
    worker = redis_harness.worker()
    j = job()
    await bot.submit(j)
    await fetch_one(worker)
    await worker.publish(TextDelta(job_id=j.job_id, seq=0, text="mine"))
    await redis_admin.hincrby(f"{redis_harness.prefix}:job:{j.job_id}", "attempt", 1)  # taken over
    await worker.publish(TextDelta(job_id=j.job_id, seq=1, text=" stale"))
    await worker.publish(Done(job_id=j.job_id, finish_reason="stop", prompt_tokens=1, completion_tokens=2))
    seen = []
    async with asyncio.timeout(2):
        async for _, event in bot.stream(j.job_id):
            seen.append(event)
            if len(seen) == 1:
                break
    assert seen == [TextDelta(job_id=j.job_id, seq=0, text="mine")]
    assert await redis_admin.xlen(f"{redis_harness.prefix}:events:{j.job_id}") == 1


async def test_a_published_final_event_acks_the_job_in_redis(
    redis_harness: Harness, redis_admin: aioredis.Redis
) -> None:
    """The PUBLISH script acks and deletes the job's stream entry with its final event, so the worker's
    `complete` after it costs no round trip and no other worker can claim the finished job."""
    bot = redis_harness.start()
    worker = redis_harness.worker()
    j = job()
    await bot.submit(j)
    await fetch_one(worker)
    jobs = f"{redis_harness.prefix}:jobs"
    assert (await redis_admin.xpending(jobs, "workers"))["pending"] == 1
    await worker.publish(Done(job_id=j.job_id, finish_reason="stop", prompt_tokens=1, completion_tokens=2))
    assert (await redis_admin.xpending(jobs, "workers"))["pending"] == 0  # before any `complete`
    assert await redis_admin.xlen(jobs) == 0


async def test_a_fetch_with_almost_no_time_to_wait_still_reads_waiting_jobs(harness: Harness) -> None:
    """1 ms is used up by the look for abandoned jobs; the waiting job must still be read, not missed."""
    bot, worker = harness.start(), harness.worker()
    j = job()
    await bot.submit(j)
    assert [d.job.job_id for d in await worker.fetch(1, 1)] == [j.job_id]


@pytest.fixture
async def cutting_proxy(redis_url: str, redis_admin: aioredis.Redis) -> AsyncIterator[CuttingProxy]:
    """A proxy in front of the test Redis that can lose a reply; the scripts are loaded up front, so
    the first command a test marks is the one that runs (not a NOSCRIPT answer)."""
    for name in ("SUBMIT", "READ", "PUBLISH"):
        await redis_admin.script_load(getattr(redis_lua, name))
    target = urlsplit(redis_url)
    proxy = CuttingProxy(target.hostname or "127.0.0.1", target.port or 6379)
    await proxy.start()
    yield proxy
    await proxy.close()


def through(proxy: CuttingProxy, redis_url: str) -> str:
    return urlsplit(redis_url)._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()


async def test_a_submit_whose_reply_is_lost_is_queued_once(
    redis_harness: Harness, cutting_proxy: CuttingProxy, redis_admin: aioredis.Redis, redis_url: str
) -> None:
    """Redis stored the job but the connection broke before its answer: the resend must not fail as a
    duplicate (the user would see an error for a reply that is coming) nor queue the job twice."""
    bot = redis_harness.start(queue_url=through(cutting_proxy, redis_url))
    j = job()
    cutting_proxy.cut_after(j.job_id.encode())
    assert await bot.submit(j) == 1
    assert cutting_proxy.cuts == 1
    assert await redis_admin.xlen(f"{redis_harness.prefix}:jobs") == 1
    with pytest.raises(ValueError, match="already submitted"):  # a second submit of its own still is one
        await bot.submit(j)


async def test_deltas_whose_publish_reply_is_lost_arrive_once(
    redis_harness: Harness, cutting_proxy: CuttingProxy, redis_url: str
) -> None:
    """The worker's PUBLISH ran but its answer was lost: the resend must not add the deltas again."""
    bot = redis_harness.start(queue_url=through(cutting_proxy, redis_url))
    worker = redis_harness.worker()
    j = job()
    await bot.submit(j)
    await fetch_one(worker)
    cutting_proxy.cut_after(b"first piece")
    await worker.publish_many([
        TextDelta(job_id=j.job_id, seq=0, text="first piece, "), TextDelta(job_id=j.job_id, seq=1, text="second"),
    ])
    assert cutting_proxy.cuts == 1
    await worker.publish_many([TextDelta(job_id=j.job_id, seq=2, text="."), Done(job_id=j.job_id, finish_reason="stop")])
    events = [event for _, event in await collect(bot, j.job_id)]
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["first piece, ", "second", "."]
    assert isinstance(events[-1], Done)


async def test_a_reply_stream_rides_out_a_broken_connection(
    redis_harness: Harness, cutting_proxy: CuttingProxy, redis_url: str
) -> None:
    """The bot's blocking read loses its answer with the connection: it reads again from where it was,
    so the user's reply neither fails nor skips or repeats text."""
    bot = redis_harness.start(queue_url=through(cutting_proxy, redis_url))
    worker = redis_harness.worker()
    j = job()
    await bot.submit(j)
    await fetch_one(worker)
    await worker.publish(TextDelta(job_id=j.job_id, seq=0, text="Hello"))
    cutting_proxy.cut_after(f":events:{j.job_id}".encode())
    reader = asyncio.create_task(collect(bot, j.job_id))
    await eventually(lambda: cutting_proxy.cuts == 1)
    await worker.publish_many([TextDelta(job_id=j.job_id, seq=1, text=" there"), Done(job_id=j.job_id, finish_reason="stop")])
    events = [event for _, event in await reader]
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["Hello", " there"]
    assert isinstance(events[-1], Done)


async def test_a_reply_stream_rides_out_redis_being_unreachable_for_seconds(
    redis_harness: Harness, cutting_proxy: CuttingProxy, redis_url: str
) -> None:
    """A Redis restart longer than one command's resends: the job and its worker go on, so the bot must
    keep reading, not end the user's reply with "can't reply right now" and drop the rest."""
    bot = redis_harness.start(queue_url=through(cutting_proxy, redis_url))
    worker = redis_harness.worker(queue_url=redis_url)  # Redis stays reachable for the worker
    j = job()
    await bot.submit(j)
    await fetch_one(worker)
    await worker.publish(TextDelta(job_id=j.job_id, seq=0, text="Hello"))
    reader = asyncio.create_task(collect(bot, j.job_id))
    await asyncio.sleep(0.2)
    await cutting_proxy.go_down()
    await worker.publish(TextDelta(job_id=j.job_id, seq=1, text=" there"))
    await asyncio.sleep(sum(redis_streams.RETRY_DELAYS_S) + 1.5)
    cutting_proxy.come_back()
    await worker.publish(Done(job_id=j.job_id, finish_reason="stop"))
    events = [event for _, event in await reader]
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["Hello", " there"]
    assert isinstance(events[-1], Done)


async def test_a_reply_stream_ends_when_its_queue_closes(redis_harness: Harness) -> None:
    """Riding out an outage must not outlive close(): the bot's shutdown would leave readers going on
    new connections close() never sees."""
    bot = redis_harness.start()
    worker = redis_harness.worker()
    j = job()
    await bot.submit(j)
    await fetch_one(worker)
    reader = asyncio.create_task(collect(bot, j.job_id))
    await asyncio.sleep(0.2)
    await bot.close()
    with pytest.raises(QueueUnavailable):
        async with asyncio.timeout(2):
            await reader


async def test_a_worker_whose_heartbeats_stalled_does_not_take_its_own_job_again(redis_harness: Harness) -> None:
    """A worker paused past the claim idle time, with nobody else around, finds its own job idle: taking
    it as a new delivery would run it twice at once, both runs unfenced."""
    bot = redis_harness.start()
    worker = redis_harness.worker()
    j = job()
    await bot.submit(j)
    assert (await fetch_one(worker)).attempt == 1
    time.sleep(2 * CLAIM_IDLE_MS / 1000)  # noqa: ASYNC251 - the event loop stalls: no heartbeat
    assert await worker.fetch(1, 0) == []
    assert not await worker.is_cancelled(j.job_id)  # still its job, still attempt 1
    await worker.publish_many([TextDelta(job_id=j.job_id, seq=0, text="one run"), Done(job_id=j.job_id, finish_reason="stop")])
    events = [event for _, event in await collect(bot, j.job_id)]
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["one run"] and isinstance(events[-1], Done)


async def test_an_answer_about_an_older_attempt_does_not_drop_the_newer_one(
    redis_harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A heartbeat built while attempt 1 was held is answered (resent across a Redis restart) after this
    worker got attempt 2 of the job: its "lost" is about attempt 1 and must leave attempt 2 held."""
    bot = redis_harness.start()
    worker = redis_harness.worker()
    assert isinstance(worker, RedisStreamsQueue)
    j = job()
    await bot.submit(j)
    await fetch_one(worker)
    run = worker._run
    redelivered: list[Delivery] = []

    async def redelivered_meanwhile(name: str, *args: Any) -> Any:
        if name == "HEARTBEAT" and not redelivered:
            await worker.release(j.job_id)
            redelivered.append(await fetch_one(worker))
        return await run(name, *args)

    monkeypatch.setattr(worker, "_run", redelivered_meanwhile)
    await eventually(lambda: redelivered)
    await asyncio.sleep(CLAIM_IDLE_MS / 1000)  # the late answer and a beat or two more
    assert redelivered[0].attempt == 2 and not await worker.is_cancelled(j.job_id)
    await worker.publish(Done(job_id=j.job_id, finish_reason="stop"))
    assert isinstance((await collect(bot, j.job_id))[-1][1], Done)


async def test_a_waiting_job_that_expired_no_longer_holds_its_conversation(
    redis_harness: Harness, redis_admin: aioredis.Redis
) -> None:
    """With every worker down past a job's TTL its hash expires, but the conversation's line kept its id:
    the conversation was refused ("already waiting") for good, and a superseding submit failed in Lua."""
    bot = redis_harness.start(queue_max_per_conversation=1)
    stale = job("chan-9")
    await bot.submit(stale)
    await redis_admin.delete(f"{redis_harness.prefix}:job:{stale.job_id}")  # what its TTL does
    assert await bot.submit(job("chan-9")) == 1
    assert await bot.submit(job("chan-9"), supersede=True) == 1


async def test_waiting_jobs_past_their_deadline_no_longer_hold_places_in_line(harness: Harness) -> None:
    """No worker was free before two jobs' deadline: the bot gave up on them, yet they kept their places in
    line (their conversation's, the queue's) until a worker came by, and the user's next message was refused
    with "This conversation already has 2 replies on the way"."""
    bot = harness.start(queue_max_per_conversation=2, queue_max_waiting=4)
    worker = harness.worker()
    handed_back = job("chan-4", deadline=time.time() + 0.2)  # back in line: its worker released it
    await bot.submit(handed_back)
    await fetch_one(worker)
    await worker.release(handed_back.job_id)
    late = [job(deadline=time.time() + 0.2) for _ in range(2)]
    for j in late:
        await bot.submit(j)
    await bot.submit(job("chan-2"))
    for j in late:
        assert [e.type for _, e in await collect(bot, j.job_id)] == ["error"]  # the bot gave up on it
    assert await bot.submit(job()) == 2  # the conversation had no place left
    assert await bot.submit(job("chan-3")) == 3  # nor, after this, would the queue have had
    assert await bot.depth() == 3
    assert [await bot.position(j.job_id) for j in (handed_back, *late)] == [None, None, None]
    assert [d.job.conversation_key for d in await worker.fetch(4, 0)] == ["chan-2", "chan-1", "chan-3"]


async def test_conversation_lines_do_not_outlive_jobs_that_expired_unread(
    redis_harness: Harness, redis_admin: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs that waited past their TTL (every worker down) left their conversations' lines behind for good,
    without a TTL: the expired hash was what named the conversation when a worker passed the job over."""
    monkeypatch.setattr(redis_streams, "EVENTS_TTL_S", 0)
    bot = redis_harness.start(job_timeout_s=1)  # jobs' keys live 1 s
    worker = redis_harness.worker()
    p = redis_harness.prefix
    for n in range(5):
        await bot.submit(job(f"chan-{n}"))

    async def expired() -> bool:
        return not await redis_admin.keys(f"{p}:job:*")

    await eventually(expired)
    assert await worker.fetch(8, 0) == []  # a worker comes back and passes them over
    assert (await bot.depth(), await redis_admin.xlen(f"{p}:jobs")) == (0, 0)
    assert await redis_admin.keys(f"{p}:conv:*") == []


async def test_a_dead_letter_keeps_what_an_operator_needs_and_nothing_of_the_conversation(
    redis_harness: Harness, redis_admin: aioredis.Redis
) -> None:
    """Dead letters held the whole job: the users' messages (about 20 KB a job, out of reach of
    /forget-me) and stop strings naming the participants."""
    bot = redis_harness.start(queue_max_deliveries=1)
    worker = redis_harness.worker()
    secret = "my new address is 12 Quiet Lane"
    j = GenerationJob(
        conversation_key="dm/c42", persona_id="hermes", messages=[{"role": "user", "content": secret}],
        stop=["\nMallory:"],
    )
    await bot.submit(j)
    await fetch_one(worker)
    await worker.release(j.job_id)
    assert await worker.fetch(4, 500) == []  # its one delivery is spent: dead-lettered
    ((entry_id, fields),) = await redis_admin.xrange(f"{redis_harness.prefix}:dead")
    assert not [value for value in fields.values() if secret in value or "Mallory" in value]
    (dead,) = await bot.dead_letters()
    assert isinstance(dead, DeadLetter)
    assert (dead.job_id, dead.conversation_key, dead.persona_id, dead.created_at, dead.deliveries, dead.reason) == (
        j.job_id, "dm/c42", "hermes", j.created_at, 1, dead_letter_message(1)
    )
    assert dead.dead_at == int(entry_id.split("-")[0]) / 1000
    assert set(json.loads(dead.model_dump_json())) == {
        "job_id", "conversation_key", "persona_id", "created_at", "deliveries", "reason", "dead_at"
    }


async def test_a_dead_letter_an_older_worker_wrote_is_read_without_its_messages(
    redis_harness: Harness, redis_admin: aioredis.Redis
) -> None:
    """Entries from before hold the whole job (an older worker may still write them during an upgrade): read
    without their messages, and erased by a worker when it starts (the cap alone would keep them for years)."""
    bot = redis_harness.start()
    j = job("dm/c42")
    await redis_admin.xadd(f"{redis_harness.prefix}:dead", {"id": j.job_id, "deliveries": 3, "job": j.model_dump_json()})
    (dead,) = await bot.dead_letters()
    assert (dead.job_id, dead.conversation_key, dead.deliveries, dead.reason) == (
        j.job_id, "dm/c42", 3, dead_letter_message(3)
    )
    assert "messages" not in json.loads(dead.model_dump_json())
    await redis_harness.worker().fetch(1, 10)  # a worker starts taking jobs
    assert await bot.dead_letters() == []


class NewerBotJob(GenerationJob):
    """A job as a newer bot writes it: a sampling field this worker's schema does not know."""

    def model_dump_json(self, **kwargs: Any) -> str:
        data = json.loads(super().model_dump_json(**kwargs))
        data["sampling"]["min_p"] = 0.05
        return json.dumps(data)


async def test_a_job_the_worker_cannot_read_ends_with_an_error_and_does_not_hold_up_the_others(
    redis_harness: Harness,
) -> None:
    """It used to fail the whole fetch: the job read with it stayed taken by nobody, and both were
    taken again and again until they were dead letters."""
    bot = redis_harness.start()
    worker = redis_harness.worker()
    newer = NewerBotJob(conversation_key="chan-1", persona_id="hermes", messages=[{"role": "user", "content": "hi"}])
    good = job("chan-2")
    await bot.submit(newer)
    await bot.submit(good)
    deliveries = await worker.fetch(8, 2000)
    assert [(d.job.job_id, d.attempt) for d in deliveries] == [(good.job_id, 1)]
    (_, last), = (await collect(bot, newer.job_id))[-1:]
    assert isinstance(last, ErrorEvent) and last.kind == "invalid_job" and "sampling.min_p" in last.message
    await worker.publish(Done(job_id=good.job_id, finish_reason="stop"))
    assert isinstance((await collect(bot, good.job_id))[-1][1], Done)


async def test_a_job_whose_resume_point_cannot_be_read_does_not_strand_the_others(
    redis_harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    bot = redis_harness.start()
    worker = redis_harness.worker()
    unlucky, other = job("chan-1"), job("chan-2")
    for j in (unlucky, other):
        await bot.submit(j)
    for delivery in await worker.fetch(8, 2000):
        await worker.release(delivery.job.job_id)  # taken again, their resume point is read
    real_resume_point = worker._resume_point  # type: ignore[attr-defined]

    async def flaky(job_id: str) -> tuple[str, int]:
        if job_id == unlucky.job_id:
            raise ConnectionError("Redis went away for a moment")
        return await real_resume_point(job_id)

    monkeypatch.setattr(worker, "_resume_point", flaky)
    deliveries = await worker.fetch(8, 2000)
    assert [(d.job.job_id, d.attempt) for d in deliveries] == [(other.job_id, 2)]
    assert unlucky.job_id not in worker._inflight  # type: ignore[attr-defined]  # nobody heartbeats it: taken over later


async def test_a_heartbeat_answered_with_an_error_keeps_beating(
    redis_harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failover answers READONLY for a moment: the heartbeat must go on, or after the claim idle time
    other workers take over every job this live worker holds (and it would write them twice)."""
    bot, worker = redis_harness.start(), redis_harness.worker()
    assert isinstance(worker, RedisStreamsQueue)
    j = job()
    await bot.submit(j)
    await fetch_one(worker)
    run, refused = worker._run, asyncio.Event()

    async def readonly_once(name: str, *args: object) -> Any:
        if name == "HEARTBEAT" and not refused.is_set():
            refused.set()
            raise ReadOnlyError("You can't write against a read only replica.")
        return await run(name, *args)

    monkeypatch.setattr(worker, "_run", readonly_once)
    await asyncio.wait_for(refused.wait(), 5)
    other = redis_harness.worker()
    for _ in range(12):  # short fetches, each looking for abandoned jobs, well past the claim idle time
        assert await other.fetch(1, CLAIM_IDLE_MS // 3) == []


async def test_a_queue_closed_while_waiting_to_resend_sends_nothing_more(
    redis_harness: Harness, cutting_proxy: CuttingProxy, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() during the pause before a resend: the resend must not open a connection close() has no
    way to see, nor run the command after the queue was closed."""
    monkeypatch.setattr(redis_streams, "RETRY_DELAYS_S", (0.5,))
    bot = redis_harness.start(queue_url=through(cutting_proxy, redis_url))
    j = job()
    cutting_proxy.cut_after(j.job_id.encode())
    submitting = asyncio.create_task(bot.submit(j))
    await eventually(lambda: cutting_proxy.cuts == 1)
    await bot.close()
    with pytest.raises(QueueUnavailable):
        await submitting
    assert isinstance(bot, RedisStreamsQueue) and not bot._direct_conns and not bot._idle


async def test_jobs_taken_by_a_read_whose_reply_was_lost_are_still_delivered(
    redis_harness: Harness, cutting_proxy: CuttingProxy, redis_url: str
) -> None:
    """READ ran and took the job, its reply was lost, and the resent READ finds nothing new: the job must
    still reach this worker now, not after the claim idle time (30 s by default)."""
    redis_harness.start(queue_url=through(cutting_proxy, redis_url), queue_claim_idle_ms=60_000)
    bot, worker = redis_harness.bot, redis_harness.worker()
    assert isinstance(worker, RedisStreamsQueue)
    j = job()
    await bot.submit(j)
    cutting_proxy.cut_after(worker._scripts["READ"].sha.encode())
    deliveries = await worker.fetch(1, 1000)
    assert cutting_proxy.cuts == 1
    assert [d.job.job_id for d in deliveries] == [j.job_id]


async def test_connections_a_burst_of_replies_opened_are_closed_once_idle(
    redis_harness: Harness, redis_admin: aioredis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each reply streaming at once reads on its own connection; after the burst they must not stay
    open for the life of the process (managed Redis limits clients, the process its files)."""
    monkeypatch.setattr(redis_streams, "IDLE_CONNECTION_S", 0.5)
    name = f"idle-{uuid.uuid4().hex[:8]}"
    bot = redis_harness.start(queue_url=f"{redis_url}?client_name={name}")
    worker = redis_harness.worker(queue_url=redis_url)

    async def bot_connections() -> int:
        return sum(client["name"] == name for client in await redis_admin.client_list())

    burst = [job(f"chan-{i}") for i in range(12)]
    for j in burst:
        await bot.submit(j)
    assert len(await worker.fetch(len(burst), 2000)) == len(burst)
    readers = [asyncio.create_task(collect(bot, j.job_id)) for j in burst]
    await asyncio.sleep(0.3)
    assert await bot_connections() >= len(burst)
    await worker.publish_many([Done(job_id=j.job_id, finish_reason="stop") for j in burst])
    await asyncio.gather(*readers)
    await asyncio.sleep(0.6)
    later = job("chan-later")  # the next reply, after the burst went idle
    await bot.submit(later)
    await fetch_one(worker)
    await worker.publish(Done(job_id=later.job_id, finish_reason="stop"))
    await collect(bot, later.job_id)
    assert await bot_connections() <= 3


async def test_closing_idle_connections_never_fails_a_call(
    redis_harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closing the stale ones awaited while another caller took the last idle connection: the call whose
    connection went back to the list then failed with IndexError after Redis had carried it out."""
    monkeypatch.setattr(redis_streams, "IDLE_CONNECTION_S", 0.005)
    bot = redis_harness.start(queue_max_waiting=1000, queue_max_per_conversation=100)
    failures: list[BaseException] = []

    async def caller(n: int) -> None:
        for i in range(15):
            try:
                j = job(f"chan-{n}")
                await bot.submit(j)
                await bot.cancel(j.job_id)
            except Exception as exc:
                failures.append(exc)
            await asyncio.sleep(0.003 * (i % 3))

    await asyncio.gather(*(caller(n) for n in range(16)))
    assert failures == []
