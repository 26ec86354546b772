"""The one conversation pipeline shared by Discord and the terminal chat.

store the user turn -> load the history window -> persona messages + stops -> GenerationJob -> queue
-> events back -> store the reply. Front ends only decide *when* to answer and *how* to show it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from bot.config import Settings
from bot.personas import Persona, PersonaRegistry
from bot.prompt import ChatTurn, build_messages, stop_strings
from bot.queue.base import JobQueue, QueueBusy
from bot.queue.jobs import Done, ErrorEvent, GenerationJob, TextDelta
from bot.store.keys import ConversationKey
from bot.store.repository import ConversationStore, StoredMessage


class UserShares:
    """Replies on the way (waiting or being written) per user who asked, over every conversation.

    The queue's per-conversation share keeps one channel from filling the line; one person writing in
    many threads or DMs could still fill it for everyone, so each user gets `limit` places at a time.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: Counter[int] = Counter()

    def take(self, user: int | None) -> Callable[[], None]:
        """Hold a place for one more reply to `user` (None: nobody's, e.g. a persona handing off); raises
        QueueBusy when they hold `limit`. The result gives the place back; calling it again does nothing."""
        if user is None:
            return lambda: None
        if self._held[user] >= self.limit:
            raise QueueBusy(self._held[user], "user", self.limit)
        self._held[user] += 1
        given_back = False

        def give_back() -> None:
            nonlocal given_back
            if not given_back:
                given_back = True
                self._held[user] -= 1
                if not self._held[user]:
                    del self._held[user]

        return give_back


@dataclass
class PendingReply:
    """A submitted job: its place in line, its event stream, a way to stop it, and `finished` to call
    when its reply has ended (it gives the asker's place back)."""

    job: GenerationJob
    position: int
    queue: JobQueue
    finished: Callable[[], None] = lambda: None

    async def events(self) -> AsyncIterator[TextDelta | Done | ErrorEvent]:
        async for _event_id, event in self.queue.stream(self.job.job_id):
            yield event

    async def cancel(self) -> None:
        await self.queue.cancel(self.job.job_id)


def to_turn(message: StoredMessage) -> ChatTurn:
    role = message.role if message.role in ("user", "assistant", "system") else "system"
    return ChatTurn(
        role=role,  # type: ignore[arg-type]
        content=message.content,
        author=message.author_name if role == "user" else None,
        persona_id=message.persona_id,
    )


class ChatService:
    def __init__(
        self, settings: Settings, store: ConversationStore, queue: JobQueue, personas: PersonaRegistry
    ) -> None:
        self.settings = settings
        self.store = store
        self.queue = queue
        self.personas = personas
        self.shares = UserShares(settings.queue_max_per_user)

    async def record_user_turn(
        self,
        key: ConversationKey,
        *,
        message_id: int | None,
        author_id: int | None,
        author_name: str,
        content: str,
        reply_to_id: int | None = None,
    ) -> bool:
        """Store a user's message; False when that Discord message was already stored."""
        return await self.store.append(
            key,
            discord_message_id=message_id,
            author_id=author_id,
            author_name=author_name,
            role="user",
            content=content,
            reply_to_id=reply_to_id,
        )

    async def build_job(self, key: ConversationKey, persona: Persona) -> GenerationJob:
        """The job for `persona` answering the newest turns of `key`'s history."""
        window = await self.store.window(key, self.settings.history_turns)
        turns = [to_turn(m) for m in window]
        names = {p.id: p.name for p in self.personas}
        return GenerationJob(
            conversation_key=key.as_str(),
            persona_id=persona.id,
            messages=build_messages(persona, turns, persona_names=names),
            sampling=persona.sampling,
            stop=stop_strings(persona, turns, persona_names=names),
            deadline=time.time() + self.settings.job_timeout_s,
        )

    async def start_reply(self, key: ConversationKey, persona: Persona, *, asker: int | None = None) -> PendingReply:
        """Submit a reply job; raises QueueBusy when the queue, this conversation's share or the share of
        `asker` (the user whose message or command it answers) is full.

        With HERMES_QUEUE_SUPERSEDE the new job replaces the conversation's older waiting ones instead.
        """
        give_back = self.shares.take(asker)
        try:
            job = await self.build_job(key, persona)
            position = await self.queue.submit(job, supersede=self.settings.queue_supersede)
        except BaseException:
            give_back()
            raise
        return PendingReply(job=job, position=position, queue=self.queue, finished=give_back)

    async def store_reply(
        self, key: ConversationKey, persona: Persona, text: str, message_ids: Sequence[int] = ()
    ) -> bool:
        """Store a persona's reply under all the Discord messages it was shown in (none in the terminal)."""
        return await self.store.append(
            key,
            discord_message_id=message_ids[0] if message_ids else None,
            part_ids=message_ids[1:],
            author_id=None,
            author_name=persona.name,
            role="assistant",
            content=text,
            persona_id=persona.id,
        )
