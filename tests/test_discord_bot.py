"""End to end: the real discord.py client in BotApp against the fake Discord, replies from the
scripted OpenAI-compatible server through the in-process queue and worker, history in SQLite."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import asyncpg
import pytest

from bot import metrics
from bot.config import Settings
from bot.discord import app as app_module
from bot.discord import chat as chat_module
from bot.discord.app import BotApp
from bot.discord.commands import admin_role_name, fit_lines, persona_choice
from bot.discord.identity import Identities
from bot.discord.sync import command_signature
from bot.personas import Persona, UnknownPersona
from bot.store.keys import ConversationKey
from bot.store.migrate import upgrade_async
from tests.fakediscord import FakeDiscord, World
from tests.fakediscord.models import Channel, User
from tests.fakediscord.server import DROP_CONNECTION, LOSE_ANSWER
from tests.openai_test_server import Fail, OpenAITestServer, Reply
from tests.services import create_database
from tests.waiting import eventually

pytest_plugins = ("tests.fakediscord.fixtures",)

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Env:
    fake: FakeDiscord
    world: World
    llm: OpenAITestServer
    app: BotApp

    @property
    def store(self):  # type: ignore[no-untyped-def]
        assert self.app.store is not None
        return self.app.store


@pytest.fixture
async def llm() -> AsyncIterator[OpenAITestServer]:
    async with OpenAITestServer() as server:
        yield server


def make_settings(fake: FakeDiscord, llm: OpenAITestServer, tmp_path: Path, **extra: object) -> Settings:
    return Settings(
        discord_token=fake.token,
        discord_api_base=fake.api_base,
        discord_gateway_url=fake.gateway_url,
        database_url=f"sqlite+aiosqlite:///{tmp_path}/hermes.db",
        queue_url="memory://",
        engine="openai",
        openai_base_url=llm.base_url,
        model="test-model",
        **{"personas_dir": ROOT / "personas", **extra},
    )


@pytest.fixture
async def env(
    fake_discord: FakeDiscord, discord_world: World, llm: OpenAITestServer, tmp_path: Path
) -> AsyncIterator[Env]:
    async with BotApp(make_settings(fake_discord, llm, tmp_path), guild_ready_timeout=0.1) as app:
        yield Env(fake_discord, discord_world, llm, app)


def mention(env: Env) -> str:
    return f"<@{env.fake.bot_user.id}>"


async def test_mention_gets_a_streamed_reply_as_the_default_persona(env: Env) -> None:
    env.llm.script(Reply("Hello Alice, nice to meet you.", chunk_chars=4, delay_s=0.01))
    w = env.world
    asked = await env.fake.send_message(w.general, w.alice, f"{mention(env)} hi there")
    reply = await env.fake.wait_for_message(
        w.general, lambda m: m.webhook_id is not None and m.content == "Hello Alice, nice to meet you."
    )
    assert reply.username == "Hermes 2"
    stored = await eventually(lambda: _window_of(env, ConversationKey(w.guild.id, w.general.id), 2))
    assert [(m.role, m.content) for m in stored] == [
        ("user", "hi there"),
        ("assistant", "Hello Alice, nice to meet you."),
    ]
    assert stored[0].discord_message_id == asked.id


async def test_a_reply_the_model_server_fails_is_counted_once_as_an_engine_error(env: Env) -> None:
    """memory://: worker and bot share one metrics registry; the worker counts the engine's failure, the bot
    the failed reply, each once."""
    def sample(name: str) -> float:
        return metrics.REGISTRY.get_sample_value(name, {"kind": "engine"}) or 0.0

    errors, failed = sample("hermes_errors_total"), sample("hermes_failed_replies_total")
    env.llm.script(Fail(400, "the model refused"))
    w = env.world
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} hi there")
    await env.fake.wait_for_message(w.general, lambda m: "something went wrong" in m.content)
    assert sample("hermes_errors_total") == errors + 1
    assert sample("hermes_failed_replies_total") == failed + 1


async def test_a_reply_that_opens_with_its_own_name_is_shown_and_stored_without_it(env: Env) -> None:
    """The model copies the `Name:` that other speakers' lines carry; under a webhook that already shows the
    name it read "Hermes 2: Hermes 2: ..." to the other personas. The label never flashes up while streaming."""
    env.llm.script(Reply("Hermes 2: Hello Alice, nice to meet you.", chunk_chars=3, delay_s=0.02))
    w = env.world
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} hi there")
    await persona_reply(env, w.general, "Hello Alice, nice to meet you.")
    written = [r.json["content"] for r in env.fake.requests if isinstance(r.json, dict) and "content" in r.json]
    assert written and not any("Hermes" in text for text in written)
    stored = await eventually(lambda: _window_of(env, ConversationKey(w.guild.id, w.general.id), 2))
    assert stored[-1].content == "Hello Alice, nice to meet you."


async def test_attachments_and_stickers_are_named_to_the_model(env: Env) -> None:
    w = env.world
    env.llm.script(Reply("What a cat!"))
    await env.fake.send_message(
        w.general, w.alice, f"{mention(env)} look", attachments=[("cat.png", "image/png"), ("notes.txt", "text/plain")],
        stickers=["Wave"],
    )
    await persona_reply(env, w.general, "What a cat!")
    assert env.llm.requests[-1]["messages"][-1]["content"].endswith(
        "look\n[attached image: cat.png]\n[attached file: notes.txt]\n[sticker: Wave]"
    )


def persona_reply(env: Env, channel, text: str):  # type: ignore[no-untyped-def]
    return env.fake.wait_for_message(channel, lambda m: m.webhook_id is not None and m.content == text)


def no_mass_pings(body: object) -> bool:
    if not isinstance(body, dict) or "content" not in body:
        return True
    allowed = body.get("allowed_mentions")
    return isinstance(allowed, dict) and not {"everyone", "roles"} & set(allowed.get("parse", []))


async def test_typing_until_text_and_every_write_has_safe_allowed_mentions(env: Env) -> None:
    """Nothing a reply says pings: not @everyone, a role, nor a user whose `<@id>` someone asked it to repeat."""
    w = env.world
    said = f"@everyone look <@&123> here <@{w.bob.id}>"
    env.llm.script(Reply(said, chunk_chars=5, delay_s=0.02))
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} say @everyone")
    reply = await persona_reply(env, w.general, said)
    assert reply.pings() == set()
    assert env.fake.requests_to("POST", "/channels/{channel_id}/typing")
    writes = [r for r in env.fake.requests if r.method in ("POST", "PATCH") and "/messages" in r.route
              or r.route == "/webhooks/{webhook_id}/{token}"]
    assert writes and all(no_mass_pings(r.json) for r in writes)


async def test_a_reply_to_a_message_still_being_written_goes_to_its_persona(env: Env) -> None:
    """A reply was remembered only once it was finished: replying to a long one mid-stream got nothing."""
    w = env.world
    await slash(env, "persona add", {"persona": "edward_elric"})
    await env.fake.wait_for_message(w.general, lambda m: m.webhook_id is not None and "Fullmetal" in m.content)
    env.llm.script(Reply("slow " * 80, chunk_chars=5, delay_s=0.03), Reply("Dragons? Alchemy can't make those."))
    await env.fake.send_message(w.general, w.alice, "Edward, tell me a long story")
    streaming = await env.fake.wait_for_message(w.general, lambda m: m.webhook_id is not None and "slow" in m.content)
    await env.fake.send_message(w.general, w.bob, "wait, what about dragons?", reply_to=streaming, mention_author=False)
    answer = await persona_reply(env, w.general, "Dragons? Alchemy can't make those.")
    assert answer.username == "Edward Elric" and "Edward Elric" in env.llm.requests[-1]["messages"][0]["content"]


async def test_a_mention_of_the_bots_own_role_is_a_mention_of_the_bot(env: Env) -> None:
    """Typing "@Hermes" offers the bot and the role Discord made for it; people pick either."""
    w = env.world
    role = w.guild.roles[w.guild.bot_role_id]
    env.llm.script(Reply("Hello by role."))
    await env.fake.send_message(w.general, w.alice, f"<@&{role.id}> are you there?")
    await persona_reply(env, w.general, "Hello by role.")
    assert env.llm.requests[-1]["messages"][-1]["content"] == "are you there?"
    moderators = await env.fake.add_role(w.guild, "moderators")
    await env.fake.send_message(w.general, w.alice, f"<@&{moderators.id}> please look")  # not the bot's role
    env.llm.script(Reply("Still here."))
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} and now?")
    await persona_reply(env, w.general, "Still here.")
    assert len(env.llm.requests) == 2


async def test_reply_dm_and_bots_ignored(env: Env) -> None:
    w = env.world
    env.llm.script(Reply("first answer"), Reply("answer to the reply"), Reply("dm answer"))
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} one")
    first = await persona_reply(env, w.general, "first answer")
    await env.fake.send_message(w.general, w.bob, "and two?", reply_to=first, mention_author=False)
    await persona_reply(env, w.general, "answer to the reply")
    dm = await env.fake.open_dm(w.alice)
    await env.fake.send_message(dm, w.alice, "hello in private")
    got = await env.fake.wait_for_message(dm, lambda m: m.content == "**Hermes 2:** dm answer")
    assert got.author.id == env.fake.bot_user.id and got.webhook_id is None
    before = len(env.llm.requests)
    await env.fake.send_message(w.general, w.other_bot, f"{mention(env)} bots talking")
    await env.fake.send_message(w.general, w.alice, "just chatting")  # stored (the bot takes part), no reply
    key = ConversationKey(w.guild.id, w.general.id)

    async def stored_chatter():  # type: ignore[no-untyped-def]
        history = await env.store.window(key, 20)
        return history if history[-1].content == "just chatting" else None

    history = await eventually(stored_chatter)
    assert "bots talking" not in [m.content for m in history]
    assert len(env.llm.requests) == before


async def test_a_bot_that_took_part_in_a_channel_still_does_after_a_reset_and_a_restart(
    fake_discord: FakeDiscord, discord_world: World, llm: OpenAITestServer, tmp_path: Path
) -> None:
    """It kept the channel's chatter after /reset, but a restart decided from the turns since the reset
    and forgot it took part there: what people said went unrecorded until someone addressed it again."""
    w, settings = discord_world, make_settings(fake_discord, llm, tmp_path)
    key = ConversationKey(w.guild.id, w.general.id)
    async with BotApp(settings, guild_ready_timeout=0.1) as app:
        env = Env(fake_discord, w, llm, app)
        env.llm.script(Reply("Hello."))
        await env.fake.send_message(w.general, w.alice, f"{mention(env)} hi")
        await persona_reply(env, w.general, "Hello.")
        await slash(env, "reset")
    async with BotApp(settings, guild_ready_timeout=0.1) as app:
        env = Env(fake_discord, w, llm, app)
        await env.fake.send_message(w.general, w.bob, "after the restart")

        async def stored() -> bool:
            return [m.content for m in await env.store.window(key, 10)] == ["after the restart"]

        assert await eventually(stored)


async def test_a_channel_the_bot_is_not_part_of_costs_one_history_lookup(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chatter where the bot never spoke is neither stored nor looked up again per message; once the
    bot answers there, the chatter after it is kept as history."""
    w = env.world
    key = ConversationKey(w.guild.id, w.general.id)
    assert env.app.bot is not None
    cog = env.app.bot.get_cog("ChatCog")
    lookups: list[ConversationKey] = []
    handled: list[int] = []
    has_history, handle = env.store.has_history, cog._handle

    async def counting_lookup(k: ConversationKey):  # type: ignore[no-untyped-def]
        lookups.append(k)
        return await has_history(k)

    async def counting_handle(message):  # type: ignore[no-untyped-def]
        await handle(message)
        handled.append(message.id)

    monkeypatch.setattr(env.store, "has_history", counting_lookup)
    monkeypatch.setattr(cog, "_handle", counting_handle)
    for i in range(3):
        await env.fake.send_message(w.general, w.alice, f"people talking {i}")
        await eventually(lambda n=i + 1: len(handled) >= n)
    assert lookups == [key]
    assert await env.store.window(key, 10) == []
    env.llm.script(Reply("hello there"))
    await env.fake.send_message(w.general, w.bob, f"{mention(env)} hi")
    await persona_reply(env, w.general, "hello there")
    await env.fake.send_message(w.general, w.alice, "people talking again")
    await eventually(lambda: len(handled) >= 5)
    history = [m.content for m in await env.store.window(key, 10)]
    assert history[-1] == "people talking again" and "people talking 0" not in history


async def test_thread_is_its_own_conversation_through_the_parent_webhook(env: Env) -> None:
    w = env.world
    env.llm.script(Reply("thread answer"))
    await env.fake.send_message(w.thread, w.alice, f"{mention(env)} in the thread")
    await persona_reply(env, w.thread, "thread answer")
    hook_posts = env.fake.requests_to("POST", "/webhooks/{webhook_id}/{token}")
    assert hook_posts[-1].query.get("thread_id") == str(w.thread.id)
    assert [h.channel_id for h in env.fake.webhooks.values()] == [w.general.id]
    thread_history = await eventually(lambda: _window_of(env, ConversationKey(w.guild.id, w.general.id, w.thread.id), 2))
    assert [m.content for m in thread_history] == ["in the thread", "thread answer"]
    assert await env.store.window(ConversationKey(w.guild.id, w.general.id), 10) == []


async def test_webhook_is_reused_and_falls_back_to_bold_name_without_manage_webhooks(env: Env) -> None:
    w = env.world
    env.llm.script(Reply("one"), Reply("two"))
    for text in ("one", "two"):
        await env.fake.send_message(w.general, w.alice, f"{mention(env)} {text}?")
        await persona_reply(env, w.general, text)
    assert len(env.fake.requests_to("POST", "/channels/{channel_id}/webhooks")) == 1
    other = await env.fake.add_channel(w.guild, "no-hooks")
    from tests.fakediscord import Perm

    await env.fake.set_bot_permissions(w.guild, Perm.BOT_DEFAULT & ~Perm.MANAGE_WEBHOOKS)
    env.llm.script(Reply("plain answer"))
    await env.fake.send_message(other, w.alice, f"{mention(env)} hi")
    got = await env.fake.wait_for_message(other, lambda m: m.author.id == env.fake.bot_user.id)
    await env.fake.wait_for(lambda: got.content == "**Hermes 2:** plain answer", what="final fallback text")
    assert got.webhook_id is None


async def test_a_bot_muted_in_a_channel_keeps_its_personas_quiet_there(env: Env) -> None:
    """Moderators mute a bot by denying it Send Messages; a webhook still posts (Discord checks no channel
    permission for it), so the personas kept answering. The message is still remembered for later."""
    from tests.fakediscord import Perm

    w = env.world
    muted = ~(Perm.SEND_MESSAGES | Perm.SEND_MESSAGES_IN_THREADS)
    everyone = w.guild.everyone  # the fake has no channel overwrites: mute through both roles
    await env.fake.set_role_permissions(everyone, Perm.EVERYONE_DEFAULT & muted)
    await env.fake.set_bot_permissions(w.guild, Perm.BOT_DEFAULT & muted)
    env.llm.script(Reply("speaking again"))
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} are you there?")
    key = ConversationKey(w.guild.id, w.general.id)
    await eventually(lambda: _window_of(env, key, 1))
    await env.fake.set_role_permissions(everyone, Perm.EVERYONE_DEFAULT)
    await env.fake.set_bot_permissions(w.guild, Perm.BOT_DEFAULT)
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} and now?")
    await persona_reply(env, w.general, "speaking again")
    (asked,) = env.llm.requests
    assert [m["content"] for m in asked["messages"][-2:]] == ["are you there?", "and now?"]  # one reply, to the second


async def test_a_bot_muted_mid_reply_stops_writing_it(env: Env) -> None:
    """The persona webhook would post the rest of the reply: Discord checks no channel permission for it."""
    from tests.fakediscord import Perm

    w = env.world
    env.llm.script(Reply("word " * 150, chunk_chars=5, delay_s=0.02))
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} a long story please")
    await env.fake.wait_for_message(w.general, lambda m: m.webhook_id is not None)
    muted = ~(Perm.SEND_MESSAGES | Perm.SEND_MESSAGES_IN_THREADS)
    await env.fake.set_role_permissions(w.guild.everyone, Perm.EVERYONE_DEFAULT & muted)
    await env.fake.set_bot_permissions(w.guild, Perm.BOT_DEFAULT & muted)
    assert env.app.bot is not None
    cog = env.app.bot.get_cog("ChatCog")
    await eventually(lambda: not cog.running, timeout=2)  # the reply has about 3 s of text left
    (shown,) = env.fake.bot_messages(w.general)
    assert len(shown.content) < len("word " * 150) - 100


async def test_a_message_superseded_while_waiting_gets_no_stopped_note(
    fake_discord: FakeDiscord, discord_world: World, llm: OpenAITestServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HERMES_QUEUE_SUPERSEDE: "two" waits behind a slow reply and "three" replaces it. Nobody stopped
    "two", yet the channel got a "*(stopped)*" message for it; its waiting notice goes too."""
    monkeypatch.setattr(chat_module, "WAIT_NOTICE_POSITION", 1)
    settings = make_settings(fake_discord, llm, tmp_path, queue_supersede=True, max_batch_size=1)
    async with BotApp(settings, guild_ready_timeout=0.1) as app:
        assert app.queue is not None
        w, at = discord_world, f"<@{fake_discord.bot_user.id}>"
        llm.script(Reply("slow " * 40, chunk_chars=5, delay_s=0.05), Reply("answer to three"))
        await fake_discord.send_message(w.general, w.alice, f"{at} one")
        await fake_discord.wait_for_message(w.general, lambda m: m.webhook_id is not None and "slow" in m.content)
        await fake_discord.send_message(w.general, w.alice, f"{at} two")
        await eventually(app.queue.depth)  # "two" waits behind "one"
        await fake_discord.send_message(w.general, w.alice, f"{at} three")
        await fake_discord.wait_for_message(w.general, lambda m: m.content == "answer to three", timeout=20)
        assert [m.content for m in fake_discord.bot_messages(w.general) if "slow" not in m.content] == ["answer to three"]


async def test_a_channel_whose_webhooks_are_all_taken_still_gets_replies(env: Env) -> None:
    """Discord refuses a 16th webhook with 400 (code 30007), not 403: the persona speaks as the bot."""
    w = env.world
    env.fake.inject_error("POST", "/channels/{channel_id}/webhooks", status=400, code=30007,
                          message="Maximum number of webhooks reached (15)")
    env.llm.script(Reply("still here"))
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} anyone?")
    got = await env.fake.wait_for_message(w.general, lambda m: m.author.id == env.fake.bot_user.id)
    await env.fake.wait_for(lambda: got.content == "**Hermes 2:** still here", what="the fallback reply")
    assert got.webhook_id is None


async def test_a_deleted_webhook_is_replaced_and_the_reply_still_arrives(env: Env) -> None:
    w = env.world
    env.llm.script(Reply("first"), Reply("second"), Reply("third"))
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} one?")
    await persona_reply(env, w.general, "first")
    (old,) = env.fake.webhooks.values()
    await env.fake.remove_webhook(old)
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} two?")  # its send hits the deleted webhook
    second = await persona_reply(env, w.general, "second")
    (new,) = env.fake.webhooks.values()
    assert new.id != old.id and second.webhook_id == new.id
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} three?")
    await persona_reply(env, w.general, "third")
    assert len(env.fake.requests_to("POST", "/channels/{channel_id}/webhooks")) == 2  # the new one is reused


async def slash(env: Env, command: str, options: dict | None = None, *, user=None, channel=None) -> str:  # type: ignore[no-untyped-def]
    record = await env.fake.invoke_slash(
        command, options, user=user or env.world.mod, channel=channel or env.world.general
    )
    texts = await env.fake.wait_for(record.texts, what=f"an answer to /{command}")
    assert record.deferred and record.callbacks
    return texts[-1]


async def test_persona_commands_two_personas_and_wake_words(env: Env) -> None:
    w = env.world
    assert "Edward Elric" in await slash(env, "persona list", user=w.alice)
    assert "Hermes 2" in await slash(env, "persona show", user=w.alice)
    denied = await slash(env, "persona add", {"persona": "edward_elric"}, user=w.alice)
    assert "Manage Channels" in denied
    assert "Edward Elric" in await slash(env, "persona add", {"persona": "edward_elric"})
    assert "don't know" in await slash(env, "persona add", {"persona": "nobody"})
    rambling = await slash(env, "persona add", {"persona": "x" * 3000})  # string options may be 6,000 long
    assert "don't know" in rambling and "x" * 63 + "…" in rambling and len(rambling) < 2000
    env.llm.script(Reply("I'm not short!"), Reply("Hermes here."))
    await env.fake.send_message(w.general, w.alice, "Edward, how tall are you?")
    ed = await persona_reply(env, w.general, "I'm not short!")
    await env.fake.send_message(w.general, w.bob, "hermes, what do you think?")
    hermes = await persona_reply(env, w.general, "Hermes here.")
    assert (ed.username, hermes.username) == ("Edward Elric", "Hermes 2")
    assert ed.webhook_id == hermes.webhook_id
    assert "Sherlock" in await slash(env, "persona set", {"persona": "sherlock_holmes"})
    env.llm.script(Reply("Elementary."))
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} who did it?")
    assert (await persona_reply(env, w.general, "Elementary.")).username == "Sherlock Holmes"
    assert "left" in await slash(env, "persona remove", {"persona": "edward_elric"})
    shown = await slash(env, "persona show")
    assert "Sherlock Holmes" in shown and "Edward" not in shown
    assert "not taking part" in await slash(env, "persona remove", {"persona": "edward_elric"})
    quiet = await env.fake.add_channel(w.guild, "quiet")  # the bot's default answers there: it cannot leave
    assert "`/persona set`" in await slash(env, "persona remove", {"persona": "hermes"}, channel=quiet)
    # A thread follows its channel's persona until a command changes it there.
    env.llm.script(Reply("From the thread."))
    await env.fake.send_message(w.thread, w.alice, f"{mention(env)} and in here?")
    assert (await persona_reply(env, w.thread, "From the thread.")).username == "Sherlock Holmes"
    assert "parent channel" in await slash(env, "persona show", channel=w.thread)
    assert "Hermes 2" in await slash(env, "persona set", {"persona": "hermes"}, channel=w.thread)
    shown = await slash(env, "persona show", channel=w.thread)
    assert "**Hermes 2**" in shown and "parent channel" not in shown
    assert "**Sherlock Holmes**" in await slash(env, "persona show")  # the channel keeps its own


async def test_autorespond_and_admin_role(
    fake_discord: FakeDiscord, discord_world: World, llm: OpenAITestServer, tmp_path: Path
) -> None:
    w = discord_world
    helpers = await fake_discord.add_role(w.guild, "bot-admins")
    await fake_discord.add_member(w.guild, w.bob, roles=[helpers])
    settings = make_settings(fake_discord, llm, tmp_path, admin_role="bot-admins")
    async with BotApp(settings, guild_ready_timeout=0.1) as app:
        env = Env(fake_discord, w, llm, app)
        assert "bot-admins" in await slash(env, "autorespond", {"mode": "on"}, user=w.alice)
        assert "on" in await slash(env, "autorespond", {"mode": "on"}, user=w.bob)
        llm.script(Reply("Anyone there? Yes."))
        await fake_discord.send_message(w.general, w.alice, "anyone there?")
        await persona_reply(env, w.general, "Anyone there? Yes.")
        assert "off" in await slash(env, "autorespond", {"mode": "off"})
        await fake_discord.send_message(w.general, w.alice, "quiet now")
        await eventually(lambda: _last_is(env, "quiet now"))
        assert len(llm.requests) == 1


async def test_an_admin_role_given_by_id_cannot_be_forged_by_name(
    fake_discord: FakeDiscord, discord_world: World, llm: OpenAITestServer, tmp_path: Path
) -> None:
    """Anyone who may create roles can make one named like the admin role; its id is the real one's only."""
    w = discord_world
    helpers = await fake_discord.add_role(w.guild, "bot-admins")
    forged = await fake_discord.add_role(w.guild, "bot-admins")
    named_like_its_id = await fake_discord.add_role(w.guild, str(helpers.id))
    await fake_discord.add_member(w.guild, w.bob, roles=[helpers])
    await fake_discord.add_member(w.guild, w.alice, roles=[forged, named_like_its_id])
    settings = make_settings(fake_discord, llm, tmp_path, admin_role=str(helpers.id))
    async with BotApp(settings, guild_ready_timeout=0.1) as app:
        env = Env(fake_discord, w, llm, app)
        assert "on" in await slash(env, "autorespond", {"mode": "on"}, user=w.bob)
        refused = await slash(env, "autorespond", {"mode": "off"}, user=w.alice)
        assert refused == "You need the Manage Channels permission or the bot-admins role to change this channel's settings."


def test_an_admin_role_named_with_other_digits_is_a_name() -> None:
    """"²".isdigit() is true but int("²") fails: the refusal crashed and the command kept "thinking" forever."""
    guild = SimpleNamespace(get_role=lambda role_id: None)
    assert admin_role_name(SimpleNamespace(guild=guild), "²") == "²"  # type: ignore[arg-type]


def slow_appends(env: Env, monkeypatch: pytest.MonkeyPatch, *, role: str) -> asyncio.Event:
    """Storing a turn of `role` takes half a second (a loaded database); the event is set once one has begun."""
    append, storing = env.store.append, asyncio.Event()

    async def slow_append(*args: object, **kwargs: object) -> bool:
        if kwargs.get("role") == role:
            storing.set()
            await asyncio.sleep(0.5)
        return await append(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(env.store, "append", slow_append)
    return storing


async def _window_of(env: Env, key: ConversationKey, turns: int):  # type: ignore[no-untyped-def]
    """The stored window once it holds `turns` turns (the reply is stored just after it is shown)."""
    history = await env.store.window(key, 10)
    return history if len(history) >= turns else None


async def _last_is(env: Env, text: str, key: ConversationKey | None = None) -> bool:
    key = key or ConversationKey(env.world.guild.id, env.world.general.id)
    history = await env.store.window(key, 5)
    return bool(history) and history[-1].content == text


async def test_edits_and_deletes_are_mirrored_and_reset_starts_fresh(env: Env) -> None:
    w = env.world
    env.llm.script(Reply("noted"))
    asked = await env.fake.send_message(w.general, w.alice, f"{mention(env)} my name is Al")
    await persona_reply(env, w.general, "noted")
    await env.fake.edit_message(asked, f"{mention(env)} my name is Alice")
    assert await eventually(lambda: _content_is(env, asked.id, "my name is Alice"))
    await env.fake.delete_message(asked)
    assert await eventually(lambda: _deleted(env, asked.id))
    assert "Fresh start" in await slash(env, "reset")
    assert await env.store.window(ConversationKey(w.guild.id, w.general.id), 10) == []


async def test_reset_stops_the_reply_being_written_and_keeps_it_out_of_the_fresh_start(env: Env) -> None:
    """People reset when a persona went off the rails mid-reply: that reply was stored after the reset
    point, as the first turn of the new story."""
    w = env.world
    env.llm.script(Reply("The dragon swallows the whole party. " * 20, chunk_chars=6, delay_s=0.05), Reply("Hello!"))
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} what happens next?")
    await env.fake.wait_for_message(w.general, lambda m: m.webhook_id is not None)
    answer = await slash(env, "reset")
    assert "Fresh start" in answer and "The reply being written was stopped." in answer
    await env.fake.wait_for_message(w.general, lambda m: m.webhook_id is not None and m.content.endswith("*(stopped)*"))
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} a new story: we're on a space station")
    await persona_reply(env, w.general, "Hello!")
    assert [m["role"] for m in env.llm.requests[-1]["messages"]] == ["system", "user"]


async def test_reset_while_a_finished_reply_is_being_stored_leaves_it_out_of_the_fresh_start(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = env.world
    env.llm.script(Reply("The dragon swallows the whole party."), Reply("Hello!"))
    storing = slow_appends(env, monkeypatch, role="assistant")
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} what happens next?")
    await persona_reply(env, w.general, "The dragon swallows the whole party.")
    await asyncio.wait_for(storing.wait(), 10)
    assert "Fresh start" in await slash(env, "reset")
    assert env.app.bot is not None
    cog = env.app.bot.get_cog("ChatCog")
    await eventually(lambda: not cog._in_flight)  # the reply has been stored, and left out
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} a new story: we're on a space station")
    await persona_reply(env, w.general, "Hello!")
    assert [m["role"] for m in env.llm.requests[-1]["messages"]] == ["system", "user"]


async def test_a_reply_deleted_while_it_streams_stops_and_stays_out_of_the_context(env: Env) -> None:
    """A moderator deletes the reply being written: it stops at once (its job held a worker slot and the
    asker's share to the end, about 6 s of text here, with a warning per failed edit), and the moderated
    text never returns in a later prompt."""
    w = env.world
    env.llm.script(Reply("word " * 300, chunk_chars=5, delay_s=0.02))
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} say something")
    shown = await env.fake.wait_for_message(w.general, lambda m: m.webhook_id is not None)
    await env.fake.delete_message(shown)
    assert env.app.bot is not None
    cog = env.app.bot.get_cog("ChatCog")
    await eventually(lambda: not cog.running, timeout=3)
    key = ConversationKey(w.guild.id, w.general.id)
    assert [m.role for m in await env.store.window(key, 10)] == ["user"]


async def test_a_reply_deleted_after_it_was_shown_but_before_it_was_stored_stays_out_of_the_context(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deletion finds nothing stored yet: the turn stored right after must still end up deleted, or the
    moderated text returns in every later prompt."""
    w = env.world
    env.llm.script(Reply("something a moderator removes"))
    storing = slow_appends(env, monkeypatch, role="assistant")
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} say something")
    shown = await persona_reply(env, w.general, "something a moderator removes")
    await asyncio.wait_for(storing.wait(), 10)
    await env.fake.delete_message(shown)
    assert await eventually(lambda: _deleted(env, shown.id))
    key = ConversationKey(w.guild.id, w.general.id)
    assert [m.role for m in await env.store.window(key, 10)] == ["user"]


async def test_a_message_edited_while_it_is_being_stored_is_stored_as_edited(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The edit finds nothing stored yet (a loaded database); the old text stayed in every later prompt."""
    w = env.world
    env.llm.script(Reply("ok"))
    storing = slow_appends(env, monkeypatch, role="user")
    asked = await env.fake.send_message(w.general, w.alice, f"{mention(env)} dragnos?")
    await asyncio.wait_for(storing.wait(), 10)
    await env.fake.edit_message(asked, f"{mention(env)} dragons?")
    await persona_reply(env, w.general, "ok")
    assert env.llm.requests[-1]["messages"][-1]["content"] == "dragons?"
    stored = await eventually(lambda: _window_of(env, ConversationKey(w.guild.id, w.general.id), 2))
    assert [(m.role, m.content) for m in stored] == [("user", "dragons?"), ("assistant", "ok")]


async def test_a_message_deleted_or_edited_while_it_waits_its_turn_is_stored_as_it_ends(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A moderation bot deletes a message at once, while its arrival waits behind a reply whose lookup is
    slow (a loaded database): the deletion found nothing stored, and the text used to stay in the context.
    An edit in the same place is kept (discord.py edits the cached message the waiting handler reads)."""
    w = env.world
    key = ConversationKey(w.guild.id, w.general.id)
    env.llm.script(Reply("first answer"), Reply("answer to the reply"))
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} hello")
    first = await persona_reply(env, w.general, "first answer")
    find_message = env.store.find_message

    async def slow_find_message(message_id: int):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.3)
        return await find_message(message_id)

    monkeypatch.setattr(env.store, "find_message", slow_find_message)
    await env.fake.send_message(w.general, w.bob, "nice", reply_to=first, mention_author=False)
    spam = await env.fake.send_message(w.general, w.bob, "SPAM deleted by a moderation bot")
    await env.fake.delete_message(spam)
    typo = await env.fake.send_message(w.general, w.bob, "dragnos are real")
    await env.fake.edit_message(typo, "dragons are real")
    await env.fake.send_message(w.general, w.bob, "later chatter")

    async def stored_through_later():  # type: ignore[no-untyped-def]
        window = [m.content for m in await env.store.window(key, 20)]
        return window if "later chatter" in window else None

    window = await eventually(stored_through_later)
    assert "SPAM deleted by a moderation bot" not in window
    assert "dragons are real" in window and "dragnos are real" not in window


async def test_a_forwarded_persona_message_is_not_a_reply_to_it(env: Env) -> None:
    """A forward references the original message too, but answers nothing: no persona wakes up for
    it, and its text (the original's, in a snapshot) is what the channel's history gets."""
    w = env.world
    env.llm.script(Reply("Alchemy has rules."))
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} tell me about alchemy")
    original = await persona_reply(env, w.general, "Alchemy has rules.")
    other = await env.fake.add_channel(w.guild, "elsewhere")
    env.llm.script(Reply("Noted."))
    await env.fake.send_message(other, w.bob, f"{mention(env)} hi")  # the bot takes part there
    await persona_reply(env, other, "Noted.")
    await env.fake.forward_message(original, other, w.bob)
    key = ConversationKey(w.guild.id, other.id)

    async def forward_stored() -> bool:
        return "[forwarded message] Alchemy has rules." in [m.content for m in await env.store.window(key, 10)]

    assert await eventually(forward_stored)
    env.llm.script(Reply("Thoughts."))
    await env.fake.send_message(other, w.bob, f"{mention(env)} thoughts?")
    await persona_reply(env, other, "Thoughts.")
    assert len(env.llm.requests) == 3  # none for the forward


async def test_a_forwarded_message_reads_mentions_as_names(env: Env) -> None:
    """discord.py reads no mentions from a forward's snapshot: raw ids would reach the model, which reads
    names everywhere else (and could repeat an id as a mention). Without the members intent the bot
    knows no member's name, so a user is "@someone"."""
    w = env.world
    env.llm.script(Reply("Hi."))
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} hi")  # the bot takes part here
    await persona_reply(env, w.general, "Hi.")
    role = w.guild.roles[w.guild.bot_role_id]
    original = await env.fake.send_message(w.general, w.alice, f"<@{w.bob.id}> see <#{w.general.id}>, <@&{role.id}>")
    await env.fake.forward_message(original, w.general, w.bob)
    key = ConversationKey(w.guild.id, w.general.id)

    async def forward_stored() -> bool:
        return f"[forwarded message] @someone see #general, @{role.name}" in [m.content for m in await env.store.window(key, 10)]

    assert await eventually(forward_stored)


async def test_messages_are_stored_in_the_order_they_were_sent(env: Env) -> None:
    """A reply to an older message costs a lookup before it is stored; a plain message sent just after
    it must still come after it in the history the model reads."""
    w = env.world
    env.llm.script(Reply("Hi."))
    first = await env.fake.send_message(w.general, w.alice, f"{mention(env)} hello")
    await persona_reply(env, w.general, "Hi.")
    await env.fake.send_message(w.general, w.bob, "about that", reply_to=first, mention_author=False)
    await env.fake.send_message(w.general, w.alice, "and another thing")
    key = ConversationKey(w.guild.id, w.general.id)

    async def stored() -> list[str]:
        texts = [m.content for m in await env.store.window(key, 10)]
        return texts if len(texts) == 4 else []

    assert (await eventually(stored))[2:] == ["about that", "and another thing"]


async def _content_is(env: Env, message_id: int, text: str) -> bool:
    found = await env.store.find_message(message_id)
    return found is not None and found.content == text


async def _deleted(env: Env, message_id: int) -> bool:
    found = await env.store.find_message(message_id)
    return found is not None and found.deleted_at is not None


async def test_streaming_edits_are_throttled_and_survive_a_429(env: Env) -> None:
    w = env.world
    text = " ".join(f"word{i}" for i in range(60))
    env.llm.script(Reply(text, chunk_chars=6, delay_s=0.05))  # about 3 s of streaming
    env.fake.inject_429("PATCH", "/webhooks/{webhook_id}/{token}/messages/{message_id}", retry_after=0.3)
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} talk for a while")
    reply = await env.fake.wait_for_message(w.general, lambda m: m.content == text, timeout=15)
    assert reply.edits >= 2
    gaps = [b - a for a, b in zip([reply.created, *reply.edit_times], reply.edit_times, strict=False)]
    assert min(gaps) >= 0.95, gaps
    assert [r.status for r in env.fake.requests_to("PATCH", "/webhooks/{webhook_id}/{token}/messages/{message_id}")][0] == 429


async def test_a_connection_dropped_mid_reply_does_not_end_it(env: Env) -> None:
    """A network error (no HTTP answer at all) on a streaming edit is caught up later like a failed edit."""
    w = env.world
    text = " ".join(f"word{i}" for i in range(40))
    env.llm.script(Reply(text, chunk_chars=6, delay_s=0.05))  # about 2 s of streaming
    env.fake.inject_disconnect("PATCH", "/webhooks/{webhook_id}/{token}/messages/{message_id}")
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} talk for a while")
    await env.fake.wait_for_message(w.general, lambda m: m.content == text, timeout=15)
    edits = env.fake.requests_to("PATCH", "/webhooks/{webhook_id}/{token}/messages/{message_id}")
    assert edits[0].status == DROP_CONNECTION and len(edits) >= 2
    key = ConversationKey(w.guild.id, w.general.id)

    async def stored() -> bool:
        return any(m.role == "assistant" and m.content == text for m in await env.store.window(key, 10))

    assert await eventually(stored)


async def test_a_persona_message_whose_answer_was_lost_is_not_sent_twice(env: Env) -> None:
    """Discord stored the message but its answer was lost on the way: sending it again left a stray copy
    in the channel (webhooks take no nonce), and the reply's later edits went to the copy only."""
    w = env.world
    text = " ".join(f"word{i}" for i in range(30))
    env.llm.script(Reply(text, chunk_chars=6, delay_s=0.05))
    env.fake.inject_disconnect("POST", "/webhooks/{webhook_id}/{token}", after_handling=True)
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} talk for a while")
    await env.fake.wait_for_message(w.general, lambda m: m.content == text, timeout=15)
    key = ConversationKey(w.guild.id, w.general.id)

    async def stored() -> bool:
        return any(m.role == "assistant" and m.content == text for m in await env.store.window(key, 10))

    assert await eventually(stored)
    persona_messages = [m for m in env.fake.channel_messages(w.general) if m.webhook_id is not None]
    assert [m.content for m in persona_messages] == [text]
    assert env.fake.requests_to("POST", "/webhooks/{webhook_id}/{token}")[0].status == LOSE_ANSWER


async def test_a_bot_message_whose_answer_was_lost_is_not_sent_twice(env: Env) -> None:
    """The same in a DM, where a persona speaks as the bot itself."""
    w = env.world
    text = " ".join(f"word{i}" for i in range(30))
    env.llm.script(Reply(text, chunk_chars=6, delay_s=0.05))
    dm = await env.fake.open_dm(w.alice)
    env.fake.inject_disconnect("POST", "/channels/{channel_id}/messages", after_handling=True)
    await env.fake.send_message(dm, w.alice, "talk for a while")
    await env.fake.wait_for_message(dm, lambda m: m.content == f"**Hermes 2:** {text}", timeout=15)
    await asyncio.sleep(0.5)  # a stray copy would have been sent by now
    ours = [m.content for m in env.fake.channel_messages(dm) if m.author.id == env.fake.bot_user.id]
    assert ours == [f"**Hermes 2:** {text}"]
    assert env.fake.requests_to("POST", "/channels/{channel_id}/messages")[0].status == LOSE_ANSWER


async def test_a_message_delivered_twice_is_answered_once(env: Env) -> None:
    w = env.world
    env.llm.script(Reply("once"), Reply("and bye"))
    asked = await env.fake.send_message(w.general, w.alice, f"{mention(env)} hello?")
    await persona_reply(env, w.general, "once")
    await env.fake.redeliver(asked)
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} bye")
    await persona_reply(env, w.general, "and bye")
    assert len(env.llm.requests) == 2


async def test_long_reply_is_split_with_code_fences_intact(env: Env) -> None:
    w = env.world
    code = "```python\n" + "\n".join(f"print('line {i}')" for i in range(150)) + "\n```"
    text = "Here is the script:\n\n" + code + "\n\nThat's all."
    env.llm.script(Reply(text, chunk_chars=400))
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} write a long script")
    done = await env.fake.wait_for(
        lambda: [m for m in env.fake.bot_messages(w.general) if m.content.endswith("That's all.")], timeout=15
    )
    parts = [m.content for m in env.fake.bot_messages(w.general)]
    assert done and len(parts) >= 2 and all(len(p) <= 2000 for p in parts)
    assert all(p.count("```") % 2 == 0 for p in parts)
    assert parts[1].startswith("```python\n")

    async def stored() -> bool:
        last = await env.store.last_assistant_turn(ConversationKey(w.guild.id, w.general.id))
        return last is not None and last.content == text

    assert await eventually(stored)
    found = await env.store.find_message(env.fake.bot_messages(w.general)[-1].id)  # the last part
    assert found is not None and found.content == text

    assert env.app.bot is not None
    env.app.bot.get_cog("ChatCog").sent.clear()  # as after a restart: only the store knows the parts
    env.llm.script(Reply("Shorter this time."))
    assert "new reply" in await slash(env, "regenerate", user=w.alice)
    await persona_reply(env, w.general, "Shorter this time.")
    hook = done[0].webhook_id  # the persona webhook (slash command answers come from another)
    shown = [m.content for m in env.fake.bot_messages(w.general) if m.webhook_id == hook]
    assert shown == ["Shorter this time."]  # every part of the long reply was removed


async def test_stop_stops_every_reply_being_written_here(env: Env) -> None:
    w = env.world
    env.llm.script(Reply("slow " * 200, chunk_chars=5, delay_s=0.05), Reply("also slow " * 100, chunk_chars=5, delay_s=0.05))
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} go on and on")
    await env.fake.send_message(w.general, w.bob, f"{mention(env)} you too")
    def replies() -> list[str]:
        return [m.content for m in env.fake.bot_messages(w.general) if m.username == "Hermes 2"]

    await env.fake.wait_for(lambda: len(replies()) == 2, what="two streamed replies")
    assert "Stopped all 2 replies" in await slash(env, "stop", user=w.alice)
    await env.fake.wait_for(lambda: all(r.endswith("*(stopped)*") for r in replies()), what="both stopped")
    assert "Nothing is being written" in await slash(env, "stop", user=w.alice)


async def test_stop_and_regenerate(env: Env) -> None:
    w = env.world
    env.llm.script(Reply("slow " * 200, chunk_chars=5, delay_s=0.05))
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} go on and on")
    await env.fake.wait_for(lambda: env.fake.bot_messages(w.general), what="a first streamed message")
    assert "Stopped" in await slash(env, "stop", user=w.alice)
    stopped = await env.fake.wait_for_message(w.general, lambda m: m.content.endswith("*(stopped)*"), timeout=10)
    assert "Nothing is being written" in await slash(env, "stop", user=w.alice)
    key = ConversationKey(w.guild.id, w.general.id)
    assert await eventually(lambda: env.store.last_assistant_turn(key))  # stored just after it is shown
    env.llm.script(Reply("a better answer"))
    assert "new reply" in await slash(env, "regenerate", user=w.alice)
    await persona_reply(env, w.general, "a better answer")
    assert stopped.id not in [m.id for m in env.fake.bot_messages(w.general)]

    async def regenerated() -> bool:
        last = await env.store.last_assistant_turn(key)
        return last is not None and last.content == "a better answer"

    assert await eventually(regenerated)


async def test_regenerate_removes_a_reply_the_bot_sent_itself_once_it_has_a_webhook(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old reply went out as the bot (no webhook then); deleting it through today's webhook answered
    404, which was ignored: the old reply stayed in the channel next to the new one."""
    w = env.world
    monkeypatch.setattr("bot.discord.identity.RECHECK_AFTER_S", 0.0)  # webhooks are tried again at once
    env.fake.inject_error("POST", "/channels/{channel_id}/webhooks", status=400, code=30007,
                          message="Maximum number of webhooks reached (15)")
    env.llm.script(Reply("old answer"), Reply("new answer"))
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} hi")
    old = await env.fake.wait_for_message(w.general, lambda m: m.content == "**Hermes 2:** old answer")
    key = ConversationKey(w.guild.id, w.general.id)
    assert await eventually(lambda: env.store.last_assistant_turn(key))
    answer = await slash(env, "regenerate", user=w.alice)
    assert "new reply" in answer and "stays" not in answer
    assert (await persona_reply(env, w.general, "new answer")).webhook_id is not None
    assert old.id not in [m.id for m in env.fake.bot_messages(w.general)]


async def test_regenerate_after_a_failed_reply_retries_it_and_keeps_the_good_one_before(env: Env) -> None:
    """The newest attempt showed "no reply" and was never stored: /regenerate used to delete the stored
    reply before it (the last one it knew) and leave the failed notice."""
    w = env.world
    env.llm.script(Reply("good answer to one"), Reply(""), Reply("second answer, at last"))
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} question one")
    good = await persona_reply(env, w.general, "good answer to one")
    key = ConversationKey(w.guild.id, w.general.id)
    assert await eventually(lambda: env.store.last_assistant_turn(key))
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} question two")
    failed = await persona_reply(env, w.general, "*(no reply)*")
    assert "new reply" in await slash(env, "regenerate", user=w.alice)
    await persona_reply(env, w.general, "second answer, at last")
    shown = [m.id for m in env.fake.bot_messages(w.general)]
    assert good.id in shown and failed.id not in shown

    async def both_stored():  # type: ignore[no-untyped-def]
        stored = [m.content for m in await env.store.window(key, 10) if m.role == "assistant"]
        return stored if len(stored) == 2 else None

    assert await eventually(both_stored) == ["good answer to one", "second answer, at last"]


async def test_two_quick_regenerates_replace_only_the_last_reply(env: Env) -> None:
    """Both /regenerate arrive before either reply starts: one replaces the last reply, the other is
    told to wait, and the reply before it stays (a second replacement would have erased that one)."""
    w = env.world
    key = ConversationKey(w.guild.id, w.general.id)
    env.llm.script(Reply("first answer"), Reply("second answer"))
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} one")
    await persona_reply(env, w.general, "first answer")
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} two")
    await persona_reply(env, w.general, "second answer")

    async def stored(text: str) -> bool:
        last = await env.store.last_assistant_turn(key)
        return last is not None and last.content == text

    assert await eventually(lambda: stored("second answer"))
    env.llm.script(Reply("a new second answer", chunk_chars=4, delay_s=0.05), Reply("must not be written"))
    answers = await asyncio.gather(*(slash(env, "regenerate", user=user) for user in (w.alice, w.bob)))
    assert sorted("new reply" in a for a in answers) == [False, True]
    assert any("still being written" in a for a in answers)
    await persona_reply(env, w.general, "a new second answer")
    assert await eventually(lambda: stored("a new second answer"))
    shown = [m.content for m in env.fake.bot_messages(w.general)]
    assert "first answer" in shown and "second answer" not in shown and "must not be written" not in shown
    history = [m.content for m in await env.store.window(key, 10)]
    assert "first answer" in history and "second answer" not in history


async def test_queue_full_gets_a_friendly_message(
    fake_discord: FakeDiscord, discord_world: World, llm: OpenAITestServer, tmp_path: Path
) -> None:
    from tests.openai_test_server import Stall

    w = discord_world
    settings = make_settings(fake_discord, llm, tmp_path, queue_max_waiting=1, max_batch_size=1)
    async with BotApp(settings, guild_ready_timeout=0.1) as app:
        env = Env(fake_discord, w, llm, app)
        llm.script(Stall(3.0), Reply("second"), Reply("third"))
        await fake_discord.send_message(w.general, w.alice, f"{mention(env)} one")
        await fake_discord.wait_for(lambda: llm.requests, what="the first job in generation")
        await fake_discord.send_message(w.thread, w.bob, f"{mention(env)} two")
        assert app.queue is not None
        await eventually(app.queue.depth)  # "two" waits in line behind the stalled "one"
        dm = await fake_discord.open_dm(w.alice)
        await fake_discord.send_message(dm, w.alice, "three")
        busy = await fake_discord.wait_for_message(dm, lambda m: "busy" in m.content, timeout=10)
        assert busy.content.startswith("**Hermes 2:** I'm busy right now")
        await fake_discord.send_message(dm, w.alice, "four")  # still busy: the notice stands, no second one
        dm_key = ConversationKey(None, dm.id)
        await eventually(lambda: _last_is(env, "four", dm_key))
        await asyncio.sleep(0.3)
        assert [m.content for m in fake_discord.bot_messages(dm)] == [busy.content]


async def test_one_user_asking_in_many_channels_gets_a_share_of_the_line(
    fake_discord: FakeDiscord, discord_world: World, llm: OpenAITestServer, tmp_path: Path
) -> None:
    """Past HERMES_QUEUE_MAX_PER_USER replies on the way, a user's next message elsewhere gets a notice,
    another user is answered, and the first user is answered again once their reply has ended."""
    w = discord_world
    settings = make_settings(fake_discord, llm, tmp_path, queue_max_per_user=1)
    async with BotApp(settings, guild_ready_timeout=0.1) as app:
        env = Env(fake_discord, w, llm, app)
        llm.script(Reply("slow answer for alice", chunk_chars=2, delay_s=0.1), Reply("for bob"), Reply("alice again"))
        await fake_discord.send_message(w.general, w.alice, f"{mention(env)} one")
        await fake_discord.wait_for(lambda: llm.requests, what="alice's first job in generation")
        await fake_discord.send_message(w.thread, w.alice, f"{mention(env)} two")
        busy = await fake_discord.wait_for_message(w.thread, lambda m: "on the way" in m.content, timeout=10)
        assert "You already have 1 reply on the way (limit 1)" in busy.content
        await fake_discord.send_message(w.thread, w.bob, f"{mention(env)} three")
        await persona_reply(env, w.thread, "for bob")
        await persona_reply(env, w.general, "slow answer for alice")
        await eventually(lambda: _last_is(env, "slow answer for alice"))  # stored: that reply has ended
        await fake_discord.send_message(w.thread, w.alice, f"{mention(env)} four")
        await persona_reply(env, w.thread, "alice again")
        assert len(llm.requests) == 3  # "two" never reached the model


async def test_shutdown_waits_for_a_message_still_being_stored(
    env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A message that arrived right before SIGTERM and is still being stored is answered before the bot
    closes; it was not counted, so the bot closed under it ("Session is closed", no reply)."""
    w = env.world
    env.llm.script(Reply("answered before closing"))
    get_settings, reading = env.store.get_settings, asyncio.Event()

    async def slow_settings(*args: object, **kwargs: object) -> object:
        reading.set()
        await asyncio.sleep(0.5)
        return await get_settings(*args, **kwargs)

    monkeypatch.setattr(env.store, "get_settings", slow_settings)
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} hi, right before a deploy")
    await asyncio.wait_for(reading.wait(), 10)  # the message is being handled
    with caplog.at_level(logging.WARNING):
        await env.app.close()
    assert [m.content for m in env.fake.bot_messages(w.general)] == ["answered before closing"]
    assert "Ignoring exception" not in caplog.text


async def test_a_reply_to_a_dm_that_closes_stops_being_written(env: Env) -> None:
    w = env.world
    env.llm.script(Reply("word " * 300, chunk_chars=5, delay_s=0.02))
    dm = await env.fake.open_dm(w.alice)
    await env.fake.send_message(dm, w.alice, "a long story please")
    await env.fake.wait_for_message(dm, lambda m: m.author.id == env.fake.bot_user.id, timeout=10)
    env.fake.inject_error("PATCH", "/channels/{channel_id}/messages/{message_id}", status=403, code=50007,
                          message="Cannot send messages to this user", times=1000)
    assert env.app.bot is not None
    cog = env.app.bot.get_cog("ChatCog")
    await eventually(lambda: not cog.running, timeout=3)


async def test_a_message_deleted_while_its_reply_waits_in_line_gets_no_reply(
    fake_discord: FakeDiscord, discord_world: World, llm: OpenAITestServer, tmp_path: Path
) -> None:
    """A moderator removes spam that mentioned the bot while its reply waits: the reply is never written
    (it was written from the deleted text, posted and stored, its question erased)."""
    w = discord_world
    settings = make_settings(fake_discord, llm, tmp_path, max_batch_size=1)
    async with BotApp(settings, guild_ready_timeout=0.1) as app:
        env = Env(fake_discord, w, llm, app)
        slow = "a slow answer, " * 3 + "done"
        llm.script(Reply(slow, chunk_chars=2, delay_s=0.03), Reply("answer to the deleted spam"))
        await fake_discord.send_message(w.general, w.alice, f"{mention(env)} one")
        await fake_discord.wait_for(lambda: llm.requests, what="the first job in generation")
        spam = await fake_discord.send_message(w.thread, w.mod, f"{mention(env)} BUY CHEAP STUFF at scam.example")
        assert app.queue is not None
        await eventually(app.queue.depth)  # the spam's reply waits in line
        await fake_discord.delete_message(spam)
        await persona_reply(env, w.general, slow)
        assert app.bot is not None
        cog = app.bot.get_cog("ChatCog")
        await eventually(lambda: not cog.running)
        assert len(llm.requests) == 1 and fake_discord.bot_messages(w.thread) == []
        thread_key = ConversationKey(w.guild.id, w.general.id, w.thread.id)
        assert await env.store.window(thread_key, 5) == []


async def test_a_message_deleted_while_its_reply_is_written_takes_the_reply_with_it(env: Env) -> None:
    w = env.world
    env.llm.script(Reply("word " * 300, chunk_chars=5, delay_s=0.02))
    asked = await env.fake.send_message(w.general, w.alice, f"{mention(env)} something a mod will delete")
    await env.fake.wait_for_message(w.general, lambda m: m.webhook_id is not None)
    await env.fake.delete_message(asked)
    assert env.app.bot is not None
    cog = env.app.bot.get_cog("ChatCog")
    await eventually(lambda: not cog.running, timeout=3)
    assert env.fake.bot_messages(w.general) == []
    assert await env.store.window(ConversationKey(w.guild.id, w.general.id), 5) == []


async def test_a_message_deleted_while_its_job_is_submitted_leaks_nothing_when_the_cancel_fails(
    env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The cancel ran outside the cleanup: a Redis blip then left the reply "being written" for good (/regenerate
    refused until a restart) and the asker one place short."""
    from bot.queue.base import QueueUnavailable

    w = env.world
    assert env.app.bot is not None
    cog = env.app.bot.get_cog("ChatCog")
    chat = cog.chat
    start_reply, submitting, go_on = chat.start_reply, asyncio.Event(), asyncio.Event()

    async def slow_start(*args: object, **kwargs: object) -> object:
        submitting.set()
        await go_on.wait()
        return await start_reply(*args, **kwargs)  # type: ignore[arg-type]

    async def queue_down(job_id: str) -> None:
        raise QueueUnavailable("redis blip")

    monkeypatch.setattr(chat, "start_reply", slow_start)
    env.llm.script(Reply("never shown"))
    asked = await env.fake.send_message(w.general, w.alice, f"{mention(env)} spam")
    await asyncio.wait_for(submitting.wait(), 10)
    await env.fake.delete_message(asked)
    await eventually(lambda: asked.id in cog._deleted)
    monkeypatch.setattr(chat.queue, "cancel", queue_down)
    with caplog.at_level(logging.WARNING):
        go_on.set()
        await eventually(lambda: "redis blip" in caplog.text)
    assert not cog.running and asked.id not in cog._answering and not chat.shares._held


async def test_a_reply_to_a_deleted_message_is_not_stored_when_withdrawing_it_fails(env: Env) -> None:
    w = env.world
    assert env.app.bot is not None
    cog = env.app.bot.get_cog("ChatCog")
    env.llm.script(Reply("word " * 300, chunk_chars=5, delay_s=0.02))
    asked = await env.fake.send_message(w.general, w.alice, f"{mention(env)} something a mod will delete")
    await env.fake.wait_for_message(w.general, lambda m: m.webhook_id is not None)
    env.fake.inject_error("DELETE", "/webhooks/{webhook_id}/{token}/messages/{message_id}", status=403, times=1000)
    await env.fake.delete_message(asked)
    await eventually(lambda: not cog.running, timeout=10)
    await asyncio.sleep(0.3)  # storing would follow at once
    assert await env.store.window(ConversationKey(w.guild.id, w.general.id), 5) == []


async def test_a_notice_discord_refuses_is_logged_not_raised(
    fake_discord: FakeDiscord, discord_world: World, llm: OpenAITestServer, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from tests.openai_test_server import Stall

    w = discord_world
    settings = make_settings(fake_discord, llm, tmp_path, queue_max_waiting=1, max_batch_size=1)
    async with BotApp(settings, guild_ready_timeout=0.1) as app:
        env = Env(fake_discord, w, llm, app)
        llm.script(Stall(3.0), Reply("second"))
        await fake_discord.send_message(w.general, w.alice, f"{mention(env)} one")
        await fake_discord.wait_for(lambda: llm.requests, what="the first job in generation")
        await fake_discord.send_message(w.thread, w.bob, f"{mention(env)} two")
        assert app.queue is not None
        await eventually(app.queue.depth)
        dm = await fake_discord.open_dm(w.alice)
        fake_discord.inject_error("POST", "/channels/{channel_id}/messages", status=403, code=50007,
                                  message="Cannot send messages to this user")
        with caplog.at_level(logging.WARNING):
            await fake_discord.send_message(dm, w.alice, "three")  # busy: its notice is refused
            await fake_discord.wait_for(
                lambda: "could not deliver a reply or notice" in caplog.text, what="the refusal logged"
            )
        assert "Ignoring exception" not in caplog.text  # nothing escaped to discord.py's error handler


def test_persona_list_is_cut_at_a_line_with_a_count_of_the_rest() -> None:
    lines = [f"**Persona {i}** (`p{i}`) " + "d" * 80 for i in range(40)]
    text = fit_lines(lines, 1900)
    shown = text.splitlines()
    assert len(text) <= 2000 and shown[:-1] == lines[: len(shown) - 1]
    assert shown[-1] == f"…and {40 - (len(shown) - 1)} more."
    assert fit_lines(lines[:3], 1900) == "\n".join(lines[:3])


def test_a_long_persona_name_is_cut_in_its_autocomplete_choice() -> None:
    """Discord refuses the whole autocomplete answer when one choice's name passes 100 characters."""
    long = Persona(id="the_" + "x" * 40, name="The " + "Very " * 13 + "Long Name", system_prompt="hi")
    choice = persona_choice(long)
    assert len(choice.name) == 100 and choice.name.endswith(f"… ({long.id})") and choice.value == long.id
    assert persona_choice(Persona(id="ed", name="Ed", system_prompt="hi")).name == "Ed (ed)"


# -- sharding ------------------------------------------------------------------------------------------


async def guild_on_shard(fake: FakeDiscord, shard: int, count: int, member: User) -> Channel:
    """#general of a new guild whose events Discord routes to `shard` of `count`."""
    while True:
        guild = await fake.add_guild(f"shard-{shard}-guild")
        if (guild.id >> 22) % count == shard:
            await fake.add_member(guild, member)
            return await fake.add_channel(guild, "general")
        await asyncio.sleep(0.002)  # the next snowflake's millisecond decides its shard


async def each_answered_once(
    fake: FakeDiscord, llm: OpenAITestServer, channels: list[Channel], author: User, text: str
) -> None:
    """A mention in each channel gets exactly one reply `text`: no shard misses it or answers twice."""
    llm.script(*(Reply(text) for _ in channels))
    for channel in channels:
        await fake.send_message(channel, author, f"<@{fake.bot_user.id}> hi")
    for channel in channels:
        await fake.wait_for_message(channel, lambda m: m.webhook_id is not None and m.content == text)
    await asyncio.sleep(0.3)  # a second answer from a wrongly routed shard would show by now
    for channel in channels:
        assert [m.content for m in fake.bot_messages(channel) if m.webhook_id is not None] == [text]


async def test_one_process_runs_every_shard_discord_recommends(
    fake_discord: FakeDiscord, discord_world: World, llm: OpenAITestServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The second shard identifies 5 s after the first (discord.py keeps Discord's rate): READY for all
    takes that long on top of the usual wait, which 13 shards used to overrun (here: 2 and a 2 s wait)."""
    monkeypatch.setattr(app_module, "READY_TIMEOUT_S", 2.0)
    fake_discord.recommended_shards = 2
    w = discord_world
    channels = [await guild_on_shard(fake_discord, shard, 2, w.alice) for shard in (0, 1)]
    async with BotApp(make_settings(fake_discord, llm, tmp_path), guild_ready_timeout=0.1) as app:
        assert app.bot is not None and sorted(app.bot.shards) == [0, 1]
        await each_answered_once(fake_discord, llm, channels, w.alice, "Hello from a shard.")


async def test_two_processes_split_the_shards_of_one_token(
    fake_discord: FakeDiscord, discord_world: World, llm: OpenAITestServer, tmp_path: Path
) -> None:
    w = discord_world
    channels = [await guild_on_shard(fake_discord, shard, 2, w.alice) for shard in (0, 1)]
    first = make_settings(fake_discord, llm, tmp_path, shard_count=2, shard_ids=[0])
    second = make_settings(fake_discord, llm, tmp_path, shard_count=2, shard_ids=[1])
    async with BotApp(first, guild_ready_timeout=0.1) as app0, BotApp(second, guild_ready_timeout=0.1) as app1:
        assert app0.bot is not None and app1.bot is not None
        assert app0.bot.get_channel(channels[0].id) and not app0.bot.get_channel(channels[1].id)
        assert app1.bot.get_channel(channels[1].id) and not app1.bot.get_channel(channels[0].id)
        await each_answered_once(fake_discord, llm, channels, w.alice, "One of us answers.")


# -- slash command registration ------------------------------------------------------------------------


async def test_slash_commands_are_written_only_when_they_changed(
    fake_discord: FakeDiscord, discord_world: World, llm: OpenAITestServer, tmp_path: Path
) -> None:
    settings = make_settings(fake_discord, llm, tmp_path)
    async with BotApp(settings, guild_ready_timeout=0.1):
        pass
    writes = fake_discord.requests_to("PUT", "/applications/{app_id}/commands")
    assert len(writes) == 1 and {c["name"] for c in fake_discord.commands()} >= {"persona", "regenerate"}
    async with BotApp(settings, guild_ready_timeout=0.1):  # a restart with the same commands
        pass
    assert len(fake_discord.requests_to("PUT", "/applications/{app_id}/commands")) == 1
    assert len(fake_discord.requests_to("GET", "/applications/{app_id}/commands")) == 2
    fake_discord.global_commands[0]["description"] = "an older description"  # a deploy changed it
    async with BotApp(settings, guild_ready_timeout=0.1):
        pass
    assert len(fake_discord.requests_to("PUT", "/applications/{app_id}/commands")) == 2


def test_command_signature_ignores_what_discord_adds() -> None:
    ours = {"name": "autorespond", "description": "Answer every message", "type": 1, "options": [
        {"name": "mode", "description": "on or off", "type": 3, "required": True,
         "choices": [{"name": "on", "value": "on"}, {"name": "off", "value": "off"}]},
        {"name": "quiet", "description": "say nothing", "type": 5, "required": False},
    ]}
    theirs = {"id": "1", "application_id": "2", "version": "3", "dm_permission": True, "nsfw": False,
              "default_member_permissions": None, "name": "autorespond", "description": "Answer every message",
              "type": 1, "options": [
                  {"name": "mode", "description": "on or off", "type": 3, "required": True,
                   "choices": [{"name": "off", "value": "off"}, {"name": "on", "value": "on"}]},
                  {"name": "quiet", "description": "say nothing", "type": 5},  # Discord omits required: false
              ]}
    assert command_signature(ours) == command_signature(theirs)
    assert command_signature(ours) != command_signature({**theirs, "description": "Answer all"})
    assert command_signature(ours) != command_signature({**theirs, "default_member_permissions": "16"})
    autocompleted = {**ours, "options": [{**ours["options"][0], "autocomplete": True}, ours["options"][1]]}
    assert command_signature(ours) != command_signature(autocompleted)
    bounded = {**ours, "options": [ours["options"][0], {**ours["options"][1], "type": 3, "max_length": 20}]}
    unbounded = {**ours, "options": [ours["options"][0], {**ours["options"][1], "type": 3}]}
    assert command_signature(bounded) != command_signature(unbounded)


# -- database outage -----------------------------------------------------------------------------------


async def test_a_database_outage_gets_an_apology_and_the_bot_recovers(
    fake_discord: FakeDiscord, discord_world: World, llm: OpenAITestServer, tmp_path: Path,
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture,
) -> None:
    """A real outage: PostgreSQL stops letting the bot's database be used, then lets it again."""
    server_url = str(request.getfixturevalue("postgres_url"))
    admin_url = server_url.replace("postgresql+asyncpg", "postgresql")
    database_url = await create_database(server_url)
    name = database_url.rsplit("/", 1)[1]

    async def allow_connections(allowed: bool) -> None:
        admin = await asyncpg.connect(admin_url)
        try:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allowed).lower()}')
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
        finally:
            await admin.close()

    w = discord_world
    await upgrade_async(database_url)
    settings = make_settings(fake_discord, llm, tmp_path).model_copy(update={"database_url": database_url})
    async with BotApp(settings, guild_ready_timeout=0.1) as app:
        env = Env(fake_discord, w, llm, app)
        llm.script(Reply("Before."), Reply("After."))
        await fake_discord.send_message(w.general, w.alice, f"{mention(env)} one")
        await persona_reply(env, w.general, "Before.")
        await allow_connections(False)
        with caplog.at_level(logging.WARNING):
            await fake_discord.send_message(w.general, w.bob, f"{mention(env)} two")
            sorry = await fake_discord.wait_for_message(w.general, lambda m: "can't reach my memory" in m.content)
        assert sorry.webhook_id is None and "Ignoring exception" not in caplog.text
        assert "can't reach my memory" in await slash(env, "reset")
        # The channel's settings were read before the outage and are kept in memory: still shown.
        assert "Auto-respond: off" in await slash(env, "persona show", user=w.alice)
        await allow_connections(True)
        await fake_discord.send_message(w.general, w.alice, f"{mention(env)} three")
        await persona_reply(env, w.general, "After.")
        assert len(llm.requests) == 2  # "two" never reached the model


# -- personas while running ----------------------------------------------------------------------------


async def test_an_edited_persona_file_applies_without_a_restart(
    fake_discord: FakeDiscord, discord_world: World, llm: OpenAITestServer, tmp_path: Path
) -> None:
    personas = tmp_path / "personas"
    shutil.copytree(ROOT / "personas", personas)
    w = discord_world
    settings = make_settings(fake_discord, llm, tmp_path, personas_dir=personas)
    async with BotApp(settings, guild_ready_timeout=0.1) as app:
        env = Env(fake_discord, w, llm, app)
        assert app.bot is not None
        app.bot.get_cog("ChatCog").chat.personas.refresh_every_s = 0.0
        llm.script(Reply("First."), Reply("Second."))
        await fake_discord.send_message(w.general, w.alice, f"{mention(env)} hi")
        assert (await persona_reply(env, w.general, "First.")).username == "Hermes 2"
        hermes = personas / "hermes.yaml"
        hermes.write_text(hermes.read_text().replace("name: Hermes 2", "name: Hermes Three"))
        await fake_discord.send_message(w.general, w.alice, f"{mention(env)} again")
        assert (await persona_reply(env, w.general, "Second.")).username == "Hermes Three"


async def test_a_persona_named_with_a_word_discord_reserves_still_speaks_through_the_webhook(
    fake_discord: FakeDiscord, discord_world: World, llm: OpenAITestServer, tmp_path: Path
) -> None:
    """Discord refuses webhook usernames containing "clyde" or "discord" (the fake does too): such a
    persona's every reply failed, silently, after the model had written it."""
    personas = tmp_path / "personas"
    shutil.copytree(ROOT / "personas", personas)
    (personas / "clyde.yaml").write_text("name: Clyde Barrow of Discord\nsystem_prompt: You are Clyde.\n")
    w = discord_world
    settings = make_settings(fake_discord, llm, tmp_path, personas_dir=personas, default_persona="clyde")
    async with BotApp(settings, guild_ready_timeout=0.1) as app:
        env = Env(fake_discord, w, llm, app)
        llm.script(Reply("Howdy."))
        await fake_discord.send_message(w.general, w.alice, f"{mention(env)} hello?")
        assert (await persona_reply(env, w.general, "Howdy.")).username == "Clyd\u0435 Barrow of Disc\u043erd"


async def test_an_unknown_default_persona_stops_the_start_with_a_clear_error(
    fake_discord: FakeDiscord, discord_world: World, llm: OpenAITestServer, tmp_path: Path
) -> None:
    settings = make_settings(fake_discord, llm, tmp_path, default_persona="hermes3")
    with pytest.raises(UnknownPersona, match=r"HERMES_DEFAULT_PERSONA: unknown persona 'hermes3' \(known: assistant, "):
        async with BotApp(settings, guild_ready_timeout=0.1):
            pass


async def test_forget_me_erases_what_the_user_wrote_everywhere(env: Env) -> None:
    w = env.world
    env.llm.script(Reply("Noted."), Reply("Noted too."))
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} my secret is 42")
    await persona_reply(env, w.general, "Noted.")
    await env.fake.send_message(w.thread, w.bob, f"{mention(env)} bob was here")
    await persona_reply(env, w.thread, "Noted too.")
    await env.fake.send_message(w.thread, w.alice, "and another thing")
    thread_key = ConversationKey(w.guild.id, w.general.id, w.thread.id)

    async def stored() -> bool:  # the reply is stored just after it is shown: it may come after her line
        return {"and another thing", "Noted too."} <= {m.content for m in await env.store.window(thread_key, 10)}

    await eventually(stored)
    answer = await slash(env, "forget-me", user=w.alice)
    assert "erased 2 messages of yours" in answer
    channel = await env.store.window(ConversationKey(w.guild.id, w.general.id), 10)
    thread = await env.store.window(ConversationKey(w.guild.id, w.general.id, w.thread.id), 10)
    assert [m.content for m in channel] == ["Noted."]
    assert [m.content for m in thread] == ["bob was here", "Noted too."]
    assert "nothing you wrote" in await slash(env, "forget-me", user=w.alice)


@pytest.mark.parametrize("handing_off", ["Sherlock, what do you make of this?", '*turns* "Sherlock, what now?"'])
async def test_a_persona_hands_the_turn_to_another_it_addresses(env: Env, handing_off: str) -> None:
    w = env.world
    assert "Sherlock" in await slash(env, "persona add", {"persona": "sherlock_holmes"})
    env.llm.script(Reply(handing_off), Reply("Hermes, it is elementary."), Reply("One too many."))
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} someone stole the tarts")
    assert (await persona_reply(env, w.general, handing_off)).username == "Hermes 2"
    sherlock = await persona_reply(env, w.general, "Hermes, it is elementary.")
    assert sherlock.username == "Sherlock Holmes"
    asked = [m["content"] for m in env.llm.requests[1]["messages"]]
    assert any(handing_off in text for text in asked)  # he saw what he was asked
    await asyncio.sleep(0.3)
    assert len(env.llm.requests) == 2  # HERMES_PERSONA_HAND_OFFS=1: Sherlock's answer hands nothing on


async def test_a_persona_mentioning_another_in_passing_keeps_the_floor(env: Env) -> None:
    w = env.world
    assert "Sherlock" in await slash(env, "persona add", {"persona": "sherlock_holmes"})
    env.llm.script(Reply("Holmes was wrong about the map, of course."), Reply("must not be asked"))
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} where is the treasure?")
    await persona_reply(env, w.general, "Holmes was wrong about the map, of course.")
    await asyncio.sleep(0.3)
    assert len(env.llm.requests) == 1


async def test_no_hand_off_once_shutdown_began(env: Env) -> None:
    w = env.world
    assert "Sherlock" in await slash(env, "persona add", {"persona": "sherlock_holmes"})
    env.llm.script(Reply("Sherlock, what do you make of this?", chunk_chars=4, delay_s=0.05), Reply("Too late."))
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} someone stole the tarts")
    await env.fake.wait_for(  # Sherlock's greeting came first
        lambda: [m for m in env.fake.bot_messages(w.general) if m.username == "Hermes 2"], what="the reply streaming"
    )
    assert env.app.bot is not None
    drained = asyncio.create_task(env.app.bot.get_cog("ChatCog").drain(10))  # what shutdown does first
    await persona_reply(env, w.general, "Sherlock, what do you make of this?")
    assert await drained  # the reply in flight finished, and nothing started after it
    assert len(env.llm.requests) == 1


async def test_a_persona_that_joins_a_channel_greets_it_once(env: Env) -> None:
    w = env.world
    greeting = "The tavern door creaks open as rain lashes the cobblestones outside. Who steps in from the storm?"
    assert "Narrator" in await slash(env, "persona set", {"persona": "narrator"})
    posted = await persona_reply(env, w.general, greeting)
    assert posted.username == "Narrator"
    key = ConversationKey(w.guild.id, w.general.id)
    stored = await eventually(lambda: env.store.window(key, 5))
    assert [(m.role, m.persona_id, m.content) for m in stored] == [("assistant", "narrator", greeting)]
    await slash(env, "persona set", {"persona": "narrator"})  # already the default: no second greeting
    await slash(env, "persona add", {"persona": "narrator"})  # already here
    sherlock = "You have been in a hurry this morning, I perceive. Pray, sit down and state your case."
    await slash(env, "persona add", {"persona": "sherlock_holmes"})
    await persona_reply(env, w.general, sherlock)
    await slash(env, "persona set", {"persona": "sherlock_holmes"})  # here already: he greeted when he came
    assert [m.content for m in env.fake.bot_messages(w.general) if m.webhook_id == posted.webhook_id] == [greeting, sherlock]
    await slash(env, "persona set", {"persona": "narrator"})
    env.llm.script(Reply("You shake the rain off your cloak."))
    await env.fake.send_message(w.general, w.alice, "Mira: I step inside.")  # the greeting made it take part
    await env.fake.send_message(w.general, w.alice, f"{mention(env)} what do I see?")
    await persona_reply(env, w.general, "You shake the rain off your cloak.")
    context = [m["content"] for m in env.llm.requests[-1]["messages"]]
    assert any(greeting in text for text in context)  # the model continues the scene it set
    assert any("I step inside." in text for text in context)  # stored although nobody addressed the bot


async def test_webhooks_are_remembered_for_the_channels_used_last_only(env: Env) -> None:
    """One webhook per channel the bot ever spoke in, deleted channels included, stayed in memory for the
    life of the process; beyond the newest ones a channel costs a lookup again (its webhook is reused)."""
    w = env.world
    assert env.app.bot is not None
    channels = [w.general, await env.fake.add_channel(w.guild, "second"), await env.fake.add_channel(w.guild, "third")]
    identities = Identities(remembered=2)
    persona = Persona(id="hermes", name="Hermes 2", system_prompt="You are Hermes.")

    async def outlet_in(channel: Channel):  # type: ignore[no-untyped-def]
        return await identities.outlet(env.app.bot.get_channel(channel.id), persona)  # type: ignore[union-attr, arg-type]

    def lookups(channel: Channel) -> int:
        return sum(r.path.endswith(f"/channels/{channel.id}/webhooks") for r in env.fake.requests_to(
            "GET", "/channels/{channel_id}/webhooks"))

    first = await outlet_in(channels[0])  # a reply holds this outlet while the others come and go
    for channel in channels[1:]:
        await outlet_in(channel)
    await outlet_in(channels[2])  # remembered
    await outlet_in(channels[0])  # forgotten for the two used after it
    assert [lookups(c) for c in channels] == [2, 1, 1]
    assert len(env.fake.requests_to("POST", "/channels/{channel_id}/webhooks")) == 3  # one webhook each, reused
    # A moderator deletes that webhook: the reply holding the first lookup's object must make it forgotten,
    # though the registry now holds another object for it (looked up again), or every reply would reuse it.
    await identities.replace(first, env.app.bot.get_channel(channels[0].id), persona)  # type: ignore[union-attr, arg-type]
    assert lookups(channels[0]) == 3
