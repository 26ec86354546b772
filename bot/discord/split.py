"""Split a reply into Discord-sized messages without breaking its Markdown.

The cut is greedy from the start and looks only at the first `limit` characters, so once a reply
has grown past a message, that message's text never changes again: streaming can finish a message
and move on. Boundaries are tried in order of how natural they read (paragraph, line, sentence,
word) and never fall inside a code block; only a code block that is itself too long is cut, at a
line, with the fence closed at the end of one message and reopened (same language) in the next.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DISCORD_LIMIT = 2000
_FENCE = re.compile(r"^[ \t]*```([^\s`]*)", re.M)
_SENTENCE_END = re.compile(r"[.!?…][)\"'”’]*(?=\s)")
_CLOSE = "\n```"


@dataclass(frozen=True)
class _Line:
    start: int
    end: int  # index of the line's "\n", or len(text) for the last line
    fence_before: str | None  # language of the code block open before this line, None outside
    fence_after: str | None
    is_fence: bool


def _lines(text: str) -> list[_Line]:
    lines: list[_Line] = []
    open_lang: str | None = None
    start = 0
    while start <= len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        match = _FENCE.match(text, start, end)
        before = open_lang
        if match:
            lang = match.group(1) if len(match.group(1)) <= 20 else ""
            open_lang = lang if open_lang is None else None
        lines.append(_Line(start, end, before, open_lang, bool(match)))
        start = end + 1
    return lines


def _reopen(lang: str) -> str:
    return f"```{lang}\n"


def _split_once(text: str, limit: int) -> tuple[str, str]:
    """Cut `text` (longer than `limit`) into a head that fits and the rest."""
    lines = _lines(text)
    for minimum in (limit // 2, 1):
        # Outside code: paragraph, then line breaks (cut at the "\n").
        for paragraph in (True, False):
            for line in reversed(lines):
                p = line.end
                if p > limit or p < minimum or p >= len(text) or line.fence_after is not None:
                    continue
                if paragraph and not text.startswith("\n\n", p):
                    continue
                return text[:p].rstrip(), text[p:].lstrip("\n")
        # Outside code, inside a line: after a sentence, then at a space.
        for pattern in (_SENTENCE_END, re.compile(r"[ \t](?=\S)")):
            for line in reversed(lines):
                if line.start >= limit or line.fence_before is not None or line.is_fence:
                    continue
                cuts = [m.end() for m in pattern.finditer(text, line.start, min(line.end, limit))]
                cuts = [p for p in cuts if minimum <= p <= limit]
                if cuts:
                    p = cuts[-1]
                    return text[:p].rstrip(), text[p:].lstrip()
        # Inside a code block that does not fit: at a line, closing and reopening the fence.
        for line in reversed(lines):
            lang = line.fence_after
            p = line.end
            if lang is None or p + len(_CLOSE) > limit or p >= len(text) or p < minimum:
                continue
            if p <= len(_reopen(lang)) + 1 or line.is_fence:
                continue
            return text[:p] + _CLOSE, _reopen(lang) + text[p + 1 :]
    # A single line longer than a message: hard cut, keeping a code block well-formed.
    open_lang = next((ln.fence_before for ln in lines if ln.start <= limit <= ln.end), None)
    if open_lang is not None:
        p = limit - len(_CLOSE)
        return text[:p] + _CLOSE, _reopen(open_lang) + text[p:]
    return text[:limit], text[limit:]


def clip(text: str, limit: int = DISCORD_LIMIT) -> str:
    """`text` cut to `limit` characters, with an ellipsis where it was cut (one message, no split)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def split_message(text: str, limit: int = DISCORD_LIMIT) -> list[str]:
    """The messages that carry `text`, each at most `limit` characters; empty text gives []."""
    if limit < 40:
        raise ValueError("limit must leave room for code fences (at least 40 characters)")
    chunks: list[str] = []
    rest = text.lstrip("\n").rstrip()
    while len(rest) > limit:
        head, rest = _split_once(rest, limit)
        if head.strip():
            chunks.append(head)
    if rest.strip():
        chunks.append(rest)
    return chunks
