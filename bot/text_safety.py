"""Text from outside (Discord's gateway, an OpenAI-compatible server's stream) made safe to store and send.

JSON may escape a UTF-16 surrogate ("\\ud83d") and `json.loads` keeps it, but no UTF-8 encoder takes one: SQLite's
driver raises, PostgreSQL refuses the row and a queue event fails to serialise. PostgreSQL text also holds no NUL.
The store, the queue's wire types and the engines clean text where it enters, with these two functions.
"""

from __future__ import annotations

import re

SURROGATES = re.compile("[\ud800-\udfff]")


def well_formed(text: str) -> str:
    """`text` as valid Unicode: an emoji written as two surrogates ("\\ud83d\\ude00") is joined into its one
    character; a lone surrogate becomes U+FFFD, so the reader sees that something was there."""
    if SURROGATES.search(text) is None:
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def storable(text: str) -> str:
    """`well_formed` text without NUL characters, which PostgreSQL text cannot hold (SQLite can): a model's byte
    fallback may write one, and the whole turn would fail to store on one database only."""
    return well_formed(text).replace("\x00", "")
