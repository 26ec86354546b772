"""Round trip of one job through the queue: submit -> worker fetch -> delta + Done -> bot has Done.

Starts its own redis-server on a free loopback port and an echo worker in a separate process, then
measures sequential round trips (latency) and many jobs in flight (throughput). The same
measurements on the in-process memory:// queue are the baseline, and a bare-socket PING to the same
redis-server gives the machine's floor per network hop (a round trip needs at least four sequential
hops: submit, worker wake-up, publish, bot wake-up). Prints one JSON object.

    .venv/bin/python bench/queue_roundtrip.py [--jobs 2000] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bot.config import Settings  # noqa: E402
from bot.queue.base import JobQueue  # noqa: E402
from bot.queue.jobs import Done, GenerationJob, TextDelta  # noqa: E402
from bot.queue.memory import MemoryQueue  # noqa: E402
from bot.queue.redis_streams import RedisStreamsQueue  # noqa: E402
from tests.services import redis_server  # noqa: E402


def _settings(url: str) -> Settings:
    return Settings(queue_url=url, queue_max_waiting=100_000, queue_max_per_conversation=100_000)


async def echo_worker(queue: JobQueue, stop: asyncio.Event) -> None:
    """Answers every job with its last message as one delta, then Done."""

    async def answer(job: GenerationJob) -> None:
        await queue.publish_many([
            TextDelta(job_id=job.job_id, seq=0, text=job.messages[-1]["content"]),
            Done(job_id=job.job_id, finish_reason="stop", completion_tokens=1),
        ])
        await queue.complete(job.job_id)

    while not stop.is_set():
        deliveries = await queue.fetch(64, 200)
        await asyncio.gather(*(answer(d.job) for d in deliveries))


async def round_trip(queue: JobQueue, n: int) -> float:
    """Seconds from submit until the bot has read the job's Done."""
    job = GenerationJob(conversation_key=f"c{n}", persona_id="bench", messages=[{"role": "user", "content": "ping"}])
    start = time.perf_counter()
    await queue.submit(job)
    async for _, event in queue.stream(job.job_id):
        if isinstance(event, Done):
            break
    return time.perf_counter() - start


async def measure(queue: JobQueue, jobs: int, concurrency: int) -> dict[str, float]:
    for i in range(50):  # warm up connections and scripts
        await round_trip(queue, i)
    latencies = sorted([await round_trip(queue, i) for i in range(jobs)])
    start = time.perf_counter()
    sem = asyncio.Semaphore(concurrency)

    async def limited(i: int) -> None:
        async with sem:
            await round_trip(queue, i)

    await asyncio.gather(*(limited(i) for i in range(jobs)))
    elapsed = time.perf_counter() - start
    return {
        "p50_ms": round(statistics.median(latencies) * 1000, 3),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 3),
        "jobs_per_s": round(jobs / elapsed, 1),
    }


async def bench_memory(jobs: int, concurrency: int) -> dict[str, float]:
    queue = MemoryQueue(_settings("memory://"))
    stop = asyncio.Event()
    worker = asyncio.create_task(echo_worker(queue, stop))
    try:
        return await measure(queue, jobs, concurrency)
    finally:
        stop.set()
        await worker
        await queue.close()


async def loopback_ping_ms(url: str, pings: int = 2000) -> float:
    """Median PING round trip on a bare asyncio socket: the floor this machine puts under every hop."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    times = []
    for _ in range(pings):
        start = time.perf_counter()
        writer.write(b"*1\r\n$4\r\nPING\r\n")
        await reader.readline()
        times.append(time.perf_counter() - start)
    writer.close()
    await writer.wait_closed()
    return round(statistics.median(times) * 1000, 3)


async def bench_redis(url: str, jobs: int, concurrency: int) -> dict[str, float]:
    prefix = f"bench:{uuid.uuid4().hex[:8]}"
    worker = await asyncio.create_subprocess_exec(sys.executable, __file__, "--worker", url, prefix, cwd=ROOT)
    queue = RedisStreamsQueue(_settings(url), prefix=prefix)
    try:
        return await measure(queue, jobs, concurrency)
    finally:
        if worker.returncode is None:
            worker.terminate()
        await worker.wait()
        await queue.close()


async def run_worker(url: str, prefix: str) -> None:
    queue = RedisStreamsQueue(_settings(url), prefix=prefix)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await echo_worker(queue, stop)
    finally:
        await queue.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--worker", nargs=2, metavar=("URL", "PREFIX"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        asyncio.run(run_worker(*args.worker))
        return
    memory = asyncio.run(bench_memory(args.jobs, args.concurrency))
    with redis_server() as url:
        redis_result = asyncio.run(bench_redis(url, args.jobs, args.concurrency))
        ping_ms = asyncio.run(loopback_ping_ms(url))
    print(json.dumps({
        "bench": "queue_roundtrip",
        "transport": "redis",
        "jobs": args.jobs,
        "concurrency": args.concurrency,
        **redis_result,
        "baseline_memory": memory,
        "p50_ratio_vs_memory": round(redis_result["p50_ms"] / memory["p50_ms"], 2),
        "loopback_ping_ms": ping_ms,
        "p50_in_loopback_pings": round(redis_result["p50_ms"] / ping_ms, 1),
        "goal_p50_ms": 1.0,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}",
    }))


if __name__ == "__main__":
    main()
