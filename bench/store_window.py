"""Window load time in a conversation with 1,000,000 stored messages vs one with 1,000.

The (conversation_id, id) index should make the two cost the same: the ratio should be ~1.
Sets up its own database (a temporary SQLite file, or with --postgres a throwaway PostgreSQL server
from tests.services), bulk-inserts the rows, then times ConversationStore.window() alternately on
both conversations and prints one JSON object.

    .venv/bin/python bench/store_window.py [--postgres] [--large 1000000] [--window 50]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import insert, select  # noqa: E402

from bot.store.db import make_engine  # noqa: E402
from bot.store.keys import ConversationKey  # noqa: E402
from bot.store.migrate import upgrade  # noqa: E402
from bot.store.models import Conversation, Message  # noqa: E402
from bot.store.repository import ConversationStore  # noqa: E402

SMALL = ConversationKey(guild_id=1, channel_id=1)
LARGE = ConversationKey(guild_id=1, channel_id=2)
BATCH = 50_000


@contextlib.contextmanager
def database(postgres: bool) -> Iterator[str]:
    if postgres:
        from tests.services import postgres_server

        with postgres_server() as url:
            yield url
    else:
        with tempfile.TemporaryDirectory(prefix="hermes-bench-") as tmp:
            yield f"sqlite+aiosqlite:///{tmp}/bench.db"


async def fill(store: ConversationStore, key: ConversationKey, count: int, first_id: int) -> None:
    """Bulk insert `count` turns (executemany in big batches), alternating user and assistant."""
    await store.reset(key)  # creates the conversation row
    async with store.engine.connect() as connection:
        conversation_id = await connection.scalar(select(Conversation.id).where(Conversation.key == key.as_str()))
    now = datetime.now(UTC)
    for start in range(0, count, BATCH):
        rows = [
            {
                "conversation_id": conversation_id,
                "discord_message_id": first_id + i,
                "author_id": 7 if i % 2 == 0 else None,
                "author_name": "alice" if i % 2 == 0 else "Hermes 2",
                "role": "user" if i % 2 == 0 else "assistant",
                "persona_id": None if i % 2 == 0 else "hermes",
                "content": f"message number {i} with a few words of text in it",
                "created_at": now,
            }
            for i in range(start, min(count, start + BATCH))
        ]
        async with store.engine.begin() as connection:
            await connection.execute(insert(Message), rows)


async def time_windows(store: ConversationStore, window: int, repeats: int) -> dict[str, float]:
    timings: dict[str, list[float]] = {"small": [], "large": []}
    for _ in range(repeats):
        for name, key in (("small", SMALL), ("large", LARGE)):
            start = time.perf_counter()
            turns = await store.window(key, window)
            timings[name].append(time.perf_counter() - start)
            assert len(turns) == window
    return {name: statistics.median(values) for name, values in timings.items()}


async def run(url: str, args: argparse.Namespace) -> dict[str, object]:
    store = ConversationStore(make_engine(url))
    try:
        start = time.perf_counter()
        await fill(store, LARGE, args.large, first_id=10_000_000)
        await fill(store, SMALL, args.small, first_id=1)
        insert_s = time.perf_counter() - start
        await time_windows(store, args.window, 20)  # warm caches and the connection pool
        medians = await time_windows(store, args.window, args.repeats)
        stored = await store.count_messages()
    finally:
        await store.close()
    return {
        "bench": "store_window",
        "backend": "postgresql" if args.postgres else "sqlite",
        "window": args.window,
        "repeats": args.repeats,
        "messages_small": args.small,
        "messages_large": args.large,
        "messages_stored": stored,
        "insert_rows_per_s": round((args.small + args.large) / insert_s),
        "window_ms_1k": round(medians["small"] * 1000, 3),
        "window_ms_1m": round(medians["large"] * 1000, 3),
        "ratio_1m_vs_1k": round(medians["large"] / medians["small"], 3),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", action="store_true", help="use a throwaway PostgreSQL instead of SQLite")
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    with database(args.postgres) as url:
        upgrade(url)
        print(json.dumps(asyncio.run(run(url, args))))


if __name__ == "__main__":
    main()
