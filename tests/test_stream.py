"""LiveReply against an in-memory outlet: throttle, continuation messages, exact final text, retries."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import discord
import pytest

from bot.discord import stream
from bot.discord.stream import LiveReply, deliver

MESSAGE_IDS = itertools.count(1)  # unique across outlets, like Discord's snowflakes


def http_error(status: int, code: int = 0) -> discord.HTTPException:
    response = SimpleNamespace(status=status, reason="test", headers={"Retry-After": "0.01"})
    error = discord.NotFound if status == 404 else discord.HTTPException
    return error(response, {"message": "nope", "code": code})  # type: ignore[arg-type]


@dataclass
class MemoryOutlet:
    """Records what a channel would show; fails the next calls when told to."""

    overhead: int = 0
    messages: dict[int, str] = field(default_factory=dict)
    writes: list[tuple[float, int]] = field(default_factory=list)
    fail_next: list[int] = field(default_factory=list)
    gone: bool = False  # its webhook was deleted: every call answers 404 Unknown Webhook

    def _maybe_fail(self) -> None:
        if self.gone:
            raise http_error(404, 10015)
        if self.fail_next:
            raise http_error(self.fail_next.pop(0))

    async def send(self, content: str) -> int:
        self._maybe_fail()
        message_id = next(MESSAGE_IDS)
        self.messages[message_id] = content
        self.writes.append((time.monotonic(), message_id))
        return message_id

    async def edit(self, message_id: int, content: str) -> None:
        self._maybe_fail()
        assert len(content) <= 2000
        self.messages[message_id] = content
        self.writes.append((time.monotonic(), message_id))

    async def delete(self, message_id: int) -> None:
        self._maybe_fail()
        del self.messages[message_id]


async def test_edits_are_throttled_per_message_and_final_text_is_exact() -> None:
    outlet = MemoryOutlet()
    reply = LiveReply(outlet, interval=0.2)
    text = ""
    for _ in range(100):  # about 0.7 s of text arriving every 7 ms
        text += "word "
        await reply.show(text)
        await asyncio.sleep(0.007)
    await reply.finish(text)
    assert list(outlet.messages.values()) == [text.strip()]
    times = [t for t, _ in outlet.writes]
    assert 3 <= len(times) <= 6
    assert all(b - a >= 0.19 for a, b in zip(times, times[1:], strict=False))


async def test_long_reply_continues_in_new_messages() -> None:
    outlet = MemoryOutlet(overhead=20)
    reply = LiveReply(outlet, interval=0.0)
    text = ""
    for i in range(500):
        text += f"Sentence number {i}. "
        if i % 25 == 0:
            text += "\n\n"
        await reply.show(text)
    await reply.finish(text)
    shown = [outlet.messages[i] for i in reply.ids]
    assert len(shown) >= 5
    assert all(len(m) <= 1980 for m in shown)
    assert " ".join(shown).split() == text.split()


async def test_final_text_survives_rate_limits_and_server_errors() -> None:
    outlet = MemoryOutlet()
    reply = LiveReply(outlet, interval=0.0)
    await reply.show("partial")
    outlet.fail_next = [429, 503, 429]
    await reply.finish("the complete answer")
    assert list(outlet.messages.values()) == ["the complete answer"] and reply.ids == list(outlet.messages)


async def test_a_final_update_gives_up_once_its_patience_is_spent() -> None:
    """Discord failing for minutes: one call already took discord.py's own retries (about 25 s for a
    webhook); no further round starts past the patience, where six rounds held the channel for minutes."""
    calls = 0

    async def failing() -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)  # discord.py's own retries, shortened
        raise discord.DiscordServerError(SimpleNamespace(status=503, reason="test", headers={}), "down")  # type: ignore[arg-type]

    with pytest.raises(discord.HTTPException):
        await deliver(failing, patience_s=0.2)  # backoff 0.5 s after the first failure: past the patience
    assert calls == 1


async def test_a_huge_retry_after_is_waited_at_most_a_few_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy's 429 may say Retry-After: 3600; the reply does not wait an hour for it."""
    waited: list[float] = []

    async def no_wait(delay: float) -> None:
        waited.append(delay)

    monkeypatch.setattr(stream.asyncio, "sleep", no_wait)
    failures = [SimpleNamespace(status=429, reason="test", headers={"Retry-After": "3600"})]

    async def rate_limited_once() -> str:
        if failures:
            raise discord.HTTPException(failures.pop(), {"message": "slow down", "code": 0})  # type: ignore[arg-type]
        return "sent"

    assert await deliver(rate_limited_once) == "sent"
    assert waited == [stream.MAX_RETRY_AFTER_S]


async def test_streaming_edit_failure_is_skipped_not_raised() -> None:
    outlet = MemoryOutlet()
    reply = LiveReply(outlet, interval=0.0)
    await reply.show("one")
    outlet.fail_next = [429]
    await reply.show("one two")  # swallowed; the next show catches up
    await reply.show("one two three")
    assert list(outlet.messages.values()) == ["one two three"] and reply.ids == list(outlet.messages)


async def test_a_refused_first_message_raises_and_a_failing_continuation_is_throttled() -> None:
    """No permission to post: the first send raises at once (the caller stops the generation) instead of
    being retried on every token. A continuation message that keeps failing is tried once per interval."""
    outlet = MemoryOutlet(fail_next=[403])
    reply = LiveReply(outlet, limit=40, interval=0.2)
    with pytest.raises(discord.HTTPException) as raised:
        await reply.show("hello")
    assert raised.value.status == 403
    await reply.show("hello")  # Discord lets it through now
    outlet.fail_next = [500] * 50
    await asyncio.sleep(0.25)
    for n in range(20):
        await reply.show("hello " + "more " * (n + 9))  # needs a second message every time
    assert 50 - len(outlet.fail_next) == 1 and len(reply.ids) == 1


async def test_finish_removes_messages_a_shorter_text_no_longer_needs() -> None:
    outlet = MemoryOutlet()
    reply = LiveReply(outlet, interval=0.0)
    await reply.show("a" * 1500 + "\n\n" + "b" * 1500)
    assert len(outlet.messages) == 2
    first = reply.ids[0]
    await reply.finish("short")
    assert list(outlet.messages.values()) == ["short"]
    assert reply.ids == [first]


async def test_a_deleted_webhook_mid_reply_continues_through_a_new_outlet() -> None:
    old, new = MemoryOutlet(), MemoryOutlet(overhead=10)
    reopened: list[MemoryOutlet] = []

    async def reopen(gone: MemoryOutlet) -> MemoryOutlet:  # type: ignore[override]
        reopened.append(gone)
        return new

    reply = LiveReply(old, reopen=reopen, interval=0.0)  # type: ignore[arg-type]
    await reply.show("The story begins")
    old.gone = True
    await reply.show("The story begins, and goes on")
    await reply.finish("The story begins, and goes on to the end.")
    assert reopened == [old]
    assert list(old.messages.values()) == ["The story begins"]  # out of reach, left as it was
    assert list(new.messages.values()) == ["The story begins, and goes on to the end."]
    assert reply.ids == list(new.messages)


async def test_after_a_new_outlet_the_reply_is_sent_again_whole_and_in_order() -> None:
    """The webhook goes while a third message is sent, and the second one changes afterwards: every part
    comes again through the new outlet, in order (re-sending only what changed put part 2 below part 3)."""
    old, new = MemoryOutlet(), MemoryOutlet()

    async def reopen(gone: MemoryOutlet) -> MemoryOutlet:  # type: ignore[override]
        return new

    reply = LiveReply(old, reopen=reopen, interval=0.0)  # type: ignore[arg-type]
    first, second, third = "a" * 1500, "b" * 1500, "c" * 1500
    await reply.show(f"{first}\n\n{second}")
    old.gone = True
    await reply.show(f"{first}\n\n{second}\n\n{third}")
    await reply.finish(f"{first}\n\n{second}!\n\n{third}")
    assert list(old.messages.values()) == [first, second]
    assert list(new.messages.values()) == [first, second + "!", third]
    assert reply.ids == list(new.messages)


async def test_webhooks_deleted_again_and_again_end_in_an_error() -> None:
    outlets: list[MemoryOutlet] = []

    async def reopen(gone: MemoryOutlet) -> MemoryOutlet:  # type: ignore[override]
        outlets.append(MemoryOutlet(gone=True))
        return outlets[-1]

    reply = LiveReply(MemoryOutlet(gone=True), reopen=reopen, interval=0.0)  # type: ignore[arg-type]
    with pytest.raises(discord.NotFound) as raised:
        await reply.finish("hello")
    assert raised.value.code == 10015
    assert len(outlets) == 3 and reply.ids == []


async def test_without_reopen_a_deleted_webhook_is_an_error() -> None:
    outlet = MemoryOutlet(gone=True)
    reply = LiveReply(outlet, interval=0.0)
    with pytest.raises(discord.NotFound) as raised:
        await reply.finish("hello")
    assert raised.value.code == 10015


async def test_a_reply_superseded_after_it_streamed_keeps_its_text_without_a_note() -> None:
    """A released job that already streamed text can be superseded while it waits again: the reply must
    know it (to keep what was shown, with no "stopped" nobody asked for), not get "\n\nsuperseded" to post."""
    from bot.config import Settings
    from bot.conversation import PendingReply
    from bot.discord.chat import SUPERSEDED, ChatCog
    from bot.queue.jobs import GenerationJob, TextDelta
    from bot.queue.memory import MemoryQueue

    queue = MemoryQueue(Settings())
    first = GenerationJob(conversation_key="g1/c2", persona_id="hermes", messages=[{"role": "user", "content": "hi"}])
    await queue.submit(first)
    await queue.fetch(1, 100)
    await queue.publish(TextDelta(job_id=first.job_id, seq=0, text="Partial answer"))
    await queue.release(first.job_id)  # a worker stopping: back in line with its text
    await queue.submit(first.model_copy(update={"job_id": "newer"}), supersede=True)

    async def typing() -> None:
        return None

    outlet = MemoryOutlet()
    pending = PendingReply(job=first, position=1, queue=queue)
    text, ending = await ChatCog._stream(None, SimpleNamespace(typing=typing), LiveReply(outlet), pending, "Hermes 2")  # type: ignore[arg-type]
    assert text == "Partial answer" and ending is SUPERSEDED  # told apart from a notice to show under the text
    await queue.close()
