"""When the bot answers a message, and which persona does.

Pure decisions on a few facts about the message, so the rules read in one place and are tested
without Discord: a mention, a reply to a persona, a DM, a name or wake word at the start, or a
channel with auto-respond on. The addressed persona answers (name beats reply), else the default.
"""

from __future__ import annotations

from dataclasses import dataclass

from bot.personas import Persona, PersonaRegistry
from bot.store.repository import ChannelSettings


@dataclass(frozen=True)
class Signals:
    """What the front end learned about one incoming message."""

    text: str  # the message text without a leading mention of the bot
    is_dm: bool = False
    mentions_bot: bool = False
    replies_to_bot: bool = False
    reply_persona: str | None = None  # persona that wrote the message being replied to


def active_personas(channel: ChannelSettings, registry: PersonaRegistry, fallback: str) -> list[str]:
    """The channel's default first, then the personas added to it; unknown ids are skipped. A channel
    whose default is no longer loaded (its file removed or renamed) gets the bot's default instead, so
    mentions there still get an answer."""
    default = channel.default_persona if channel.default_persona in registry else fallback
    ids = [default, *channel.personas]
    return [pid for i, pid in enumerate(ids) if pid in registry and pid not in ids[:i]]


def choose_persona(
    signals: Signals, channel: ChannelSettings, registry: PersonaRegistry, fallback: str
) -> Persona | None:
    """The persona that answers, or None when the message is not for the bot."""
    active = active_personas(channel, registry, fallback)
    addressed = registry.find_addressed(signals.text, active) if active else None
    # A reply to a persona that has left this channel (`/persona remove`, a new default) is a reply to
    # the bot: the channel's default answers it, not the persona a moderator sent away.
    replied = signals.reply_persona if signals.reply_persona in active else None
    triggered = (
        signals.is_dm
        or signals.mentions_bot
        or signals.replies_to_bot
        or signals.reply_persona is not None
        or addressed is not None
        or channel.autorespond
    )
    if not triggered:
        return None
    if addressed is not None:
        return addressed
    if replied is not None:
        return registry.get(replied)
    return registry.get(active[0]) if active else None
