"""One bounded least-recently-used map for the gateway's caches (token claims, list
visibility, learned lists). Pure; no mitmproxy."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Hashable


class LRU:
    """At most `max_entries` keys; the least recently used is dropped first."""

    def __init__(self, max_entries: int) -> None:
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

    def discard(self, key: Hashable) -> None:
        self._items.pop(key, None)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        return iter(self._items)
