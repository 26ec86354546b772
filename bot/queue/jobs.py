"""The wire types between bot and worker: a GenerationJob and the events that answer it.

Both travel as JSON (Redis Streams fields, or in-process objects), so they are pydantic models with a
`type` discriminator on events.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, TypeAdapter

from bot.personas import Sampling
from bot.text_safety import well_formed

# Text that crosses the Redis transport as JSON: a lone surrogate (a server's or Discord's JSON may carry one)
# cannot be serialised, and the whole reply would fail on that one character.
WireText = Annotated[str, AfterValidator(well_formed)]


def new_job_id() -> str:
    return uuid.uuid4().hex


class GenerationJob(BaseModel):
    """One reply to generate. `messages` are model messages (role, content) before the token budget."""

    job_id: str = Field(default_factory=new_job_id)
    conversation_key: str
    persona_id: str
    messages: list[dict[str, WireText]]
    sampling: Sampling = Field(default_factory=Sampling)
    stop: list[WireText] = Field(default_factory=list)
    created_at: float = Field(default_factory=time.time)
    deadline: float | None = None  # unix time; the worker gives up with finish_reason "deadline"

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now if now is not None else time.time()) >= self.deadline


class DeadLetter(BaseModel):
    """A job set aside after too many deliveries, as both queues keep it: what an operator needs to look
    into it. Not its messages (users' text, which /forget-me could not reach there) nor its stop strings
    (they name the participants)."""

    job_id: str
    conversation_key: str
    persona_id: str
    created_at: float
    deliveries: int
    reason: str
    dead_at: float  # unix time it was set aside

    @classmethod
    def of(cls, job: GenerationJob, deliveries: int, reason: str) -> DeadLetter:
        return cls(job_id=job.job_id, conversation_key=job.conversation_key, persona_id=job.persona_id,
                   created_at=job.created_at, deliveries=deliveries, reason=reason, dead_at=time.time())


FinishReason = Literal["stop", "length", "cancelled", "superseded", "deadline", "error"]


class TextDelta(BaseModel):
    """New text, in order; `seq` starts at 0 for each job."""

    type: Literal["delta"] = "delta"
    job_id: str
    seq: int
    text: WireText


class Done(BaseModel):
    """The last event of a job that ended normally, by a stop, by length, by cancel or deadline."""

    type: Literal["done"] = "done"
    job_id: str
    finish_reason: FinishReason
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ErrorEvent(BaseModel):
    """The last event of a job that failed. `kind` is short and machine-readable (busy, dead_letter, engine...)."""

    type: Literal["error"] = "error"
    job_id: str
    kind: str
    message: WireText


Event = Annotated[TextDelta | Done | ErrorEvent, Field(discriminator="type")]
_EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def event_to_json(event: TextDelta | Done | ErrorEvent) -> str:
    return event.model_dump_json()


def event_from_json(data: str | bytes) -> TextDelta | Done | ErrorEvent:
    return _EVENT_ADAPTER.validate_json(data)


def is_final(event: TextDelta | Done | ErrorEvent) -> bool:
    return not isinstance(event, TextDelta)
