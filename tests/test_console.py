"""`hermes-bot chat` driven through stdin in a subprocess: tiny model, in-process worker, SQLite store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from bot.console import console_key
from bot.store.repository import ConversationStore

ROOT = Path(__file__).resolve().parent.parent


def chat(stdin: str | bytes, tmp_path: Path, model: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HERMES_MODEL": str(model),
        "HERMES_DEVICE": "cpu",
        "HERMES_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}",
        "HERMES_PERSONAS_DIR": str(ROOT / "personas"),
        "HERMES_QUEUE_URL": "memory://",
        "HERMES_LOG_LEVEL": "WARNING",
    }
    # Bytes, decoded here: text=True would turn a "\r" in the random model's reply into "\n".
    done = subprocess.run(
        [sys.executable, "-m", "bot", "chat", *args], input=stdin if isinstance(stdin, bytes) else stdin.encode(),
        capture_output=True,
        env=env, cwd=tmp_path, timeout=120,
    )
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


async def test_chat_through_stdin(tmp_path: Path, tiny_model_dir: Path) -> None:
    result = chat("hello there\n/reset\n\nhi again\n", tmp_path, tiny_model_dir, "--persona", "hermes")
    assert result.returncode == 0, result.stderr
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


def test_unknown_persona_is_a_clear_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    result = chat("", tmp_path, tiny_model_dir, "--persona", "nobody")
    assert result.returncode == 2
    assert "unknown persona 'nobody'" in result.stderr and "hermes" in result.stderr


def test_ctrl_c_at_the_prompt_ends_the_chat(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Ctrl-C while chat waits for a line: it exits (130) at once, not after the next Enter."""
    env = {
        **os.environ, "HERMES_MODEL": str(tiny_model_dir), "HERMES_DEVICE": "cpu",
        "HERMES_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}", "HERMES_PERSONAS_DIR": str(ROOT / "personas"),
        "HERMES_QUEUE_URL": "memory://", "HERMES_LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "bot", "chat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=env, cwd=tmp_path,
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
