"""Message splitting: sizes, natural boundaries, and code fences that survive a cut."""

from __future__ import annotations

import random
import re

import pytest

from bot.discord.split import clip, split_message

FENCE = re.compile(r"^[ \t]*```", re.M)


def _balanced(chunk: str) -> bool:
    return len(FENCE.findall(chunk)) % 2 == 0


def test_short_text_is_one_message() -> None:
    assert split_message("hello") == ["hello"]
    assert split_message("") == []
    assert split_message("\n\n") == []


def test_prefers_paragraph_then_line_then_sentence() -> None:
    para = "a" * 1200 + "\n\n" + "b" * 1200
    assert split_message(para) == ["a" * 1200, "b" * 1200]
    lines = "a" * 1200 + "\n" + "b" * 500 + "\n" + "c" * 900
    assert split_message(lines) == ["a" * 1200 + "\n" + "b" * 500, "c" * 900]
    sentences = ("Word " * 200 + "end. ") * 3
    chunks = split_message(sentences.strip())
    assert all(len(c) <= 2000 for c in chunks)
    assert chunks[0].endswith("end.")
    assert "".join(c + " " for c in chunks).split() == sentences.split()


def test_never_cuts_inside_a_code_block_that_fits() -> None:
    code = "```python\n" + "\n".join(f"x{i} = {i}" for i in range(100)) + "\n```"
    text = "Intro line.\n" + "p" * 1300 + "\n" + code + "\nAfter."
    chunks = split_message(text)
    assert len(chunks) == 2
    assert chunks[1].startswith("```python\n")
    assert all(_balanced(c) for c in chunks)


def test_long_code_block_is_closed_and_reopened_with_language() -> None:
    body = "\n".join(f"    print('line {i}')" for i in range(300))
    text = "Here you go:\n```python\n" + body + "\n```\nDone."
    chunks = split_message(text)
    assert len(chunks) >= 3
    assert all(len(c) <= 2000 for c in chunks)
    assert all(_balanced(c) for c in chunks)
    for chunk in chunks[1:-1]:
        assert chunk.startswith("```python\n") and chunk.endswith("\n```")
    rejoined = "\n".join(c.removeprefix("```python\n").removesuffix("\n```") for c in chunks)
    assert [ln for ln in rejoined.splitlines() if "print" in ln] == body.splitlines()


def test_one_huge_line_is_hard_cut() -> None:
    chunks = split_message("x" * 4500)
    assert [len(c) for c in chunks] == [2000, 2000, 500]
    code = split_message("```\n" + "y" * 4500 + "\n```")
    assert all(len(c) <= 2000 and _balanced(c) for c in code)


@pytest.mark.parametrize("seed", range(20))
def test_random_markdown_keeps_limits_fences_and_words(seed: int) -> None:
    rng = random.Random(seed)
    parts = []
    for _ in range(rng.randint(5, 40)):
        if rng.random() < 0.3:
            lines = [" ".join(rng.choice(["foo", "bar()", "x=1"]) for _ in range(rng.randint(1, 30)))
                     for _ in range(rng.randint(1, 80))]
            parts.append("```" + rng.choice(["", "py", "js"]) + "\n" + "\n".join(lines) + "\n```")
        else:
            parts.append(" ".join(rng.choice(["lorem", "ipsum.", "dolor!", "sit"]) for _ in range(rng.randint(1, 400))))
    text = rng.choice(["\n\n", "\n"]).join(parts)
    limit = rng.choice([100, 500, 2000])
    chunks = split_message(text, limit)
    assert all(0 < len(c) <= limit for c in chunks)
    assert all(_balanced(c) for c in chunks)
    def letters(t: str) -> str:  # no text lost or duplicated, fences and whitespace aside
        return "".join(FENCE.sub("", t).split()).replace("py", "").replace("js", "")

    assert letters("\n".join(chunks)) == letters(text)


def test_head_is_stable_while_text_grows() -> None:
    """Streaming relies on a finished message never changing as more text arrives."""
    rng = random.Random(7)
    text = " ".join(rng.choice(["alpha", "beta.", "gamma\n", "```py\n", "delta\n\n"]) for _ in range(2000))
    first_heads: dict[int, str] = {}
    for end in range(1900, len(text), 37):
        chunks = split_message(text[:end])
        for i, chunk in enumerate(chunks[:-1]):
            assert first_heads.setdefault(i, chunk) == chunk


def test_clip_marks_where_it_cut() -> None:
    assert clip("short", 10) == "short"
    assert clip("x" * 10, 10) == "x" * 10
    assert clip("x" * 11, 10) == "x" * 9 + "…"
    assert len(clip("y" * 5000)) == 2000
