"""Engines: what turns a GenerationJob's messages into streamed text. `make_engine` picks one from settings."""

from __future__ import annotations

from bot.config import Settings
from bot.engine.base import Engine, EngineError, Finish, GenerationRequest, GenerationStream, TextChunk

__all__ = [
    "Engine", "EngineError", "Finish", "GenerationRequest", "GenerationStream", "TextChunk", "check_settings",
    "make_engine",
]


def make_engine(settings: Settings) -> Engine:
    """The engine HERMES_ENGINE names; heavy imports (torch) happen only for the one chosen."""
    if settings.engine == "openai":
        from bot.engine.openai_engine import OpenAIEngine

        return OpenAIEngine(settings)
    from bot.engine.transformers_engine import TransformersEngine

    return TransformersEngine(settings)


def check_settings(settings: Settings) -> None:
    """EngineError for an engine setting that cannot work, found without loading a model or asking a server: what
    the engine's start would say, told before a process logs in to Discord or says it started."""
    if settings.engine == "openai":
        from bot.engine.openai_engine import check_settings as check
    else:
        from bot.engine.transformers_engine import check_settings as check
    check(settings)
