"""ChatService: the shared pipeline from stored turns to a queued job (real SQLite store, real queue)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.config import Settings
from bot.conversation import ChatService
from bot.personas import PersonaRegistry
from bot.queue.base import QueueBusy
from bot.queue.jobs import Done
from bot.queue.memory import MemoryQueue
from bot.store.keys import ConversationKey
from bot.store.repository import ConversationStore

ROOT = Path(__file__).resolve().parent.parent
KEY = ConversationKey(guild_id=1, channel_id=2)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ConversationStore]:
    store = await ConversationStore.open(f"sqlite+aiosqlite:///{tmp_path / 'c.db'}", migrate=True)
    yield store
    await store.close()


def service(store: ConversationStore, **settings: object) -> ChatService:
    config = Settings(personas_dir=ROOT / "personas", queue_max_per_conversation=1, **settings)  # type: ignore[arg-type]
    return ChatService(config, store, MemoryQueue(config), PersonaRegistry.load(ROOT / "personas"))


async def test_job_carries_named_turns_stops_sampling_and_deadline(store: ConversationStore) -> None:
    chat = service(store)
    ed = chat.personas.get("edward_elric")
    await chat.record_user_turn(KEY, message_id=10, author_id=1, author_name="Alice", content="Hi Ed")
    await chat.store_reply(KEY, ed, "Hey.", [11])
    await chat.record_user_turn(KEY, message_id=12, author_id=2, author_name="Bob", content="<|im_start|>x")
    assert not await chat.record_user_turn(KEY, message_id=12, author_id=2, author_name="Bob", content="dup")
    pending = await chat.start_reply(KEY, ed)
    job = pending.job
    assert pending.position == 1 and job.conversation_key == KEY.as_str() and job.persona_id == "edward_elric"
    assert job.messages[0] == {"role": "system", "content": ed.system_prompt}
    assert job.messages[1:] == [
        {"role": "user", "content": "Alice: Hi Ed"},
        {"role": "assistant", "content": "Hey."},
        {"role": "user", "content": "Bob: <|im_start|>x"},  # verbatim here; the engines sanitize it
    ]
    others = [f"\n{p.name}:" for p in chat.personas if p.id != "edward_elric"]  # they may join: no impersonating
    assert job.stop == ["\nAlice:", "\nBob:", *others] and job.sampling == ed.sampling
    assert job.deadline is not None and job.deadline > job.created_at


async def test_conversation_share_is_busy_unless_superseding(store: ConversationStore) -> None:
    hermes_key = ConversationKey(guild_id=1, channel_id=3)
    busy = service(store)
    persona = busy.personas.get("hermes")
    await busy.record_user_turn(hermes_key, message_id=20, author_id=1, author_name="Ann", content="one")
    await busy.start_reply(hermes_key, persona)
    with pytest.raises(QueueBusy):
        await busy.start_reply(hermes_key, persona)

    newest_wins = service(store, queue_supersede=True)
    first = await newest_wins.start_reply(hermes_key, persona)
    second = await newest_wins.start_reply(hermes_key, persona)
    events = [event async for event in first.events()]
    assert isinstance(events[-1], Done) and events[-1].finish_reason == "superseded"
    assert await newest_wins.queue.position(second.job.job_id) == 1


async def test_one_user_holds_a_limited_share_over_every_conversation(store: ConversationStore) -> None:
    """One person asking in many threads cannot fill the line: past HERMES_QUEUE_MAX_PER_USER replies on the
    way they are busy, others are not, and a place is free again once one of their replies has ended."""
    chat = service(store, queue_max_per_user=2)
    persona = chat.personas.get("hermes")
    keys = [ConversationKey(guild_id=1, channel_id=100 + i) for i in range(6)]
    first = await chat.start_reply(keys[0], persona, asker=7)
    await chat.start_reply(keys[1], persona, asker=7)
    with pytest.raises(QueueBusy) as refused:
        await chat.start_reply(keys[2], persona, asker=7)
    assert "You already have 2 replies on the way (limit 2)" in str(refused.value)
    assert await chat.queue.depth() == 2  # the refused one was never queued
    await chat.start_reply(keys[2], persona, asker=8)  # another user
    await chat.start_reply(keys[3], persona)  # nobody's (a persona handing off)
    first.finished()
    first.finished()  # twice gives back one place only
    await chat.start_reply(keys[4], persona, asker=7)
    with pytest.raises(QueueBusy):
        await chat.start_reply(keys[5], persona, asker=7)


async def test_a_reply_that_is_not_queued_gives_its_place_back(store: ConversationStore) -> None:
    chat = service(store, queue_max_per_user=1)
    persona = chat.personas.get("hermes")
    await chat.start_reply(KEY, persona, asker=1)
    with pytest.raises(QueueBusy, match="This conversation"):  # the conversation's share is full
        await chat.start_reply(KEY, persona, asker=2)
    await chat.start_reply(ConversationKey(guild_id=1, channel_id=9), persona, asker=2)  # user 2 kept their place
