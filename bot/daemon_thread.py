"""Blocking calls awaited from the event loop on threads that never hold the process open.

`asyncio.to_thread` runs on the loop's default executor, which `asyncio.run` joins at exit: a process told
to stop (a signal, a refused token) while a model loads, or while `hermes-bot chat` waits for a line of
input, would wait for the load to finish or for Enter. A daemon thread of its own is simply left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def in_daemon_thread(fn: Callable[[], T], *, name: str) -> T:
    """`fn()` on a new daemon thread; its result (or exception) once it returns."""
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[T] = loop.create_future()

    def settle(set_outcome: Callable[[], object]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for the result any more
            loop.call_soon_threadsafe(lambda: outcome.done() or set_outcome())

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:  # handed to the awaiting coroutine
            settle(functools.partial(outcome.set_exception, exc))
        else:
            settle(functools.partial(outcome.set_result, result))

    threading.Thread(target=run, name=name, daemon=True).start()
    return await outcome
