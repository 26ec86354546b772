"""Token ids -> streamed text: incremental detokenization and stop strings.

Both are per-request and pure (no model), so the engines share them and tests pin their edge cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without re-decoding the whole reply.

    Byte-level BPE can split one UTF-8 character over several tokens (and one token can hold the end
    of one character and the start of the next), so trailing U+FFFD of an incomplete character is held
    back until it completes. Only a short window of recent tokens is decoded; the window restarts at a
    point where the text ends on a complete character, keeping a few tokens of context so tokenizers
    that encode spaces in the next token (SentencePiece's "▁") still decode spacing right. A window also
    starts on a whole character: Llama/Mistral tokenizers spell emoji as byte tokens (`<0xF0><0x9F>...`),
    and their decoder turns a whole run of byte tokens into U+FFFD when the run starts mid-character.
    """

    CONTEXT = 4  # tokens kept before the window's new text

    def __init__(self, tokenizer: Any, shown: Sequence[int] = ()) -> None:
        """`shown`: the ids of text the reader already has (a resumed reply's start). Its last tokens open
        the window, so the first new token decodes as a continuation: a SentencePiece decoder drops the
        space of a text's first token ("▁world" alone is "world")."""
        self.tokenizer = tokenizer
        self.ids: list[int] = list(shown)
        self._start = 0  # first token of the decode window
        self._sent = 0  # characters of decode(ids[_start:]) returned
        if shown:
            text = self._decode(shown)
            self._start, self._sent = self._window_start(text) or (0, len(text))

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is still partial)."""
        self.ids.append(token_id)
        full = self._decode(self.ids[self._start :])
        complete = full.rstrip("\ufffd")
        delta = complete[self._sent :]
        self._sent = max(self._sent, len(complete))
        if complete == full and len(self.ids) - self._start > 2 * self.CONTEXT:
            self._start, self._sent = self._window_start(full) or (self._start, self._sent)
        return delta

    def _window_start(self, text: str) -> tuple[int, int] | None:
        """The latest start at least CONTEXT tokens back whose decoding is `text`'s end (the decoding of the
        current window) and begins on a whole character, with that decoding's length; None if there is none."""
        for start in range(len(self.ids) - self.CONTEXT, self._start, -1):
            piece = self._decode(self.ids[start:])
            if text.endswith(piece) and not piece.startswith("\ufffd"):
                return start, len(piece)
        return None


class StopMatcher:
    """Finds stop strings in streamed text, trims them, and holds back text that may start one.

    `feed(text)` returns (safe_text, stopped). Text that could be the beginning of a stop string stays
    buffered until the next chunk proves it is not; `flush()` releases it when generation ends otherwise.
    A stop may begin in the text before the reply (`before`): the reply starts a line of its own, so one
    that opens with "Bob:" matches the impersonation stop "\\nBob:" like any later line does.
    """

    def __init__(self, stops: Sequence[str], before: str = "") -> None:
        self.stops = [s for s in stops if s]
        self._keep = max((len(s) for s in self.stops), default=1) - 1  # context a stop can reach back into
        self._before = self._tail(before)
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        context, buffer = self._before, self._pending + text
        seen = context + buffer
        # Only stops that end in the new text: the context itself was checked when it was new.
        found = (seen.find(s, max(0, len(context) - len(s) + 1)) for s in self.stops)
        first = min((i for i in found if i >= 0), default=-1)
        if first >= 0:
            self._pending = ""
            return buffer[: max(0, first - len(context))], True
        hold = min(self._partial_suffix(seen), len(buffer))
        self._pending = buffer[len(buffer) - hold :] if hold else ""
        safe = buffer[: len(buffer) - hold]
        self._before = self._tail(context + safe)
        return safe, False

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return text

    def _tail(self, text: str) -> str:
        """The end of `text` a stop could still reach back into."""
        return text[max(0, len(text) - self._keep) :]

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:n]):
                    best = n
                    break
        return best
