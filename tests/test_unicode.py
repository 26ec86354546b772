"""Text with UTF-16 surrogates (JSON escapes them, json.loads keeps them) made well-formed where it enters."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bot.queue.jobs import ErrorEvent, GenerationJob, TextDelta
from bot.text_safety import storable, well_formed
from tests.test_queue import Harness, collect, fetch_one


@pytest.mark.parametrize(("raw", "clean"), [
    ("plain, \U0001f600 and \ufeff stay", "plain, \U0001f600 and \ufeff stay"),
    ("\ud83d\ude00", "\U0001f600"),  # a pair written as two escapes is the one character
    ("half \ud83d", "half \ufffd"),
    ("\ud83dA", "\ufffdA"),
    ("\ude00\ud83d", "\ufffd\ufffd"),  # reversed: no pair
    ("x\ud83d\ud83d\ude00y", "x\ufffd\U0001f600y"),
    ("", ""),
])
def test_well_formed_joins_pairs_and_replaces_lone_surrogates(raw: str, clean: str) -> None:
    assert well_formed(raw) == clean
    clean.encode("utf-8")  # what SQLite, PostgreSQL and JSON need


def test_storable_is_well_formed_without_nul() -> None:
    assert storable("a\x00\ud83d\ude00\udc80") == "a\U0001f600\ufffd"


@pytest.fixture
async def redis_harness(redis_url: str) -> AsyncIterator[Harness]:
    h = Harness("redis", redis_url)
    yield h
    await h.aclose()


async def test_a_lone_surrogate_crosses_the_redis_queue(redis_harness: Harness) -> None:
    """Serialising a TextDelta with a lone surrogate raised PydanticSerializationError: the reply failed."""
    bot = redis_harness.start()
    worker = redis_harness.worker()
    job = GenerationJob(conversation_key="g1/c2", persona_id="hermes",
                        messages=[{"role": "user", "content": "hi \ud83d"}], stop=["\nAna\ud83d\ude00:"])
    await bot.submit(job)
    assert (await fetch_one(worker)).job == job
    assert (job.messages[0]["content"], job.stop) == ("hi \ufffd", ["\nAna\U0001f600:"])
    await worker.publish_many([
        TextDelta(job_id=job.job_id, seq=0, text="half \ud83d"),
        ErrorEvent(job_id=job.job_id, kind="engine", message="the server said \udc80"),
    ])
    await worker.complete(job.job_id)
    assert [e for _, e in await collect(bot, job.job_id)] == [
        TextDelta(job_id=job.job_id, seq=0, text="half \ufffd"),
        ErrorEvent(job_id=job.job_id, kind="engine", message="the server said \ufffd"),
    ]
