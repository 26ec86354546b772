"""Show a growing reply in Discord: throttled edits, continuation messages, guaranteed final text.

`LiveReply.show` is called as text arrives and only touches Discord when a message is due (at most
one edit per second per message); `finish` delivers the final text exactly, waiting out the
throttle and retrying rate limits and server errors, so the last word is never lost. If a moderator
deletes the webhook mid-reply, `reopen` supplies a new outlet and the whole text is sent again through
it, split for its limit, below what was shown (the old webhook's messages can no longer be edited or
removed, so they stay as they were): continuing only the messages that still change would put a later
part above an earlier one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import aiohttp
import discord

from bot.discord.split import DISCORD_LIMIT, split_message

log = logging.getLogger(__name__)

EDIT_INTERVAL_S = 1.0
FINAL_ATTEMPTS = 6
FINAL_PATIENCE_S = 20.0  # no new attempt at a final update once this long has passed
MAX_RETRY_AFTER_S = 10.0  # a Retry-After beyond this (a proxy's, not Discord's) is waited this long at most
UNKNOWN_WEBHOOK = 10015  # Discord's error code once a moderator deleted the webhook
MAX_REOPENS = 3  # new outlets one reply may take; after that a deleted webhook fails the reply
T = TypeVar("T")


class Outlet(Protocol):
    """Where a reply's messages go: a persona webhook, or the bot's own messages."""

    overhead: int  # characters every message spends on decoration (e.g. a bold name)

    async def send(self, content: str) -> int: ...

    async def edit(self, message_id: int, content: str) -> None: ...

    async def delete(self, message_id: int) -> None: ...


Reopen = Callable[["Outlet"], Awaitable["Outlet"]]  # a replacement for an outlet whose webhook is gone


# What a Discord call fails with: Discord's answer, or the network on the way (discord.py retries a
# reset itself only on macOS and Windows errnos; a dropped connection reaches us as aiohttp's error).
DISCORD_FAILURES = (discord.HTTPException, aiohttp.ClientError, OSError)


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, discord.HTTPException):
        return exc.status == 429 or exc.status >= 500
    return isinstance(exc, DISCORD_FAILURES)


async def deliver(
    call: Callable[[], Awaitable[T]], *, attempts: int = FINAL_ATTEMPTS, patience_s: float = FINAL_PATIENCE_S
) -> T:
    """Run a Discord call until it succeeds; 429s, 5xx and network errors are retried with backoff while
    `patience_s` lasts, others raise. discord.py itself retries a webhook's 5xx for about 25 s within one
    call: six rounds of that held a reply, and every other reply in its channel, for minutes."""
    started = time.monotonic()
    for attempt in range(attempts):
        try:
            return await call()
        except Exception as exc:
            if not _retryable(exc) or attempt == attempts - 1:
                raise
            retry_after = getattr(getattr(exc, "response", None), "headers", {}).get("Retry-After")
            delay = min(float(retry_after), MAX_RETRY_AFTER_S) if retry_after else min(0.5 * 2**attempt, 8.0)
            if time.monotonic() - started + delay > patience_s:
                raise
            log.warning("discord call failed (%s); retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


class LiveReply:
    """The Discord messages carrying one reply, kept in step with its text."""

    def __init__(
        self, outlet: Outlet, *, reopen: Reopen | None = None, on_send: Callable[[int], None] | None = None,
        limit: int = DISCORD_LIMIT, interval: float = EDIT_INTERVAL_S,
    ) -> None:
        """`on_send` hears each new message's id as soon as it exists, long before the reply is finished."""
        self.outlet, self.reopen, self.on_send = outlet, reopen, on_send
        self._limit = limit
        self.interval = interval
        self.ids: list[int] = []
        self._shown: list[str] = []
        self._touched: list[float] = []
        self._reopens = 0
        self._sends_paused_until = 0.0  # after a failed send, like an edit, the next try waits an interval

    @property
    def limit(self) -> int:
        return self._limit - self.outlet.overhead

    def _due_in(self, index: int) -> float:
        return self._touched[index] + self.interval - time.monotonic()

    async def show(self, text: str) -> None:
        """Bring Discord closer to `text` without waiting: skip edits that are not due yet. While the
        newest message is not due, nothing is split at all (text arrives far more often than edits).

        A failed update is left for the next show or finish to catch up, except a refusal that will not
        pass (no permission to post, the channel, thread or message gone, DMs closed): that raises, so the
        reply stops at once instead of being written to the end for nobody."""
        await self._starting_over_if_reopened(self._show, text)

    async def _show(self, text: str) -> None:
        now = time.monotonic()
        if now < self._sends_paused_until or (self.ids and self._due_in(len(self.ids) - 1) > 0):
            return
        for index, chunk in enumerate(split_message(text, self.limit)):
            sending = index >= len(self.ids)
            try:
                if sending:
                    await self._send(chunk)
                elif chunk != self._shown[index] and self._due_in(index) <= 0:
                    await self._edit(index, chunk)
            except DISCORD_FAILURES as exc:
                if not _retryable(exc):
                    raise
                if sending:
                    self._sends_paused_until = time.monotonic() + self.interval
                log.warning("streaming update failed: %s", exc)
                return

    async def finish(self, text: str) -> None:
        """Make Discord show exactly `text`; extra messages from an earlier, longer text are removed."""
        await self._starting_over_if_reopened(self._finish, text)

    @staticmethod
    async def _starting_over_if_reopened(update: Callable[[str], Awaitable[None]], text: str) -> None:
        """`update(text)`, again from the start each time the reply moved to a new outlet (bounded: a reply
        takes at most MAX_REOPENS of them, then the deleted webhook's error is raised)."""
        while True:
            try:
                return await update(text)
            except _Reopened:
                continue

    async def _finish(self, text: str) -> None:
        chunks = split_message(text, self.limit) or ["…"]
        for index, chunk in enumerate(chunks):
            if index >= len(self.ids):
                await deliver(lambda chunk=chunk: self._send(chunk))
            elif chunk != self._shown[index]:
                await asyncio.sleep(max(0.0, self._due_in(index)))
                await deliver(lambda index=index, chunk=chunk: self._edit(index, chunk))
        await self._delete_from(len(chunks))

    async def withdraw(self) -> None:
        """Remove every message shown: the waiting notice of a job that a newer message replaced."""
        await self._starting_over_if_reopened(lambda _: self._delete_from(0), "")

    async def _delete_from(self, first: int) -> None:
        for message_id in self.ids[first:]:
            await deliver(lambda message_id=message_id: self._through_live_outlet(lambda: self.outlet.delete(message_id)))
        del self.ids[first:], self._shown[first:], self._touched[first:]

    async def _send(self, chunk: str) -> None:
        message_id = await self._through_live_outlet(lambda: self.outlet.send(chunk))
        if self.on_send is not None:
            self.on_send(message_id)
        self.ids.append(message_id)
        self._shown.append(chunk)
        self._touched.append(time.monotonic())

    async def _edit(self, index: int, chunk: str) -> None:
        self._touched[index] = time.monotonic()
        await self._through_live_outlet(lambda: self.outlet.edit(self.ids[index], chunk))
        self._shown[index] = chunk
        self._touched[index] = time.monotonic()

    async def _through_live_outlet(self, call: Callable[[], Awaitable[T]]) -> T:
        """`call`, or, when the outlet's webhook was deleted, a new outlet and `_Reopened`."""
        try:
            return await call()
        except discord.NotFound as exc:
            if exc.code != UNKNOWN_WEBHOOK or self.reopen is None or self._reopens == MAX_REOPENS:
                raise
            self._reopens += 1
            self.outlet = await self.reopen(self.outlet)
            self.ids, self._shown, self._touched = [], [], []  # left as they were, out of reach
            self._sends_paused_until = 0.0
            raise _Reopened from None


class _Reopened(Exception):
    """The reply moved to a new outlet and shows nothing there yet: the update starts over."""
