"""The sessions this replica opened, per identity: the bound on open sessions (pure, no mitmproxy).

Who owns a session is sealed in the session id itself (addons/core/sessionseal.py), so any
replica can serve any session; this table only counts. A binding is never evicted to make
room: a caller at its limit gets 429, a full table 503. A binding ends when the client
closes the session (DELETE) or the upstream answers 404 for it through this replica, or
after `idle` seconds without a request or an open stream through this replica. An id that
does not open is refused with UNKNOWN (404, as MCP prescribes for a session the server
does not know; the client then starts a new one).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable

Key = tuple[str, str]   # (connection, session id)


@dataclass
class Binding:
    sub: str
    last_used: float
    streams: int = 0    # open GET/SSE streams of the session: in use, never idle


class SessionRefused(Exception):
    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message


UNKNOWN = SessionRefused(404, "unknown_session", "no such session for this caller; start a new one (initialize)")


class SessionTable:
    def __init__(self, per_identity: int = 100, total: int = 10_000, idle: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_identity, self.total, self.idle = per_identity, total, idle
        self.clock = clock
        self.bindings: OrderedDict[Key, Binding] = OrderedDict()   # least recently used first
        self.reserved: dict[Hashable, str] = {}                     # in-flight openings -> sub
        self.counts: dict[str, int] = {}                            # sub -> bindings + reservations

    def __len__(self) -> int:
        return len(self.bindings)

    def _count(self, sub: str, delta: int) -> None:
        n = self.counts.get(sub, 0) + delta
        if n > 0:
            self.counts[sub] = n
        else:
            self.counts.pop(sub, None)

    def expire(self) -> None:
        """Drop bindings idle for longer than `idle` (oldest first; open streams keep theirs)."""
        now = self.clock()
        while self.bindings:
            key, b = next(iter(self.bindings.items()))
            if now - b.last_used <= self.idle:
                return
            if b.streams:
                b.last_used = now
                self.bindings.move_to_end(key)
                continue
            self.forget(key)

    def touch(self, key: Key) -> None:
        """A request on session `key` (its owner already checked): not idle. A session
        opened through another replica has no binding here and is not counted here."""
        self.expire()
        b = self.bindings.get(key)
        if b is not None:
            b.last_used = self.clock()
            self.bindings.move_to_end(key)

    def admit(self, token: Hashable, sub: str) -> None:
        """Reserve room for a session `sub` is about to open (released by bind or release)."""
        self.expire()
        if self.counts.get(sub, 0) >= self.per_identity:
            raise SessionRefused(429, "too_many_sessions",
                                 f"this caller already has {self.per_identity} open sessions; close one (DELETE) first")
        if len(self.bindings) + len(self.reserved) >= self.total:
            raise SessionRefused(503, "session_table_full", "the gateway has no room for another session; retry later")
        self.reserved[token] = sub
        self._count(sub, 1)

    def release(self, token: Hashable) -> None:
        sub = self.reserved.pop(token, None)
        if sub is not None:
            self._count(sub, -1)

    def bind(self, token: Hashable, key: Key, sub: str) -> bool:
        """The upstream named the session opened under reservation `token`. False (nothing
        bound) without a reservation of `sub`, or when the id is already someone's."""
        if self.reserved.get(token) != sub:
            return False
        if key in self.bindings:
            return self.bindings[key].sub == sub
        del self.reserved[token]                  # the reservation's count now stands for the binding
        self.bindings[key] = Binding(sub, self.clock())
        return True

    def forget(self, key: Key) -> None:
        b = self.bindings.pop(key, None)
        if b is not None:
            self._count(b.sub, -1)

    def stream(self, key: Key, delta: int) -> None:
        b = self.bindings.get(key)
        if b is not None:
            b.streams = max(0, b.streams + delta)
            b.last_used = self.clock()
