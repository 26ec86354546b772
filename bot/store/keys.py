"""Which Discord scope a conversation belongs to, and its stable string form.

A thread is its own conversation (it carries its parent channel), a DM has no guild. The string form
is what travels in GenerationJob.conversation_key and what the database indexes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PATTERN = re.compile(r"^(?:g(?P<guild>\d+)|dm)/c(?P<channel>\d+)(?:/t(?P<thread>\d+))?$")


@dataclass(frozen=True)
class ConversationKey:
    guild_id: int | None
    channel_id: int
    thread_id: int | None = None

    def as_str(self) -> str:
        """"g1/c2", "g1/c2/t3" or "dm/c2": stable, so stored keys never change meaning."""
        scope = "dm" if self.guild_id is None else f"g{self.guild_id}"
        thread = "" if self.thread_id is None else f"/t{self.thread_id}"
        return f"{scope}/c{self.channel_id}{thread}"

    @property
    def parent(self) -> ConversationKey | None:
        """A thread's parent channel; None for a channel or DM."""
        return None if self.thread_id is None else ConversationKey(self.guild_id, self.channel_id)

    @classmethod
    def from_str(cls, text: str) -> ConversationKey:
        match = _PATTERN.match(text)
        if match is None:
            raise ValueError(f"not a conversation key: {text!r} (expected g<guild>/c<channel>[/t<thread>] or dm/c<channel>)")
        guild, thread = match["guild"], match["thread"]
        return cls(
            guild_id=None if guild is None else int(guild),
            channel_id=int(match["channel"]),
            thread_id=None if thread is None else int(thread),
        )

    def __str__(self) -> str:
        return self.as_str()
