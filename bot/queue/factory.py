"""Pick the queue transport from `HERMES_QUEUE_URL`: memory:// in-process, redis:// Redis Streams."""

from __future__ import annotations

from bot.config import Settings
from bot.queue.base import JobQueue


def open_queue(settings: Settings) -> JobQueue:
    """A JobQueue for `settings.queue_url`; Redis connects lazily, on the first command."""
    if settings.queue_url == "memory://":
        from bot.queue.memory import MemoryQueue

        return MemoryQueue(settings)
    from bot.queue.redis_streams import RedisStreamsQueue

    return RedisStreamsQueue(settings)
