"""Redis Streams transport: bots and workers in separate processes (see redis_lua.py for the keys).

Jobs go through one stream read by the consumer group "workers" (XREADGROUP COUNT n, so a worker
can batch). A job stays pending until its worker acks it on completion. While a worker process
lives, a heartbeat re-claims its pending jobs every claim_idle/3; when it dies, they go idle and
another worker takes them with XAUTOCLAIM, resuming from the events already published. Events
come back on a per-job stream (resumable by id, unlike pub/sub) that expires after the job.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Collection, Iterator, Sequence
from typing import Any

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bot.config import Settings
from bot.queue import redis_lua
from bot.queue.base import (
    DEADLINE_GRACE_S,
    Delivery,
    JobQueue,
    QueueBusy,
    QueueEvent,
    QueueUnavailable,
    dead_letter_message,
    resume_point,
)
from bot.queue.jobs import (
    DeadLetter,
    ErrorEvent,
    GenerationJob,
    TextDelta,
    event_from_json,
    event_to_json,
    is_final,
)

log = logging.getLogger(__name__)

GROUP = "workers"
DEFAULT_PREFIX = "hermes:queue"
# Finished jobs keep their events this long, so a late or reconnecting reader still sees them.
EVENTS_TTL_S = 300
# Longest single blocking read: well under redis-py's 5 s socket timeout, and short enough that a
# waiting worker still looks for abandoned jobs now and then.
MAX_BLOCK_MS = 2000
MAX_REMEMBERED_DEADLINES = 10_000
# Consumers of dead workers are forgotten once they hold nothing and were idle this many claim idle times.
PRUNE_AFTER_IDLES = 10
PENDING_SCAN = 1000  # this consumer's pending entries looked at after a lost READ reply (it holds fewer)
# Pauses before each resend of a direct exchange whose connection broke (see _direct): long enough
# together to ride out a Redis restart or failover, short enough that a user's reply waits little.
RETRY_DELAYS_S = (0.05, 0.5, 2.0)
# A reply being read keeps trying this long while Redis is unreachable (a restart, a slow failover):
# the job stays queued and its worker goes on, so giving up at once would lose a reply in progress.
STREAM_OUTAGE_S = 30.0
STREAM_RETRY_S = 1.0
OLD_DEAD_LETTERS = 10_000  # the most dead letters the older format kept (MAXLEN ~ 10000)
# A per-job connection left idle this long is closed: replies streaming at once take one each.
IDLE_CONNECTION_S = 60.0


def _dead_letter(entry_id: str, fields: dict[str, str]) -> DeadLetter:
    """One entry of the dead letter stream. An older worker wrote the whole job instead (and may still,
    during an upgrade): that is read without its messages all the same."""
    deliveries = int(fields["deliveries"])
    if "job" in fields:
        job = GenerationJob.model_validate_json(fields["job"])
        conversation, persona, created_at = job.conversation_key, job.persona_id, job.created_at
        reason = dead_letter_message(deliveries)
    else:
        conversation, persona, created_at = fields["conv"], fields["persona"], float(fields["created_at"])
        reason = fields["reason"]
    return DeadLetter(
        job_id=fields["id"], conversation_key=conversation, persona_id=persona, created_at=created_at,
        deliveries=deliveries, reason=reason, dead_at=int(entry_id.split("-")[0]) / 1000,  # the entry id's ms
    )


@contextlib.contextmanager
def _available() -> Iterator[None]:
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise QueueUnavailable(f"the Redis queue is unreachable: {exc}") from exc


class RedisStreamsQueue(JobQueue):
    def __init__(
        self, settings: Settings, *, prefix: str = DEFAULT_PREFIX, deadline_grace_s: float = DEADLINE_GRACE_S
    ) -> None:
        self._redis: aioredis.Redis = aioredis.from_url(settings.queue_url, decode_responses=True)
        self._p = prefix
        self._grace_s = deadline_grace_s
        self._jobs_key = f"{prefix}:jobs"
        self._max_waiting = settings.queue_max_waiting
        self._max_per_conversation = settings.queue_max_per_conversation
        self._max_deliveries = settings.queue_max_deliveries
        self._job_timeout_s = settings.job_timeout_s
        self._claim_idle_ms = settings.queue_claim_idle_ms
        self._ttl = int(settings.job_timeout_s) + EVENTS_TTL_S
        self._consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._scripts = {
            name: self._redis.register_script(getattr(redis_lua, name))
            for name in ("SUBMIT", "CANCEL", "TAKE", "READ", "PUBLISH", "COMPLETE", "RELEASE", "HEARTBEAT", "PRUNE")
        }
        # Bot side: deadlines of jobs submitted here and not streamed yet (saves stream() a round trip).
        self._deadlines: dict[str, float] = {}
        # Worker side: job id -> (stream entry id, attempt) of the jobs this object holds; a job
        # missing here (done, released, or taken over by another worker) reads as cancelled.
        self._inflight: dict[str, tuple[str, int]] = {}
        self._group_ready = False
        self._next_reclaim = 0.0
        self._next_prune = 0.0
        self._last_read = "0-0"  # the group's last delivered id: a waiting XREAD BLOCK starts after it
        self._heartbeat: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._resends = 0  # exchanges sent again after a broken connection (see _read_new)
        # Connections of the per-job commands (see _direct): idle ones with when they were last
        # returned (oldest first), and all of them for close().
        self._idle: collections.deque[tuple[AbstractConnection, float]] = collections.deque()
        self._direct_conns: set[AbstractConnection] = set()
        # redis-py's socket timeout (its default unless the URL sets one), applied by _direct per exchange.
        self._io_timeout_s: float | None = self._redis.connection_pool.make_connection().socket_timeout

    async def _direct(self, *commands: tuple[object, ...], block_ms: int = 0) -> list[Any]:
        """Send `commands` in one write on a connection of this queue's own and read every reply;
        when the connection breaks, send them again on a new one after each of RETRY_DELAYS_S.

        The commands on a job's way (the scripts, the bot's and the waiting worker's blocking reads)
        go straight to a connection, past redis-py's per-command layers (pool lock, retry,
        observability, pipeline bookkeeping, and a task per write for the socket timeout, which
        delays the write to the next loop turn): together they cost more than the Redis work.
        A broken connection may have lost only the reply, so every script can run twice without harm
        (redis_lua.py: SUBMIT's nonce, PUBLISH's next seq; the others are fenced or idempotent). Two
        resends cost something: a resent TAKE counts a delivery twice, and a resent READ reads only
        newer jobs (`_read_new` then takes the ones the lost reply carried from this consumer's
        pending list, counting their delivery twice). A timeout is not retried:
        Redis is there but not answering, and waiting again would only double the wait.
        """
        for delay in RETRY_DELAYS_S:
            try:
                return await self._exchange(commands, block_ms)
            except (RedisConnectionError, OSError) as exc:
                if self._closing.is_set():
                    raise
                log.info("Redis connection broke (%s); sending again in %.2f s", exc, delay)
                error = exc
                self._resends += 1
            await asyncio.sleep(delay)
            if self._closing.is_set():  # closed meanwhile: no new connection that close() would not see
                raise error
        return await self._exchange(commands, block_ms)

    async def _exchange(self, commands: tuple[tuple[object, ...], ...], block_ms: int) -> list[Any]:
        """One write of `commands` and their replies. An idle connection is reused; each concurrent
        caller gets its own. One timeout covers the whole exchange (the socket timeout, plus block_ms
        for a blocking read). An error reply is raised once all replies are read, so the connection
        stays in step."""
        conn = self._idle.pop()[0] if self._idle else self._new_direct()
        try:
            async with asyncio.timeout(None if self._io_timeout_s is None else self._io_timeout_s + block_ms / 1000):
                if not conn.is_connected:
                    await conn.connect()
                elif await conn.can_read():  # closed by the server, or out of step: start afresh
                    await conn.disconnect()
                    await conn.connect()
                await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
                replies: list[Any] = []
                for _ in commands:
                    try:
                        replies.append(await conn.read_response())
                    except ResponseError as exc:
                        replies.append(exc)
        except BaseException as exc:
            self._direct_conns.discard(conn)
            await conn.disconnect(nowait=True)
            if isinstance(exc, TimeoutError):
                raise RedisTimeoutError(f"Redis did not answer within {self._io_timeout_s} s") from exc
            raise
        await self._keep_idle(conn)
        for reply in replies:
            if isinstance(reply, ResponseError):
                raise reply
        return replies

    async def _keep_idle(self, conn: AbstractConnection) -> None:
        """Return `conn` for reuse, closing those idle past IDLE_CONNECTION_S: a burst of replies
        streaming at once opens one connection each, which would otherwise stay open for good."""
        now = time.monotonic()
        stale: list[AbstractConnection] = []
        if self._closing.is_set():  # close() has let go of the idle list already
            stale.append(conn)
        else:
            self._idle.append((conn, now))
        # Taken off the list before any await: another caller may take an idle connection meanwhile.
        while self._idle and now - self._idle[0][1] > IDLE_CONNECTION_S:
            stale.append(self._idle.popleft()[0])
        for old in stale:
            self._direct_conns.discard(old)
            with contextlib.suppress(RedisConnectionError, OSError):
                await old.disconnect(nowait=True)

    def _new_direct(self) -> AbstractConnection:
        pool = self._redis.connection_pool
        # No socket timeout of its own (its writes then go out at once): _direct times the exchange.
        conn = pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None})
        self._direct_conns.add(conn)
        return conn

    def _evalsha(self, name: str, *args: object) -> tuple[object, ...]:
        return ("EVALSHA", self._scripts[name].sha, 0, self._p, *args)

    async def _run(self, name: str, *args: object) -> Any:
        return (await self._direct_scripts(self._evalsha(name, *args)))[-1]

    async def _direct_scripts(self, *commands: tuple[object, ...], block_ms: int = 0) -> list[Any]:
        """_direct for commands that call scripts by EVALSHA; loads them once if Redis forgot them (a restart
        forgets them even with AOF). The load goes through _direct too: the restart also closed the pooled
        connections, and one that failed here would fail the call Redis is back for."""
        try:
            return await self._direct(*commands, block_ms=block_ms)
        except NoScriptError:
            await self._direct(*(("SCRIPT", "LOAD", script.script) for script in self._scripts.values()))
        return await self._direct(*commands, block_ms=block_ms)

    # ----- bot side -----

    async def submit(self, job: GenerationJob, *, supersede: bool = False) -> int:
        if job.deadline is None:
            job.deadline = job.created_at + self._job_timeout_s
        with _available():
            result, count = await self._run(
                "SUBMIT", job.job_id, job.conversation_key, job.model_dump_json(), self._max_waiting,
                self._max_per_conversation, int(supersede), self._ttl, repr(job.deadline), uuid.uuid4().hex,
            )
        if result == -1:
            raise QueueBusy(count, "queue", self._max_waiting)
        if result == -2:
            raise QueueBusy(count, "conversation", self._max_per_conversation)
        if result == -3:
            raise ValueError(f"job {job.job_id} was already submitted")
        self._deadlines[job.job_id] = job.deadline
        if len(self._deadlines) > MAX_REMEMBERED_DEADLINES:
            del self._deadlines[next(iter(self._deadlines))]
        return int(result)

    async def stream(self, job_id: str, *, after: str | None = None) -> AsyncIterator[tuple[str, QueueEvent]]:
        deadline: float | str | None = self._deadlines.pop(job_id, None)
        if deadline is None:  # not submitted through this object: ask Redis
            with _available():
                deadline, exists = await self._redis.pipeline(transaction=False).hget(
                    f"{self._p}:job:{job_id}", "deadline"
                ).exists(f"{self._p}:events:{job_id}").execute()
            if deadline is None and not exists:
                yield "", ErrorEvent(job_id=job_id, kind="unknown_job", message="this reply is no longer available")
                return
        give_up = float(deadline or time.time()) + self._grace_s
        last = after or "0-0"
        outage_began: float | None = None
        check = False  # next read also asks whether Redis still has the job (see _read_events)
        while True:
            block_ms = int((give_up - time.time()) * 1000)
            if block_ms <= 0:
                yield "", ErrorEvent(job_id=job_id, kind="timeout", message="no reply arrived in time")
                return
            block_ms = min(block_ms, MAX_BLOCK_MS)
            resends = self._resends
            try:
                with _available():
                    events, exists = await self._read_events(job_id, last, block_ms, check=check)
            except QueueUnavailable as exc:
                outage_began = outage_began or time.monotonic()
                if self._closing.is_set() or time.monotonic() - outage_began >= STREAM_OUTAGE_S:
                    raise
                log.warning("reading reply %s: %s; trying again", job_id, exc)
                await asyncio.sleep(STREAM_RETRY_S)
                check = True
                continue
            outage_began = None
            for event_id, event in events:
                last = event_id
                yield event_id, event
                if is_final(event):
                    return
            if not exists:
                yield "", ErrorEvent(job_id=job_id, kind="unavailable",
                                     message="the queue lost this reply (Redis restarted or failed over)")
                return
            # Checked after a read that waited for nothing or rode out a broken connection: a round trip now
            # and then, not one per event.
            check = not check and (not events or self._resends != resends)

    async def _read_events(
        self, job_id: str, last: str, block_ms: int, *, check: bool
    ) -> tuple[list[tuple[str, QueueEvent]], bool]:
        """The job's events after `last`, waiting up to block_ms for the first, and True; with `check`, the
        events already there (no wait) and whether Redis still has the job. It may have lost it (a restart
        without persistence, a failover, FLUSHDB): then no event will ever come, and the bot would wait
        out the deadline (three minutes by default) for nothing."""
        key = f"{self._p}:events:{job_id}"
        if check:
            exists, reply = await self._direct(
                ("EXISTS", f"{self._p}:job:{job_id}"), ("XREAD", "COUNT", 256, "STREAMS", key, last)
            )
        else:
            exists = 1
            reply, = await self._direct(("XREAD", "COUNT", 256, "BLOCK", block_ms, "STREAMS", key, last),
                                        block_ms=block_ms)
        if not reply:
            return [], bool(exists)
        # RESP3 (redis-py's default) answers {key: entries}, RESP2 [[key, entries]].
        entries = reply[key] if isinstance(reply, dict) else reply[0][1]
        events = [(event_id, event_from_json(fields[fields.index("e") + 1])) for event_id, fields in entries]
        return events, bool(exists)

    async def cancel(self, job_id: str) -> None:
        with _available():
            await self._run("CANCEL", job_id, self._ttl)

    async def depth(self) -> int:
        with _available():
            return int(await self._redis.zcard(f"{self._p}:waiting"))

    async def position(self, job_id: str) -> int | None:
        with _available():
            rank = await self._redis.zrank(f"{self._p}:waiting", job_id)
        return None if rank is None else int(rank) + 1

    # ----- worker side -----

    async def fetch(self, max_jobs: int, block_ms: int) -> list[Delivery]:
        try:
            return await self._fetch(max_jobs, block_ms)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The stream or its group vanished (Redis restarted without persistence, or was flushed).
            self._group_ready = False
            self._last_read = "0-0"
            return await self._fetch(max_jobs, block_ms)

    async def _fetch(self, max_jobs: int, block_ms: int) -> list[Delivery]:
        give_up = time.monotonic() + block_ms / 1000
        with _available():
            await self._ensure_group()
            deliveries = await self._take(await self._reclaim(max_jobs))
            # A waiting read below returns at once when jobs are already there: no separate look first,
            # unless no time is left to wait in (the reclaim took it all).
            no_time_left = int((give_up - time.monotonic()) * 1000) <= 0
            if len(deliveries) < max_jobs and (deliveries or no_time_left):
                deliveries += await self._read_new(max_jobs - len(deliveries), wait_ms=0)
            while not deliveries and (wait_ms := int((give_up - time.monotonic()) * 1000)) > 0:
                deliveries = await self._take(await self._reclaim(max_jobs))
                if not deliveries:
                    deliveries = await self._read_new(max_jobs, wait_ms=min(wait_ms, MAX_BLOCK_MS))
        if self._inflight and self._heartbeat is None:
            self._heartbeat = asyncio.create_task(self._beat(), name="queue-heartbeat")
        return deliveries

    async def _read_new(self, count: int, *, wait_ms: int) -> list[Delivery]:
        """New jobs, read and taken by one script; with wait_ms, an XREAD BLOCK pipelined before it
        waits for the next job, so a waiting worker gets it in one round trip."""
        read = self._evalsha("READ", self._max_deliveries, self._ttl, dead_letter_message(self._max_deliveries),
                             self._consumer, count)
        resends = self._resends
        if wait_ms > 0:
            wait = ("XREAD", "COUNT", 1, "BLOCK", wait_ms, "STREAMS", self._jobs_key, self._last_read)
            reply = (await self._direct_scripts(wait, read, block_ms=wait_ms))[-1]
        else:
            reply = (await self._direct_scripts(read))[-1]
        self._last_read = reply[0] or self._last_read
        delivered = await self._deliver_each(
            [(reply[i], reply[i + 1], reply[i + 2], int(reply[i + 3])) for i in range(1, len(reply), 4)]
        )
        if self._resends != resends:  # a READ whose reply was lost may have taken jobs: they are ours
            delivered += await self._take(await self._unknown_pending())
        return delivered

    async def _unknown_pending(self) -> list[tuple[str, dict[str, str]]]:
        """Entries pending for this consumer that it does not hold: taken by a READ whose reply was
        lost. Without this they would wait out the claim idle time, like a dead worker's."""
        held = {entry for entry, _ in self._inflight.values()}
        pending = await self._redis.xpending_range(
            self._jobs_key, GROUP, min="-", max="+", count=PENDING_SCAN, consumername=self._consumer
        )
        lost = [p["message_id"] for p in pending if p["message_id"] not in held]
        if not lost:
            return []
        claimed = await self._redis.xclaim(self._jobs_key, GROUP, self._consumer, 0, lost)
        return [(entry_id, fields) for entry_id, fields in claimed if fields]

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            # Id 0: jobs submitted before the first worker ever started are read too.
            await self._redis.xgroup_create(self._jobs_key, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        await self._erase_dead_letters_with_messages()
        self._group_ready = True

    async def _erase_dead_letters_with_messages(self) -> None:
        """Dead letters from before they were kept without the conversation hold its messages (users' text
        that /forget-me cannot reach there): each worker erases them once at start, also those an older
        worker wrote during a rolling upgrade before it was replaced."""
        dead = f"{self._p}:dead"
        old = [entry_id for entry_id, fields in await self._redis.xrange(dead, count=OLD_DEAD_LETTERS) if "job" in fields]
        if old:
            await self._redis.xdel(dead, *old)
            log.info("erased %d dead letters that held their conversation's messages", len(old))

    async def _reclaim(self, max_jobs: int) -> list[tuple[str, dict[str, str]]]:
        """Jobs whose worker stopped heartbeating (or released them), at most every claim_idle/4;
        now and then also forgets the consumers of dead workers."""
        now = time.monotonic()
        if now < self._next_reclaim:
            return []
        self._next_reclaim = now + self._claim_idle_ms / 4000
        if now >= self._next_prune:
            self._next_prune = now + self._claim_idle_ms * PRUNE_AFTER_IDLES / 1000
            await self._run("PRUNE", self._claim_idle_ms * PRUNE_AFTER_IDLES)
        claimed: list[tuple[str, dict[str, str]]] = []
        cursor = "0-0"
        while len(claimed) < max_jobs:
            held = {entry for entry, _ in self._inflight.values()}
            cursor, entries, *_ = await self._redis.xautoclaim(
                self._jobs_key, GROUP, self._consumer, self._claim_idle_ms, cursor, count=max_jobs - len(claimed)
            )
            # An entry this worker still holds went idle because its heartbeats stalled (a paused process,
            # Redis unreachable): claiming it back counts as a heartbeat, not as a new delivery, which
            # would run the job twice at once, unfenced.
            claimed += [(entry_id, fields) for entry_id, fields in entries if fields and entry_id not in held]
            if cursor == "0-0":
                break
        return claimed

    async def _take(self, entries: list[tuple[str, dict[str, str]]]) -> list[Delivery]:
        """Deliver reclaimed entries (or finish them: cancelled, expired, dead letter)."""
        if not entries:
            return []
        triples = [value for entry_id, fields in entries for value in (fields["id"], entry_id, fields["job"])]
        attempts = await self._run("TAKE", self._max_deliveries, self._ttl,
                                   dead_letter_message(self._max_deliveries), *triples)
        return await self._deliver_each([
            (fields["id"], entry_id, fields["job"], int(attempt))
            for (entry_id, fields), attempt in zip(entries, attempts, strict=True)
            if attempt
        ])

    async def _deliver_each(self, taken: list[tuple[str, str, str, int]]) -> list[Delivery]:
        """Deliveries for (job id, entry id, job json, attempt) the scripts took, each on its own: a job that
        fails must not strand the others (taken, counted, but held by nobody until the claim idle time).
        A job this worker cannot read (a newer bot's fields) ends at once with an error; one that fails
        otherwise (Redis trouble reading where it resumes) is left to be taken over. Raises only when
        nothing could be delivered, so the worker backs off."""
        delivered: list[Delivery] = []
        failures: list[Exception] = []
        for job_id, entry_id, job_json, attempt in taken:
            try:
                delivered.append(await self._deliver(job_id, entry_id, job_json, attempt))
            except ValidationError as exc:
                await self._reject(job_id, entry_id, attempt, exc)
            except Exception as exc:
                log.warning("job %s was taken but could not be delivered: %s", job_id, exc)
                failures.append(exc)
        if failures and not delivered:
            raise failures[0]
        return delivered

    async def _reject(self, job_id: str, entry_id: str, attempt: int, problem: ValidationError) -> None:
        """End a job this worker cannot read with an error for the bot (the final event acks it); if even
        that fails, the job is taken over later and rejected then."""
        first = problem.errors()[0]
        why = f"{'.'.join(str(part) for part in first['loc'])}: {first['msg']}"
        log.error("job %s cannot be read by this worker (%s); is the worker older than the bot?", job_id, why)
        self._inflight[job_id] = (entry_id, attempt)
        unreadable = ErrorEvent(job_id=job_id, kind="invalid_job", message=f"a worker cannot read this job ({why})")
        try:
            await self.publish(unreadable)
        except Exception as exc:
            log.warning("could not end the unreadable job %s: %s", job_id, exc)
        finally:
            self._forget(job_id, attempt)

    async def _deliver(self, job_id: str, entry_id: str, job_json: str, attempt: int) -> Delivery:
        delivery = Delivery(job=GenerationJob.model_validate_json(job_json), attempt=attempt)
        if attempt > 1:
            delivery.resume_text, delivery.next_seq = await self._resume_point(job_id)
        self._inflight[job_id] = (entry_id, attempt)
        return delivery

    async def _resume_point(self, job_id: str) -> tuple[str, int]:
        """The text the bot already has and the next seq, from the job's event stream."""
        entries = await self._redis.xrange(f"{self._p}:events:{job_id}")
        return resume_point(event_from_json(fields["e"]) for _, fields in entries)

    async def _beat(self) -> None:
        """Keep this worker's pending jobs fresh so nobody reclaims them while it lives."""
        while not self._closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), timeout=self._claim_idle_ms / 3000)
            if not self._inflight or self._closing.is_set():
                continue
            triples = [v for job_id, (entry, attempt) in self._inflight.items() for v in (job_id, attempt, entry)]
            try:
                lost = await self._run("HEARTBEAT", self._consumer, *triples)
            except Exception as exc:  # unreachable, or answering errors (READONLY in a failover): next beat
                log.warning("queue heartbeat failed: %s", exc)
                continue
            sent = {job_id: attempt for job_id, attempt in zip(triples[::3], triples[1::3], strict=True)}
            for job_id in lost:
                self._forget(job_id, sent[job_id])

    def _forget(self, job_id: str, attempt: int) -> None:
        """Stop holding `attempt` of `job_id`, unless the job was delivered here again meanwhile: an answer
        about an older attempt (a heartbeat resent across a Redis restart) must not drop the newer one."""
        if self._inflight.get(job_id, ("", 0))[1] == attempt:
            del self._inflight[job_id]

    async def publish(self, event: QueueEvent) -> None:
        await self.publish_many([event])

    async def publish_many(self, events: Sequence[QueueEvent]) -> None:
        held = [(event, self._inflight[event.job_id]) for event in events if event.job_id in self._inflight]
        if not held:
            return
        sextuples = [
            v for event, (entry, attempt) in held
            for v in (event.job_id, attempt, entry, event_to_json(event), int(is_final(event)),
                      event.seq if isinstance(event, TextDelta) else -1)
        ]
        with _available():
            published = await self._run("PUBLISH", self._ttl, *sextuples)
        for (event, (_, attempt)), ok in zip(held, published, strict=True):
            # Fenced (another worker owns the job now), or final: the script acked it, complete() has nothing left to do.
            if not ok or is_final(event):
                self._forget(event.job_id, attempt)

    async def complete(self, job_id: str) -> None:
        held = self._inflight.get(job_id)
        if held is None:
            return
        incomplete = ErrorEvent(job_id=job_id, kind="incomplete", message="the reply ended unexpectedly")
        try:
            with _available():
                await self._run("COMPLETE", job_id, held[1], held[0], self._ttl, event_to_json(incomplete))
        finally:  # even unheard: the heartbeat must stop claiming it, so it goes idle and is taken over
            self._forget(job_id, held[1])

    async def release(self, job_id: str) -> None:
        held = self._inflight.get(job_id)
        if held is None:
            return
        try:
            with _available():
                await self._run("RELEASE", job_id, held[1], held[0], self._consumer)
        finally:  # as in complete: a release Redis did not hear still lets the job go idle
            self._forget(job_id, held[1])
            self._next_reclaim = 0.0

    async def is_cancelled(self, job_id: str) -> bool:
        return job_id in await self.cancelled([job_id])

    async def cancelled(self, job_ids: Collection[str]) -> set[str]:
        held = {job_id: self._inflight[job_id][1] for job_id in job_ids if job_id in self._inflight}
        stopped = set(job_ids) - held.keys()
        if not held:
            return stopped
        pipe = self._redis.pipeline(transaction=False)
        for job_id in held:
            pipe.hmget(f"{self._p}:job:{job_id}", "attempt", "cancelled", "final")
        with _available():
            rows = await pipe.execute()
        for (job_id, mine), (attempt, cancelled, final) in zip(held.items(), rows, strict=True):
            if attempt != str(mine) or cancelled == "1" or final == "1":
                stopped.add(job_id)
        return stopped

    async def dead_letters(self, count: int = 100) -> list[DeadLetter]:
        with _available():
            entries = await self._redis.xrevrange(f"{self._p}:dead", count=count)
        return [_dead_letter(entry_id, fields) for entry_id, fields in reversed(entries)]

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except Exception:
            return False

    async def close(self) -> None:
        # A stop flag, not task.cancel(): redis-py may turn a cancellation mid-command into a ConnectionError.
        self._closing.set()
        if self._heartbeat is not None:
            await self._heartbeat
            self._heartbeat = None
        if self._group_ready:
            # A consumer with nothing pending is forgotten; one with pending jobs stays so they can be claimed.
            with contextlib.suppress(RedisConnectionError, RedisTimeoutError, OSError):
                pending = await self._redis.xpending_range(
                    self._jobs_key, GROUP, min="-", max="+", count=1, consumername=self._consumer
                )
                if not pending:
                    await self._redis.xgroup_delconsumer(self._jobs_key, GROUP, self._consumer)
        conns = list(self._direct_conns)
        self._direct_conns.clear()
        self._idle.clear()
        for conn in conns:
            await conn.disconnect()
        await self._redis.aclose()
