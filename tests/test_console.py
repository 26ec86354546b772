"""`hermes-bot chat` driven through stdin in a subprocess: tiny model, in-process worker, SQLite store."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.console import _converse, console_key
from bot.devtools import write_tiny_model
from bot.personas import Persona
from bot.queue.jobs import Done, TextDelta
from bot.store.repository import ConversationStore
from tests.services import free_port

ROOT = Path(__file__).resolve().parent.parent


def chat_env(tmp_path: Path, model: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HERMES_MODEL": str(model),
        "HERMES_DEVICE": "cpu",
        "HERMES_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}",
        "HERMES_PERSONAS_DIR": str(ROOT / "personas"),
        "HERMES_QUEUE_URL": "memory://",
        "HERMES_LOG_LEVEL": "WARNING",
    }


def chat(stdin: str | bytes, tmp_path: Path, model: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    # Bytes, decoded here: text=True would turn a "\r" in the random model's reply into "\n".
    done = subprocess.run(
        [sys.executable, "-m", "bot", "chat", *args], input=stdin if isinstance(stdin, bytes) else stdin.encode(),
        capture_output=True,
        env=chat_env(tmp_path, model) | env, cwd=tmp_path, timeout=120,
    )
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


async def test_chat_through_stdin(tmp_path: Path, tiny_model_dir: Path) -> None:
    script = "hello there\n/reset\n\n/hlep\n/help\nhi again\n/exit\nnever sent\n"
    result = chat(script, tmp_path, tiny_model_dir, "--persona", "hermes")
    assert result.returncode == 0, result.stderr
    assert "(unknown command /hlep; /help lists them)" in result.stderr  # a typo is no message to the persona
    assert result.stderr.count("/quit (or /exit) leaves") == 2  # the banner, then /help
    lines = result.stdout.split("\n")
    assert lines[0] == "Hermes 2: Hi there! My name is Hermes 2. How can I help you today?"
    assert sum(line.startswith("Hermes 2: ") for line in lines) >= 3  # greeting + two streamed replies
    assert "(history cleared)" in result.stderr
    store = await ConversationStore.open(f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}")
    try:
        history = await store.window(console_key("hermes"), 10)
    finally:
        await store.close()
    assert [m.role for m in history] == ["user", "assistant"]  # /reset dropped the first exchange
    assert history[0].content == "hi again" and history[1].persona_id == "hermes"
    assert history[1].content and history[1].content in result.stdout


async def test_the_greeting_is_the_first_turn_and_a_later_session_continues(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The model must see the greeting it answers after (Sherlock asks you to state your case), and a
    second session goes on from the stored history instead of greeting again. A byte that is not UTF-8
    is read as a replacement character, not a crash."""
    first = chat("It is about my brother.\n", tmp_path, tiny_model_dir, "--persona", "sherlock_holmes")
    assert first.returncode == 0, first.stderr
    again = chat(b"caf\xe9?\n", tmp_path, tiny_model_dir, "--persona", "sherlock_holmes")
    assert again.returncode == 0, again.stderr
    assert first.stdout.startswith("Sherlock Holmes: You have been in a hurry")
    assert "You have been in a hurry" not in again.stdout and "continuing the conversation" in again.stderr
    store = await ConversationStore.open(f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}")
    try:
        history = await store.window(console_key("sherlock_holmes"), 10)
    finally:
        await store.close()
    assert [m.role for m in history] == ["assistant", "user", "assistant", "user", "assistant"]
    assert history[0].content.startswith("You have been in a hurry") and history[3].content == "caf\ufffd?"


class ScriptedReplies:
    """A ChatService stand-in whose persona replies with the given text, streamed in the given pieces."""

    def __init__(self, *pieces: str) -> None:
        self.pieces = pieces
        self.stored: list[str] = []
        self.store = self

    async def window(self, key: Any, limit: int) -> list[Any]:
        return []

    async def record_user_turn(self, key: Any, **fields: Any) -> bool:
        return True

    async def start_reply(self, key: Any, persona: Persona) -> Any:
        pieces = self.pieces

        class Pending:
            position = 1

            async def events(self) -> AsyncIterator[TextDelta | Done]:
                for seq, piece in enumerate(pieces):
                    yield TextDelta(job_id="j", seq=seq, text=piece)
                yield Done(job_id="j", finish_reason="stop")

        return Pending()

    async def store_reply(self, key: Any, persona: Persona, text: str) -> bool:
        self.stored.append(text)
        return True


@pytest.mark.parametrize(
    ("pieces", "shown"),
    [
        (("Mira", " Va", "nce", ": *grins*", " Aye."), "*grins* Aye."),
        (("**Mira Vance:**", " Aye."), "Aye."),
        (("Mira", " thinks so."), "Mira thinks so."),
        (("Mira",), "Mira"),  # the whole reply: held back while it could become "Mira Vance:", then shown
    ],
)
async def test_a_reply_is_shown_and_stored_without_a_label_of_its_own_name(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], pieces: tuple[str, ...], shown: str
) -> None:
    """The terminal prints "Mira Vance: " before each reply itself: a model that starts with its own name
    too printed "Mira Vance: Mira Vance: ...", and stored it so for the next prompts."""
    mira = Persona(id="mira", name="Mira Vance", system_prompt="You are Mira.")
    service = ScriptedReplies(*pieces)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Ahoy\n"))
    await _converse(service, None, mira)  # type: ignore[arg-type]
    assert capsys.readouterr().out == f"Mira Vance: {shown}\n"
    assert service.stored == [shown]


def test_unknown_persona_is_a_clear_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    result = chat("", tmp_path, tiny_model_dir, "--persona", "nobody")
    assert result.returncode == 2
    assert "unknown persona 'nobody'" in result.stderr and "hermes" in result.stderr


def test_an_unknown_default_persona_names_the_setting(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Without --persona the id comes from HERMES_DEFAULT_PERSONA, which the error did not say."""
    done = chat("", tmp_path, tiny_model_dir, HERMES_DEFAULT_PERSONA="nobody")
    assert done.returncode == 2
    assert done.stderr.startswith("hermes-bot: HERMES_DEFAULT_PERSONA: unknown persona 'nobody' (known: assistant, ")


async def test_an_openai_server_that_does_not_answer_ends_the_chat_before_it_begins(tmp_path: Path) -> None:
    """It printed "loading teknium/OpenHermes-2.5-Mistral-7B ..." though nothing loads, stored every line typed
    with "(error: cannot reach ...)" for an answer, and exited 0."""
    url = f"http://127.0.0.1:{free_port()}/v1"
    done = chat("hello\n", tmp_path, tmp_path, HERMES_ENGINE="openai", HERMES_OPENAI_BASE_URL=url,
                HERMES_MODEL="openhermes")
    assert done.returncode == 1 and done.stdout == ""
    assert "loading" not in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.endswith(
        f"hermes-bot: the OpenAI-compatible server at {url} does not answer (HERMES_OPENAI_BASE_URL); start it, or "
        "check the URL\n"
    )
    store = await ConversationStore.open(f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}")
    try:
        assert await store.window(console_key("hermes"), 10) == []  # neither the greeting nor an unanswered "hello"
    finally:
        await store.close()


def test_ctrl_c_at_the_prompt_ends_the_chat(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Ctrl-C while chat waits for a line: it exits (130) at once, not after the next Enter."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bot", "chat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=chat_env(tmp_path, tiny_model_dir), cwd=tmp_path,
    )
    try:
        assert proc.stderr is not None
        while b"Chatting with" not in (line := proc.stderr.readline()):
            assert line, "chat ended before its prompt"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130  # stdin stays open: before, it waited for a line forever
    finally:
        proc.kill()
        proc.wait()


def test_ctrl_c_pressed_again_while_the_chat_stops_ends_it_quietly(tmp_path: Path) -> None:
    """One Ctrl-C mid-reply takes a second or two to stop, which invites more presses: the next one ended the
    process while the engine's thread was inside torch, and it aborted ("terminate called without an active
    exception", 3 runs in 4) or printed a KeyboardInterrupt traceback. A model slow enough to still be writing."""
    model = write_tiny_model(tmp_path / "model", hidden_size=512, layers=8, heads=8, kv_heads=4)
    for attempt in range(2):
        proc = subprocess.Popen(
            [sys.executable, "-m", "bot", "chat", "--persona", "hermes"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
            env={**chat_env(tmp_path / f"run{attempt}", model), "HERMES_CPU_THREADS": "1"},
        )
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(b"tell me a long story\n")
            proc.stdin.flush()
            shown = b""
            while shown.count(b"Hermes 2: ") < 2:  # the greeting, then the reply being written
                chunk = os.read(proc.stdout.fileno(), 100)
                assert chunk, "chat ended before its reply"
                shown += chunk
            time.sleep(0.8)
            for _ in range(3):
                proc.send_signal(signal.SIGINT)
                time.sleep(0.07)
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 130, err.decode()[-2000:]
            assert b"Traceback" not in err and b"terminate" not in err, err.decode()[-2000:]
        finally:
            proc.kill()
            proc.wait()


SLOW_LOAD = """
import sys, time
import bot.engine.transformers_engine as engine
engine.load_model = lambda settings: time.sleep(60)  # a 7B download, which cannot run here
from bot.cli import main
sys.exit(main(["chat"]))
"""


def test_ctrl_c_while_the_model_loads_ends_the_chat_at_once(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The first model load downloads gigabytes: Ctrl-C must not wait for it to finish."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_LOAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**chat_env(tmp_path, tiny_model_dir), "PYTHONPATH": str(ROOT)}, cwd=tmp_path,
    )
    try:
        assert proc.stderr is not None
        while b"loading" not in (line := proc.stderr.readline()):
            assert line, "chat ended before loading its model"
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 130
    finally:
        proc.kill()
        proc.wait()
