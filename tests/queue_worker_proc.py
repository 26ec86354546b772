"""A fake queue worker for the crash-recovery tests: streams numbered pieces of text slowly.

`python -m tests.queue_worker_proc REDIS_URL PREFIX CLAIM_IDLE_MS DELAY_S` runs it as its own process
(the test kills it with SIGKILL); the memory tests run `slow_worker` as a task and cancel it. The
"generator" is deterministic, so a resumed worker can check resume_text and continue seamlessly.
"""

from __future__ import annotations

import asyncio
import sys

from bot.config import Settings
from bot.queue.base import Delivery, JobQueue
from bot.queue.jobs import Done, TextDelta

TOTAL_PIECES = 20


def piece(seq: int) -> str:
    return f"w{seq} "


def full_text() -> str:
    return "".join(piece(seq) for seq in range(TOTAL_PIECES))


async def slow_worker(queue: JobQueue, *, delay_s: float) -> Delivery:
    """Fetch one job, continue it from its resume point, finish it; returns the delivery it got."""
    deliveries: list[Delivery] = []
    while not deliveries:
        deliveries = await queue.fetch(1, 200)
    delivery = deliveries[0]
    job_id = delivery.job.job_id
    if delivery.resume_text != full_text()[: len(delivery.resume_text)]:
        raise AssertionError(f"resume text {delivery.resume_text!r} is not a prefix of the reply")
    for seq in range(delivery.next_seq, TOTAL_PIECES):
        if await queue.is_cancelled(job_id):
            return delivery
        await queue.publish(TextDelta(job_id=job_id, seq=seq, text=piece(seq)))
        await asyncio.sleep(delay_s)
    await queue.publish(Done(job_id=job_id, finish_reason="stop", completion_tokens=TOTAL_PIECES))
    await queue.complete(job_id)
    return delivery


async def _main(url: str, prefix: str, claim_idle_ms: int, delay_s: float) -> None:
    from bot.queue.redis_streams import RedisStreamsQueue

    queue = RedisStreamsQueue(Settings(queue_url=url, queue_claim_idle_ms=claim_idle_ms), prefix=prefix)
    try:
        await slow_worker(queue, delay_s=delay_s)
    finally:
        await queue.close()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
