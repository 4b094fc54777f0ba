"""Bounded caches keyed by what an upstream list result holds (the digest of its exact text,
addons/core/record.py ResultSource): a tools/list answered again with the same tools costs
a dictionary lookup instead of a pass over every tool. Pure; no mitmproxy."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Hashable

MAX_ENTRIES = 1024


class LRU:
    """A small least-recently-used map: at most `max_entries` keys, the oldest dropped."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self.max = max_entries

    def get(self, key: Hashable) -> Any:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: Hashable, value: Any) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


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
