"""Prometheus metrics of the bot and the worker, and the helpers their code calls.

The collectors are module-level and live in this module's own `REGISTRY` (not prometheus_client's
global default), because every part of one process reports into the same set: in the embedded
default the worker runs inside the bot process and both write here. `/metrics` (bot.health) serves
exactly this registry, plus the standard process and platform collectors.

Callers use the small functions below, never the collectors, so names and buckets stay in one place.
Tokens per second is not a gauge: it is `rate(hermes_generated_tokens_total[1m]) /
rate(hermes_generation_seconds_sum[1m])`, which stays correct over any scrape interval.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

# Seconds: from a few milliseconds (a warm queue) to minutes (a long reply on a busy worker).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

QUEUE_DEPTH = Gauge("hermes_queue_depth", "Generation jobs waiting in the queue.", registry=REGISTRY)
JOB_WAIT = Histogram(
    "hermes_job_wait_seconds",
    "Time a job waited in the queue before a worker started it.",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
GENERATION_TIME = Histogram(
    "hermes_generation_seconds",
    "Time a worker spent generating one reply, from start to its last token.",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
FIRST_TOKEN_TIME = Histogram(
    "hermes_time_to_first_token_seconds",
    "Time from a job's start on the worker to its first text delta.",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
GENERATED_TOKENS = Counter(
    "hermes_generated_tokens", "Completion tokens generated (with hermes_generation_seconds: tokens/s).",
    registry=REGISTRY,
)
ACTIVE_CONVERSATIONS = Gauge(
    "hermes_active_conversations", "Conversations with a reply being generated right now.", registry=REGISTRY
)
DISCORD_EVENTS = Counter(
    "hermes_discord_events", "Discord events handled, by type.", ["type"], registry=REGISTRY
)
ERRORS = Counter("hermes_errors", "Errors, by kind.", ["kind"], registry=REGISTRY)
# Apart from ERRORS: the worker has already counted an engine's failure there, in its own process or (memory://)
# in this one, and summing both sides counted every failure twice.
FAILED_REPLIES = Counter(
    "hermes_failed_replies", "Replies that ended in an error, by the error's kind (bot side).", ["kind"],
    registry=REGISTRY,
)


def set_queue_depth(waiting: int) -> None:
    """Report how many jobs wait in the queue (call after enqueue/dequeue or on a timer)."""
    QUEUE_DEPTH.set(waiting)


def observe_job_wait(seconds: float) -> None:
    """Report how long a job waited before a worker started it (start time - job.created_at)."""
    JOB_WAIT.observe(max(seconds, 0.0))


def observe_first_token(seconds: float) -> None:
    """Report the time from a job's start on the worker to its first text delta."""
    FIRST_TOKEN_TIME.observe(max(seconds, 0.0))


def observe_generation(seconds: float, completion_tokens: int) -> None:
    """Report one finished generation: its duration and how many tokens it produced."""
    GENERATION_TIME.observe(max(seconds, 0.0))
    GENERATED_TOKENS.inc(max(completion_tokens, 0))


def set_active_conversations(count: int) -> None:
    """Report how many conversations have a reply in generation (the worker's current batch)."""
    ACTIVE_CONVERSATIONS.set(count)


def count_discord_event(event_type: str) -> None:
    """Count one handled Discord event, e.g. "message", "interaction", "reaction"."""
    DISCORD_EVENTS.labels(type=event_type).inc()


def count_error(kind: str) -> None:
    """Count one error where it happened, by a short machine-readable kind ("busy", "engine")."""
    ERRORS.labels(kind=kind).inc()


def count_failed_reply(kind: str) -> None:
    """Count one reply the bot saw end in an error, by its ErrorEvent.kind ("engine", "timeout")."""
    FAILED_REPLIES.labels(kind=kind).inc()
