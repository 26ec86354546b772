"""The worker end to end: tiny model -> transformers engine -> worker -> memory and Redis queues -> bot side."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from bot.config import Settings
from bot.engine import transformers_engine
from bot.engine.base import GenerationRequest, GenerationStream
from bot.engine.openai_engine import OpenAIEngine
from bot.engine.transformers_engine import TransformersEngine, load_model
from bot.metrics import REGISTRY
from bot.personas import Sampling
from bot.queue import redis_streams
from bot.queue.base import JobQueue, QueueEvent
from bot.queue.jobs import Done, ErrorEvent, GenerationJob, TextDelta
from bot.queue.memory import MemoryQueue
from bot.queue.redis_streams import RedisStreamsQueue
from bot.worker import Worker, _serve_forever
from tests.openai_test_server import OpenAITestServer, Reply
from tests.tcp_proxy import CuttingProxy
from tests.waiting import eventually

GREEDY = Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=20)
# Greedy on the seeded tiny model loops without ever choosing eos: a reply that only a limit ends.
LONG = Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=3000)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> tuple[Any, Any]:
    tokenizer, model, _ = load_model(Settings(model=str(tiny_model_dir), device="cpu"))
    return tokenizer, model


class Rig:
    """A bot-side queue, a worker-side queue (the same object on memory://) and running workers."""

    def __init__(self, kind: str, redis_url: str | None, loaded: tuple[Any, Any], model_dir: Path) -> None:
        self.kind, self.redis_url, self.loaded = kind, redis_url, loaded
        self.prefix = f"wtest:{uuid.uuid4().hex[:8]}"
        self.settings = Settings(
            queue_url=redis_url if kind == "redis" else "memory://", model=str(model_dir), device="cpu",
            max_batch_size=4, context_tokens=4096, queue_claim_idle_ms=300,
        )
        self.bot = self._queue()
        self.workers: list[tuple[Worker, asyncio.Task[None]]] = []
        self._queues = [self.bot]

    def _queue(self) -> JobQueue:
        if self.kind == "memory":
            return MemoryQueue(self.settings)
        return RedisStreamsQueue(self.settings, prefix=self.prefix)

    async def start_worker(self, **kw: float) -> Worker:
        tokenizer, model = self.loaded
        queue = self.bot if self.kind == "memory" else self._queue()
        if queue is not self.bot:
            self._queues.append(queue)
        engine = TransformersEngine(self.settings, model=model, tokenizer=tokenizer)
        worker = Worker(self.settings, queue, engine, poll_s=0.05, **kw)
        self.workers.append((worker, asyncio.create_task(worker.run())))
        await worker.started.wait()
        return worker

    async def close(self) -> None:
        for worker, task in self.workers:
            await worker.shutdown()
            await task
        for queue in self._queues:
            await queue.close()


@pytest.fixture(params=["memory", "redis"])
async def rig(request: pytest.FixtureRequest, loaded: tuple[Any, Any], tiny_model_dir: Path) -> AsyncIterator[Rig]:
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    r = Rig(request.param, redis_url, loaded, tiny_model_dir)
    yield r
    await r.close()


def job(text: str, sampling: Sampling = GREEDY, **fields: Any) -> GenerationJob:
    messages = [{"role": "system", "content": "You are Hermes."}, {"role": "user", "content": text}]
    return GenerationJob(conversation_key=f"chan-{text}", persona_id="hermes", messages=messages,
                         sampling=sampling, **fields)


async def events(queue: JobQueue, job_id: str) -> list[QueueEvent]:
    async with asyncio.timeout(30):
        return [event async for _, event in queue.stream(job_id)]


def reply_of(evs: list[QueueEvent]) -> str:
    deltas = [e for e in evs if isinstance(e, TextDelta)]
    assert [d.seq for d in deltas] == list(range(len(deltas)))  # in order, no gaps, no repeats
    assert evs and not isinstance(evs[-1], TextDelta) and all(isinstance(e, TextDelta) for e in evs[:-1])
    return "".join(d.text for d in deltas)


async def test_concurrent_jobs_stream_in_order(rig: Rig) -> None:
    await rig.start_worker()
    jobs = [job(f"Hello {i}! " * (i + 1)) for i in range(6)]
    for j in jobs:
        await rig.bot.submit(j)
    results = await asyncio.gather(*(events(rig.bot, j.job_id) for j in jobs))
    tokenizer, model = rig.loaded
    direct = TransformersEngine(rig.settings, model=model, tokenizer=tokenizer)
    await direct.start()
    for j, evs in zip(jobs, results, strict=True):
        expected, _ = await direct.generate_text(GenerationRequest("ref", j.messages, GREEDY))
        assert reply_of(evs) == expected
        assert isinstance(evs[-1], Done) and evs[-1].completion_tokens > 0
    await direct.close()


async def test_a_worker_takes_no_more_jobs_than_its_engine_has_memory_for(
    loaded: tuple[Any, Any], tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HERMES_MAX_BATCH_SIZE=4 but the free memory holds one KV slot: the other jobs stay in the queue (where
    another worker may take them), not in this worker's engine. (Held at most one at a time: the first reply
    may reach its limit meanwhile on a fast run, and then the worker rightly takes the next.)"""
    monkeypatch.setattr(transformers_engine, "free_memory", lambda device: 1)
    monkeypatch.setattr(transformers_engine, "slots_that_fit", lambda wanted, per_slot, free, reserved: 1)
    rig = Rig("memory", None, loaded, tiny_model_dir)
    try:
        worker = await rig.start_worker()
        jobs = [job(f"Tell me a long story {i}.", LONG) for i in range(3)]
        most_held = 0
        for j in jobs:
            await rig.bot.submit(j)

        async def two_waiting() -> bool:
            nonlocal most_held
            most_held = max(most_held, len(worker._held))
            return await rig.bot.depth() == 2

        await eventually(two_waiting)
        for _ in range(30):  # a few more fetch rounds of the worker (poll_s 0.05)
            most_held = max(most_held, len(worker._held))
            await asyncio.sleep(0.01)
        assert most_held == 1
        for j in jobs:
            await rig.bot.cancel(j.job_id)
    finally:
        await rig.close()


async def test_stop_strings_through_the_worker(rig: Rig) -> None:
    await rig.start_worker()
    plain = job("Tell me about tea.")
    await rig.bot.submit(plain)
    full = reply_of(await events(rig.bot, plain.job_id))
    stopped = job("Tell me about tea.", stop=[full[5:8]])
    stopped.conversation_key = "other"
    await rig.bot.submit(stopped)
    evs = await events(rig.bot, stopped.job_id)
    assert reply_of(evs) == full[: full.find(full[5:8])]
    assert isinstance(evs[-1], Done) and evs[-1].finish_reason == "stop"


async def test_cancel_in_flight(rig: Rig) -> None:
    await rig.start_worker()
    j = job("Go on and on.", LONG)
    await rig.bot.submit(j)
    seen: list[QueueEvent] = []
    async with asyncio.timeout(30):
        async for _, event in rig.bot.stream(j.job_id):
            seen.append(event)
            if len(seen) == 2:
                await rig.bot.cancel(j.job_id)
    reply_of(seen)
    assert isinstance(seen[-1], Done) and seen[-1].finish_reason == "cancelled"


async def test_deadline_ends_the_reply(rig: Rig) -> None:
    await rig.start_worker()
    j = job("Talk for a long time.", LONG, deadline=time.time() + 0.6)
    await rig.bot.submit(j)
    evs = await events(rig.bot, j.job_id)
    reply_of(evs)
    assert isinstance(evs[-1], Done) and evs[-1].finish_reason == "deadline"
    assert evs[-1].completion_tokens < 3000


async def test_shutdown_releases_held_job_and_another_worker_resumes(rig: Rig) -> None:
    waits_before = REGISTRY.get_sample_value("hermes_job_wait_seconds_count") or 0
    first = await rig.start_worker(shutdown_grace_s=0.0)
    medium = Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=400)
    j = job("Once upon a time", medium)  # the tiny model's greedy reply to it runs all 400 tokens
    await rig.bot.submit(j)
    stream = rig.bot.stream(j.job_id)
    seen: list[QueueEvent] = []
    async with asyncio.timeout(30):
        while len(seen) < 3:
            seen.append((await anext(stream))[1])
        assert first.held == 1
        await first.shutdown()  # grace 0: the job goes back to the queue mid-reply
        assert first.held == 0
        await rig.start_worker()
        async for _, event in stream:
            seen.append(event)
    reply_of(seen)  # one seamless stream: seq continues where the first worker stopped
    assert isinstance(seen[-1], Done) and seen[-1].finish_reason in ("stop", "length")
    assert REGISTRY.get_sample_value("hermes_job_wait_seconds_count") == waits_before + 1  # one job waited once


async def test_engine_error_becomes_an_error_event(rig: Rig) -> None:
    await rig.start_worker()
    j = job("hi")
    j.messages[0]["content"] = "rule " * 5000  # the system prompt alone overflows the context
    await rig.bot.submit(j)
    evs = await events(rig.bot, j.job_id)
    assert isinstance(evs[-1], ErrorEvent) and evs[-1].kind == "engine" and "system prompt" in evs[-1].message


async def test_unexpected_worker_failure_still_ends_the_job(rig: Rig) -> None:
    """A bug outside the engine (here: submit raising) must not leave the user waiting until the deadline."""
    worker = await rig.start_worker()

    def broken_submit(request: GenerationRequest) -> GenerationStream:
        raise RuntimeError("bug in the worker path")

    worker.engine.submit = broken_submit  # type: ignore[method-assign]
    j = job("hi")
    await rig.bot.submit(j)
    evs = await events(rig.bot, j.job_id)
    assert isinstance(evs[-1], ErrorEvent) and evs[-1].kind == "worker"
    assert await rig.bot.depth() == 0


class LosesCancellation(MemoryQueue):
    """depth() answers from an inner task that ignores cancellation, as redis-py 8.1's commands often do:
    a cancel that lands mid-command is lost and the command returns (measured: 162 of 300 cancels)."""

    async def depth(self) -> int:
        async def answer() -> int:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.3)
            return 0

        return await asyncio.create_task(answer())


async def test_shutdown_ends_even_when_a_queue_call_loses_its_cancellation(
    loaded: tuple[Any, Any], tiny_model_dir: Path
) -> None:
    tokenizer, model = loaded
    settings = Settings(queue_url="memory://", model=str(tiny_model_dir), device="cpu", max_batch_size=2)
    worker = Worker(settings, LosesCancellation(settings), TransformersEngine(settings, model=model, tokenizer=tokenizer),
                    poll_s=0.01)
    task = asyncio.create_task(worker.run())
    await worker.started.wait()
    await asyncio.sleep(0.1)  # the watcher is inside depth() most of the time now
    await asyncio.wait_for(worker.shutdown(), 5)
    await task


class PublishFails(MemoryQueue):
    async def publish_many(self, events: Any) -> None:
        raise RuntimeError("publishing broke")


async def test_a_job_the_worker_cannot_publish_stops_its_generation(
    loaded: tuple[Any, Any], tiny_model_dir: Path
) -> None:
    """When publishing fails mid-reply the job ends with an error, and the engine stops writing the reply
    (before, it went on to max_new_tokens in a slot nobody read)."""
    tokenizer, model = loaded
    settings = Settings(queue_url="memory://", model=str(tiny_model_dir), device="cpu", max_batch_size=2)
    engine = TransformersEngine(settings, model=model, tokenizer=tokenizer)
    streams: list[GenerationStream] = []
    submit = engine.submit

    def recording_submit(request: GenerationRequest) -> GenerationStream:
        streams.append(submit(request))
        return streams[-1]

    engine.submit = recording_submit  # type: ignore[method-assign]
    queue = PublishFails(settings)
    worker = Worker(settings, queue, engine, poll_s=0.01)
    task = asyncio.create_task(worker.run())
    await worker.started.wait()
    await queue.submit(job("go on", Sampling(temperature=0.8, max_new_tokens=2000)))
    await eventually(lambda: streams and not worker.held, timeout=10)
    assert streams[0].cancel_reason == "cancelled"
    await worker.shutdown()
    await task


@pytest.fixture
async def redis_proxy(redis_url: str) -> AsyncIterator[CuttingProxy]:
    """A proxy in front of the test Redis: its go_down() is, to the clients behind it, a Redis restart."""
    target = urlsplit(redis_url)
    proxy = CuttingProxy(target.hostname or "127.0.0.1", target.port or 6379)
    await proxy.start()
    yield proxy
    await proxy.close()


@contextlib.asynccontextmanager
async def worker_behind(
    proxy: CuttingProxy, redis_url: str, reply: Reply
) -> AsyncIterator[tuple[JobQueue, Worker]]:
    """A running worker on the openai engine (its server answers `reply`, then echoes) whose Redis is behind
    `proxy`, and a bot-side queue on Redis itself."""
    async with OpenAITestServer() as server:
        server.script(reply)
        settings = Settings(engine="openai", openai_base_url=server.base_url, queue_url=redis_url,
                            queue_claim_idle_ms=300)
        prefix = f"wtest:{uuid.uuid4().hex[:8]}"
        bot = RedisStreamsQueue(settings, prefix=prefix)
        behind = settings.model_copy(update={"queue_url": f"redis://127.0.0.1:{proxy.port}/0"})
        queue = RedisStreamsQueue(behind, prefix=prefix)
        worker = Worker(settings, queue, OpenAIEngine(settings), poll_s=0.05)
        task = asyncio.create_task(worker.run())
        try:
            yield bot, worker
        finally:
            proxy.come_back()
            await worker.shutdown()
            await task
            await queue.close()
            await bot.close()


async def test_a_reply_goes_on_through_a_redis_outage_longer_than_the_resends(
    redis_proxy: CuttingProxy, redis_url: str, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis unreachable mid-reply for longer than one publish's resends (a restart): the job stays queued
    and this worker its owner, so the reply must go on once Redis is back. Before, the worker ended it with
    an error ("the Redis queue is unreachable") and let it go, to be taken over and written again."""
    monkeypatch.setattr(redis_streams, "RETRY_DELAYS_S", (0.01,))
    text = "".join(f"w{i} " for i in range(60))
    async with worker_behind(redis_proxy, redis_url, Reply(text, chunk_chars=4, delay_s=0.02)) as (bot, _):
        j = job("hi")
        await bot.submit(j)
        reading = bot.stream(j.job_id)
        async with asyncio.timeout(20):
            evs = [(await anext(reading))[1]]
            await redis_proxy.go_down()
            await asyncio.sleep(0.5)  # the worker's publishes fail meanwhile
            redis_proxy.come_back()
            evs += [event async for _, event in reading]
    assert reply_of(evs) == text and isinstance(evs[-1], Done) and evs[-1].finish_reason == "stop"
    assert any("publishing the reply failed" in r.message for r in caplog.records)  # the outage did hit it


async def test_a_job_whose_worker_lost_redis_until_its_deadline_ends_once_redis_is_back(
    redis_proxy: CuttingProxy, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis unreachable mid-reply until past the job's deadline: the worker can neither publish, nor end the
    job, nor release it. It must still let the job go, so that once Redis is back the job is taken over and
    ended (before, the heartbeat kept claiming it and the user waited for the timeout)."""
    monkeypatch.setattr(redis_streams, "RETRY_DELAYS_S", (0.01,))
    long_reply = Reply("w " * 2000, chunk_chars=4, delay_s=0.01)
    async with worker_behind(redis_proxy, redis_url, long_reply) as (bot, worker):
        j = job("hi", deadline=time.time() + 1.0)
        await bot.submit(j)
        reading = bot.stream(j.job_id)
        async with asyncio.timeout(20):
            evs = [(await anext(reading))[1]]
            await redis_proxy.go_down()
            await eventually(lambda: not worker.held)
            redis_proxy.come_back()
            evs += [event async for _, event in reading]
    assert reply_of(evs) and evs[-1] == Done(job_id=j.job_id, finish_reason="deadline")


async def model_check(port: int) -> bool | None:
    """The "model" check of the worker's /readyz; None while the ops server is not up yet."""
    try:
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/readyz") as resp:
            return (await resp.json())["checks"].get("model")
    except aiohttp.ClientConnectionError:
        return None


async def test_a_worker_on_the_openai_engine_is_not_ready_while_its_server_is_down(unused_tcp_port: int) -> None:
    """`hermes-bot worker` with HERMES_ENGINE=openai: its /readyz said ready while LM Studio was down."""
    async with OpenAITestServer() as server:
        settings = Settings(engine="openai", openai_base_url=server.base_url, queue_url="memory://",
                            metrics_port=unused_tcp_port)
        serving = asyncio.create_task(_serve_forever(settings))
        try:
            assert await eventually(lambda: model_check(unused_tcp_port))
            await server.close()
            assert await model_check(unused_tcp_port) is False
        finally:
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
            for sig in (signal.SIGTERM, signal.SIGINT):  # _serve_forever's: this loop outlives it
                asyncio.get_running_loop().remove_signal_handler(sig)


async def test_a_nul_the_model_writes_is_left_out_of_the_reply() -> None:
    """PostgreSQL cannot store NUL, so the store drops it: the reply shown must not keep it either. A
    chunk of nothing else is no delta at all."""
    async with OpenAITestServer() as server:
        settings = Settings(engine="openai", openai_base_url=server.base_url, queue_url="memory://")
        # Chunks "Hel", "\x00lo", "\x00\x00\x00" (a batch of its own, a while apart), " th", "ere".
        server.script(Reply("Hel\x00lo\x00\x00\x00 there", chunk_chars=3, delay_s=0.05))
        queue = MemoryQueue(settings)
        worker = Worker(settings, queue, OpenAIEngine(settings), poll_s=0.01)
        task = asyncio.create_task(worker.run())
        try:
            j = job("hi")
            await queue.submit(j)
            deltas = [e.text for e in await events(queue, j.job_id) if isinstance(e, TextDelta)]
        finally:
            await worker.shutdown()
            await task
    assert "".join(deltas) == "Hello there" and all(deltas)


class GoesDown(MemoryQueue):
    """A queue whose calls fail while `down` is set, as Redis's do while it is unreachable."""

    down = False

    async def fetch(self, count: int, block_ms: int) -> Any:
        if self.down:
            raise ConnectionError("Connection refused")
        return await super().fetch(count, block_ms)

    async def depth(self) -> int:
        if self.down:
            raise ConnectionError("Connection refused")
        return await super().depth()


async def test_a_queue_outage_is_logged_once_and_its_end_once(
    loaded: tuple[Any, Any], tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An idle worker asks the queue many times a second: one warning per poll filled the logs with
    thousands of identical lines an hour while Redis was down."""
    tokenizer, model = loaded
    settings = Settings(queue_url="memory://", model=str(tiny_model_dir), device="cpu", max_batch_size=2)
    queue = GoesDown(settings)
    queue.down = True
    worker = Worker(settings, queue, TransformersEngine(settings, model=model, tokenizer=tokenizer), poll_s=0.01)
    with caplog.at_level(logging.INFO, logger="bot.worker"):
        task = asyncio.create_task(worker.run())
        await worker.started.wait()
        await asyncio.sleep(1.5)  # about 150 polls and two fetches
        queue.down = False
        await eventually(lambda: sum("works again" in r.message for r in caplog.records) == 2, timeout=5)
        j = job("still there?", Sampling(temperature=0.0, max_new_tokens=4))
        await queue.submit(j)
        assert isinstance((await events(queue, j.job_id))[-1], Done)
        await worker.shutdown()
        await task
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert sorted(warnings) == ["checking the queue failed: Connection refused", "fetching jobs failed: Connection refused"]
