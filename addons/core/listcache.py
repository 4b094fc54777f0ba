"""Bounded caches keyed by what an upstream list result holds (the digest of its exact text,
addons/core/record.py ResultSource): a tools/list answered again with the same tools costs
a dictionary lookup instead of a pass over every tool. Pure; no mitmproxy."""
from __future__ import annotations

from addons.core.lru import LRU

MAX_ENTRIES = 1024


class LearnedLists:
    """Which list result (digest) a stage last learned from, per connection: the same result
    again teaches nothing new, so learning it can be skipped. A stage whose learned state
    loses entries (bounded, oldest out) calls forget(): then every list is learned afresh."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._last = LRU(max_entries)

    def seen(self, connection: str, digest: bytes | None) -> bool:
        return digest is not None and self._last.get(connection) == digest

    def learned(self, connection: str, digest: bytes | None) -> None:
        """After learning a list of `connection` (digest None: of unknown text)."""
        self._last.put(connection, digest)

    def forget(self) -> None:
        self._last.clear()
