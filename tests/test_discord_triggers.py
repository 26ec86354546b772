"""Trigger rules and persona choice, on the shipped personas."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.discord.triggers import Signals, active_personas, choose_persona
from bot.personas import PersonaRegistry
from bot.store.repository import ChannelSettings


@pytest.fixture(scope="module")
def registry() -> PersonaRegistry:
    return PersonaRegistry.load(Path(__file__).resolve().parent.parent / "personas")


def pick(registry: PersonaRegistry, signals: Signals, channel: ChannelSettings | None = None) -> str | None:
    persona = choose_persona(signals, channel or ChannelSettings(), registry, "hermes")
    return None if persona is None else persona.id


def test_plain_chatter_is_ignored(registry: PersonaRegistry) -> None:
    assert pick(registry, Signals("what a nice day")) is None
    # A persona that is not active in the channel is not woken by its name.
    assert pick(registry, Signals("Edward, hi")) is None


@pytest.mark.parametrize(
    "signals",
    [Signals("hi", is_dm=True), Signals("hi", mentions_bot=True), Signals("hi", replies_to_bot=True)],
)
def test_dm_mention_and_reply_wake_the_default(registry: PersonaRegistry, signals: Signals) -> None:
    assert pick(registry, signals) == "hermes"
    assert pick(registry, signals, ChannelSettings(default_persona="narrator")) == "narrator"


def test_wake_word_and_name_pick_the_active_persona(registry: PersonaRegistry) -> None:
    channel = ChannelSettings(personas=["edward_elric", "sherlock_holmes"])
    assert pick(registry, Signals("Edward, how tall are you?"), channel) == "edward_elric"
    assert pick(registry, Signals("sherlock: who did it"), channel) == "sherlock_holmes"
    assert pick(registry, Signals("hermes what's up"), channel) == "hermes"
    assert pick(registry, Signals("editing is fun"), channel) is None  # "ed" must be a whole word


def test_reply_to_a_persona_goes_to_that_persona_unless_another_is_named(registry: PersonaRegistry) -> None:
    channel = ChannelSettings(personas=["edward_elric"])
    assert pick(registry, Signals("and then?", reply_persona="edward_elric"), channel) == "edward_elric"
    assert pick(registry, Signals("Hermes, is he right?", reply_persona="edward_elric"), channel) == "hermes"


def test_a_reply_to_a_persona_that_left_the_channel_goes_to_the_default(registry: PersonaRegistry) -> None:
    """After `/persona remove edward_elric`, a reply to one of his old messages must not bring him back."""
    assert pick(registry, Signals("and then?", reply_persona="edward_elric"), ChannelSettings()) == "hermes"
    assert pick(registry, Signals("and then?", reply_persona="gone_persona"), ChannelSettings()) == "hermes"


def test_autorespond_answers_everything_with_the_default(registry: PersonaRegistry) -> None:
    channel = ChannelSettings(default_persona="narrator", autorespond=True)
    assert pick(registry, Signals("the door creaks"), channel) == "narrator"


def test_active_personas_dedupes_and_skips_unknown(registry: PersonaRegistry) -> None:
    channel = ChannelSettings(default_persona="edward_elric", personas=["edward_elric", "gone", "hermes"])
    assert active_personas(channel, registry, "hermes") == ["edward_elric", "hermes"]


def test_a_channel_whose_default_persona_is_gone_falls_back_to_the_bots(registry: PersonaRegistry) -> None:
    """The channel chose a persona whose file was later removed: mentions must still get an answer."""
    channel = ChannelSettings(default_persona="gone", personas=["edward_elric"])
    assert active_personas(channel, registry, "hermes") == ["hermes", "edward_elric"]
    assert pick(registry, Signals("hi", mentions_bot=True), channel) == "hermes"
