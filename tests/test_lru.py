"""The capped most-recently-used mapping behind the bot's in-memory records."""

from __future__ import annotations

from bot.lru import LRU


def test_the_least_recently_used_entry_goes_first() -> None:
    recent: LRU[str, int] = LRU(3)
    recent["a"], recent["b"], recent["c"] = 1, 2, 3
    assert recent.get("a") == 1  # read: now the newest
    recent["b"] = 20  # written: now the newest
    recent["d"] = 4
    assert list(recent) == ["a", "b", "d"] and recent["b"] == 20
    assert "c" not in recent and recent.get("c") is None and len(recent) == 3


def test_membership_does_not_keep_an_entry() -> None:
    recent: LRU[int, None] = LRU(2)
    recent[1], recent[2] = None, None
    assert 1 in recent
    recent[3] = None
    assert list(recent) == [2, 3]
    del recent[2]
    assert list(recent) == [3]
