"""Slash commands: /persona list|set|add|remove|show, /reset, /regenerate, /stop, /autorespond.

Every command defers first (Discord wants an answer within 3 s; the store may be slower) and then
answers ephemerally. Changing a channel needs Manage Channels or the configured admin role; anyone
may look. In a DM the user owns the conversation and may change it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot import metrics
from bot.config import Settings
from bot.discord.chat import STORE_DOWN, Asked, ChatCog, conversation_key
from bot.discord.identity import BotOutlet, PersonaOutlet
from bot.discord.split import clip
from bot.discord.stream import DISCORD_FAILURES
from bot.discord.triggers import active_personas
from bot.personas import Persona, PersonaRegistry
from bot.queue.base import QueueUnavailable
from bot.store.db import StoreUnavailable
from bot.store.keys import ConversationKey

log = logging.getLogger(__name__)

LIST_LIMIT = 1900  # under Discord's 2000, with room for the "more" line
ECHO_LIMIT = 64  # characters of a user's argument repeated in an answer
CHOICE_NAME_LIMIT = 100  # Discord refuses a whole autocomplete answer if one choice's name is longer

COMMAND_FAILED = "Sorry, that didn't work: Discord or the reply service refused it. Please try again."
NOT_ALLOWED = "You need the Manage Channels permission{role} to change this channel's settings."


def fit_lines(lines: list[str], limit: int) -> str:
    """Whole lines joined while they fit in `limit`, then a count of the ones left out."""
    kept: list[str] = []
    size = 0
    for line in lines:
        size += len(line) + 1
        if size > limit:
            return "\n".join([*kept, f"…and {len(lines) - len(kept)} more."])
        kept.append(line)
    return "\n".join(kept)


async def _remove(deleters: Sequence[PersonaOutlet], message_id: int) -> bool:
    """Delete one message of a reply, whichever way it was sent: through today's outlet, else as the bot
    (a reply the bot sent itself before it had a webhook here, or one sent through a webhook a moderator
    has since replaced). False when it is still there: the bot may not delete others' messages here."""
    for deleter in deleters:
        try:
            await deleter.delete(message_id)
            return True
        except discord.NotFound:  # not sent this way, or already gone: the bot's own delete tells which
            continue
        except discord.Forbidden:
            return False
    return True


def persona_choice(persona: Persona) -> app_commands.Choice[str]:
    """An autocomplete choice "Name (id)": a long name is cut, the id always shows whole."""
    suffix = f" ({persona.id})"
    return app_commands.Choice(name=clip(persona.name, CHOICE_NAME_LIMIT - len(suffix)) + suffix, value=persona.id)


def may_change(interaction: discord.Interaction, admin_role: str | None) -> bool:
    """Manage Channels in this channel, the admin role (by id when HERMES_ADMIN_ROLE is digits, else by name:
    anyone who may create roles can make one of that name), or a DM."""
    if interaction.guild is None:
        return True
    if interaction.permissions.manage_channels:
        return True
    roles = getattr(interaction.user, "roles", [])
    if admin_role is None:
        return False
    if _is_role_id(admin_role):  # by id only: a role *named* with those digits is anyone's to make
        return any(str(role.id) == admin_role for role in roles)
    return any(role.name == admin_role for role in roles)


def _is_role_id(admin_role: str) -> bool:
    return admin_role.isascii() and admin_role.isdigit()


def admin_role_name(interaction: discord.Interaction, admin_role: str) -> str:
    """The admin role as people see it: its name, also when HERMES_ADMIN_ROLE gives its id."""
    role = interaction.guild.get_role(int(admin_role)) if _is_role_id(admin_role) and interaction.guild else None
    return role.name if role else admin_role


def _with_persona(
    change: Callable[[CommandsCog, discord.Interaction, Persona], Awaitable[str]],
) -> Callable[[CommandsCog, discord.Interaction, str], Awaitable[str]]:
    """An action on a persona id: unknown ids get the list of known ones, else `change` runs on the persona."""

    @functools.wraps(change)
    async def action(cog: CommandsCog, interaction: discord.Interaction, persona_id: str) -> str:
        if persona_id not in cog.personas:
            return cog._unknown(persona_id)
        return await change(cog, interaction, cog.personas.get(persona_id))

    return action


class PersonaGroup(app_commands.Group):
    def __init__(self, cog: CommandsCog) -> None:
        super().__init__(name="persona", description="Choose who talks in this channel")
        self.cog = cog

    async def _persona_choices(self, _: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        found = [p for p in self.cog.personas if current.lower() in f"{p.id} {p.name}".lower()]
        return [persona_choice(p) for p in found[:25]]

    @app_commands.command(name="list", description="All personas this bot knows")
    async def list_(self, interaction: discord.Interaction) -> None:
        await self.cog.answer(interaction, None, self.cog.list_text, managers_only=False)

    @app_commands.command(name="show", description="Who answers in this channel")
    async def show(self, interaction: discord.Interaction) -> None:
        await self.cog.answer(interaction, None, self.cog.show_text, managers_only=False)

    @app_commands.command(name="set", description="Set the persona that answers here by default")
    @app_commands.describe(persona="persona id")
    async def set_(self, interaction: discord.Interaction, persona: str) -> None:
        await self.cog.answer(interaction, persona, self.cog.set_default, managers_only=True)

    @app_commands.command(name="add", description="Let one more persona take part here")
    @app_commands.describe(persona="persona id")
    async def add(self, interaction: discord.Interaction, persona: str) -> None:
        await self.cog.answer(interaction, persona, self.cog.add, managers_only=True)

    @app_commands.command(name="remove", description="Stop a persona taking part here")
    @app_commands.describe(persona="persona id")
    async def remove(self, interaction: discord.Interaction, persona: str) -> None:
        await self.cog.answer(interaction, persona, self.cog.remove, managers_only=True)

    set_.autocomplete("persona")(_persona_choices)
    add.autocomplete("persona")(_persona_choices)
    remove.autocomplete("persona")(_persona_choices)


class CommandsCog(commands.Cog):
    def __init__(self, bot: commands.Bot, settings: Settings, chat: ChatCog) -> None:
        self.bot, self.settings, self.chat = bot, settings, chat
        self.personas: PersonaRegistry = chat.chat.personas
        self.store = chat.chat.store
        # Conversations whose last reply a /regenerate is replacing: claimed before its first await and
        # released when the new reply ends, so a second /regenerate cannot erase the turn before it.
        self.regenerating: set[ConversationKey] = set()
        bot.tree.add_command(PersonaGroup(self))

    async def answer(  # type: ignore[no-untyped-def]
        self, interaction: discord.Interaction, argument: str | None, action, *, managers_only: bool
    ) -> None:
        """Defer, check the permission when the command changes this channel's settings, run `action`,
        answer with its text (only the user who asked sees it)."""
        metrics.count_discord_event("interaction")
        await interaction.response.defer(ephemeral=True, thinking=True)
        self.personas.refresh(required=self.settings.default_persona)
        if managers_only and not may_change(interaction, self.settings.admin_role):
            role = f" or the {admin_role_name(interaction, self.settings.admin_role)} role" if self.settings.admin_role else ""
            text = NOT_ALLOWED.format(role=role)
        else:
            try:
                text = await (action(interaction) if argument is None else action(interaction, argument))
            except StoreUnavailable as exc:
                metrics.count_error("store_unavailable")
                log.warning("database unavailable; a command was not done: %s", exc)
                text = STORE_DOWN
            except (QueueUnavailable, *DISCORD_FAILURES) as exc:  # the user still gets an answer
                log.warning("a command failed: %s", exc)
                text = COMMAND_FAILED
        await interaction.followup.send(clip(text), ephemeral=True, allowed_mentions=discord.AllowedMentions.none())

    def _unknown(self, persona_id: str) -> str:
        known = ", ".join(p.id for p in self.personas)
        shown = discord.utils.escape_markdown(clip(persona_id, ECHO_LIMIT))
        return f"I don't know a persona called `{shown}`. Known: {known}."

    # ----- actions: each returns the text of the answer -----

    async def list_text(self, _: discord.Interaction) -> str:
        lines = [f"**{p.name}** (`{p.id}`) {p.description}".rstrip() for p in self.personas]
        return fit_lines(lines, LIST_LIMIT)

    async def show_text(self, interaction: discord.Interaction) -> str:
        channel = await self.store.get_settings(conversation_key(interaction.channel))
        active = active_personas(channel, self.personas, self.settings.default_persona)
        names = ", ".join(self.personas.get(pid).name for pid in active[1:]) or "none"
        default = self.personas.get(active[0]).name if active else "none"
        state = "on" if channel.autorespond else "off"
        source = " (the parent channel's, until one is changed in this thread)" if channel.inherited else ""
        return f"Default persona: **{default}**. Also here: {names}. Auto-respond: {state}.{source}"

    async def _active_here(self, key: ConversationKey) -> list[str]:
        return active_personas(await self.store.get_settings(key), self.personas, self.settings.default_persona)

    @_with_persona
    async def set_default(self, interaction: discord.Interaction, persona: Persona) -> str:
        key = conversation_key(interaction.channel)
        was_here = persona.id in await self._active_here(key)  # added earlier: it greeted then
        await self.store.set_default_persona(key, persona.id)
        if not was_here:
            await self.chat.introduce(interaction.channel, key, persona)  # type: ignore[arg-type]
        return f"**{persona.name}** now answers here by default."

    @_with_persona
    async def add(self, interaction: discord.Interaction, persona: Persona) -> str:
        key = conversation_key(interaction.channel)
        was_here = persona.id in await self._active_here(key)
        await self.store.add_persona(key, persona.id)
        if not was_here:
            await self.chat.introduce(interaction.channel, key, persona)  # type: ignore[arg-type]
        words = ", ".join(persona.addressed_by())
        return f"**{persona.name}** joins this channel. Address them by starting with: {words}."

    @_with_persona
    async def remove(self, interaction: discord.Interaction, persona: Persona) -> str:
        key = conversation_key(interaction.channel)
        channel = await self.store.get_settings(key)
        active = active_personas(channel, self.personas, self.settings.default_persona)
        if persona.id not in active:
            return f"**{persona.name}** is not taking part here."
        if active[0] == persona.id == self.settings.default_persona:  # removing it would change nothing
            return (f"**{persona.name}** is the bot's default persona: it answers here unless this channel has "
                    "another default. Choose one with `/persona set`.")
        await self.store.remove_persona(key, persona.id)
        if channel.default_persona == persona.id:
            await self.store.set_default_persona(key, None)
        return f"**{persona.name}** left this channel."

    @app_commands.command(name="reset", description="Start a fresh conversation here (forget the context)")
    async def reset_command(self, interaction: discord.Interaction) -> None:
        await self.answer(interaction, None, self.reset, managers_only=True)

    async def reset(self, interaction: discord.Interaction) -> str:
        key = conversation_key(interaction.channel)
        stopped = await self.chat.leave_out_running(key)  # first: a reply being stored now is then left out
        await self.store.reset(key)
        note = " The reply being written was stopped." if stopped else ""
        return f"Fresh start: earlier messages here are no longer part of the conversation.{note}"

    @app_commands.command(name="autorespond", description="Answer every message here, not only mentions")
    async def autorespond_command(self, interaction: discord.Interaction, mode: Literal["on", "off"]) -> None:
        await self.answer(interaction, mode, self.autorespond, managers_only=True)

    async def autorespond(self, interaction: discord.Interaction, mode: str) -> str:
        await self.store.set_autorespond(conversation_key(interaction.channel), mode == "on")
        return f"Auto-respond is {mode} here."

    @app_commands.command(name="stop", description="Stop the reply being written here")
    async def stop_command(self, interaction: discord.Interaction) -> None:
        await self.answer(interaction, None, self.stop, managers_only=False)

    async def stop(self, interaction: discord.Interaction) -> str:
        stopped = await self.chat.stop_running(conversation_key(interaction.channel))
        if not stopped:
            return "Nothing is being written here right now."
        return "Stopped." if stopped == 1 else f"Stopped all {stopped} replies."

    @app_commands.command(name="forget-me", description="Erase everything you wrote from the bot's memory, everywhere")
    async def forget_me_command(self, interaction: discord.Interaction) -> None:
        await self.answer(interaction, None, self.forget_me, managers_only=False)

    async def forget_me(self, interaction: discord.Interaction) -> str:
        erased = await self.store.forget_user(interaction.user.id)
        if not erased:
            return "I had nothing you wrote in my memory."
        messages = "message" if erased == 1 else "messages"
        return (
            f"Done: I erased {erased} {messages} of yours from my memory, in every channel. "
            "What you write from now on is remembered again where I take part."
        )

    @app_commands.command(name="regenerate", description="Replace the last reply here with a new one")
    async def regenerate_command(self, interaction: discord.Interaction) -> None:
        await self.answer(interaction, None, self.regenerate, managers_only=False)

    async def regenerate(self, interaction: discord.Interaction) -> str:
        key = conversation_key(interaction.channel)
        if key in self.chat.running or key in self.regenerating:
            return "A reply is still being written here; use /stop first."
        self.regenerating.add(key)
        try:
            answer, reply = await self._replace_last_reply(interaction, key)
        except BaseException:
            self.regenerating.discard(key)
            raise
        if reply is None:
            self.regenerating.discard(key)
        else:
            reply.add_done_callback(lambda _: self.regenerating.discard(key))
        return answer

    async def _replace_last_reply(
        self, interaction: discord.Interaction, key: ConversationKey
    ) -> tuple[str, asyncio.Task[None] | None]:
        """Delete the last reply here (every part) and start writing a new one: the answer, and the
        task writing it (None when there was nothing to replace). When the newest attempt failed (an
        error, "no reply": shown but never stored), that attempt is the one replaced, and the stored
        reply before it stays."""
        failed = self.chat.unstored.pop(key, None)
        turn = None
        if failed is not None and failed[0] in self.personas:
            persona, ids = self.personas.get(failed[0]), list(failed[1])
        else:
            turn = await self.store.last_assistant_turn(key)
            if turn is None or turn.discord_message_id is None or turn.persona_id not in self.personas:
                return "There is no reply here to regenerate.", None
            persona, ids = self.personas.get(turn.persona_id), await self.store.discord_ids(turn)
        outlet = await self.chat.identities.outlet(interaction.channel, persona)  # type: ignore[arg-type]
        deleters = [outlet] if isinstance(outlet, BotOutlet) else [outlet, BotOutlet(interaction.channel, persona)]  # type: ignore[arg-type]
        kept = [message_id for message_id in ids if not await _remove(deleters, message_id)]
        if turn is not None and turn.discord_message_id is not None:
            await self.store.delete_message(turn.discord_message_id)  # erases the whole turn, every part
        task = asyncio.create_task(
            self.chat.reply(interaction.channel, key, persona, asked=Asked(interaction.user.id))  # type: ignore[arg-type]
        )
        self.chat.background.add(task)
        task.add_done_callback(self.chat.background.discard)
        note = " The old one stays in the channel: removing it needs the Manage Messages permission." if kept else ""
        return f"Writing a new reply as **{persona.name}**.{note}", task
