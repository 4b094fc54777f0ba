"""Shared state engine (option `bastion_state`): what replicas must agree on.

Embedded (no option): everything stays in each process, as before (the policy's
RateLimiter, the approval stage's pending dict). `redis://host:port/db`: Redis >= 7 or
Valkey through `redis.asyncio` holds
- rate-limit and blast-radius buckets, taken atomically by one Lua token bucket
  (`bastion:rl:<sha256>`, a hash {t, ts}, expiring one window after its last use),
- pending approvals (`bastion:approval:<id>`, JSON, expiring at the call's deadline + grace),
  announced on the pub/sub channel `bastion:approvals:decided` when decided.
Records are sealed (HMAC-SHA256 with a key the replicas share): a message on the channel
only says "look again"; the holder releases a call only from a stored record whose seal,
id and request fingerprint match its own hold, so a forged message or a key written by
someone without the seal key releases nothing.

Pure: no mitmproxy. Every engine failure surfaces as StateUnavailable (callers fail closed).
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from addons.core.textsafe import get_logger

log = get_logger("bastion.state")

PREFIX = "bastion:"
APPROVAL_KEY = PREFIX + "approval:"
BUCKET_KEY = PREFIX + "rl:"
DECIDED_CHANNEL = PREFIX + "approvals:decided"
APPROVAL_GRACE = 30          # seconds a record outlives its deadline (late listing shows it expired)
TIMEOUT = 3.0                # seconds one engine round trip may take before the engine counts as down


class StateUnavailable(Exception):
    """The shared state engine cannot be reached (or answered garbage)."""


# GCRA-like token bucket: capacity `calls`, refilled at calls/per per second, server clock
# (TIME) so replicas with skewed clocks share one bucket. Returns seconds to wait ("0" = taken).
TOKEN_BUCKET_LUA = """
local cap = tonumber(ARGV[1]); local per = tonumber(ARGV[2]); local cost = tonumber(ARGV[3])
local t = redis.call('TIME'); local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local v = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens = tonumber(v[1]) or cap; local ts = tonumber(v[2]) or now
tokens = math.min(cap, tokens + math.max(0, now - ts) * cap / per)
local wait = 0
if tokens >= cost then tokens = tokens - cost else wait = (cost - tokens) * per / cap end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(per * 1000) + 1000)
return tostring(wait)
"""


def bucket_key(parts: tuple) -> str:
    """One bucket per (rule, principal, tool) tuple, hashed: caller-chosen text never forms key syntax."""
    return BUCKET_KEY + hashlib.sha256(json.dumps(list(parts), default=str).encode()).hexdigest()[:32]


class Sealer:
    """HMAC over a record's canonical JSON: only holders of the replicas' key can write one."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("state seal key must be at least 32 bytes")
        self._key = key

    def _mac(self, rec: dict) -> str:
        body = json.dumps({k: v for k, v in rec.items() if k != "mac"}, sort_keys=True, separators=(",", ":"))
        return hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()

    def seal(self, rec: dict) -> dict:
        return {**rec, "mac": self._mac(rec)}

    def valid(self, rec: Any) -> bool:
        return isinstance(rec, dict) and isinstance(rec.get("mac"), str) and hmac.compare_digest(rec["mac"], self._mac(rec))


class StateStore(Protocol):
    """What the stages ask of the engine; every method raises StateUnavailable on failure."""

    async def take(self, key: str, calls: int, per: float, cost: int = 1) -> float: ...
    async def put_approval(self, rec: dict, ttl: float) -> None: ...
    async def get_approval(self, pid: str) -> dict | None: ...
    async def list_approvals(self) -> list[dict]: ...
    async def update_approval(self, pid: str, change: Callable[[dict], dict | None]) -> dict | None: ...
    async def drop_approval(self, pid: str) -> None: ...
    async def announce(self, pid: str) -> None: ...
    def decisions(self) -> AsyncIterator[str]: ...
    async def ping(self) -> None: ...
    async def close(self) -> None: ...


class MemoryStore:
    """In-process implementation of the protocol (one replica; tests of the shared paths)."""

    def __init__(self) -> None:
        self.buckets: dict[str, tuple[float, float]] = {}
        self.approvals: dict[str, tuple[dict, float]] = {}
        self._subscribers: list[asyncio.Queue[str]] = []

    async def take(self, key: str, calls: int, per: float, cost: int = 1) -> float:
        now = time.monotonic()
        tokens, last = self.buckets.get(key, (float(calls), now))
        tokens = min(float(calls), tokens + (now - last) * calls / per)
        wait = 0.0 if tokens >= cost else (cost - tokens) * per / calls
        self.buckets[key] = (tokens - cost if wait == 0 else tokens, now)
        return wait

    async def put_approval(self, rec: dict, ttl: float) -> None:
        self.approvals[rec["id"]] = (rec, time.monotonic() + ttl)

    async def get_approval(self, pid: str) -> dict | None:
        rec, exp = self.approvals.get(pid, (None, 0.0))
        return rec if rec is not None and exp > time.monotonic() else None

    async def list_approvals(self) -> list[dict]:
        return [r for r in [await self.get_approval(p) for p in list(self.approvals)] if r is not None]

    async def update_approval(self, pid: str, change: Callable[[dict], dict | None]) -> dict | None:
        rec = await self.get_approval(pid)
        new = change(rec) if rec is not None else None
        if new is not None:
            self.approvals[pid] = (new, self.approvals[pid][1])
        return new

    async def drop_approval(self, pid: str) -> None:
        self.approvals.pop(pid, None)

    async def announce(self, pid: str) -> None:
        for q in self._subscribers:
            q.put_nowait(pid)

    async def decisions(self) -> AsyncIterator[str]:
        q: asyncio.Queue[str] = asyncio.Queue()
        self._subscribers.append(q)
        try:
            while True:
                yield await q.get()
        finally:
            self._subscribers.remove(q)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


class RedisStore:
    """Redis >= 7 / Valkey through redis.asyncio; reconnects by itself after a restart
    (the pool opens a new connection on the next command; the listener resubscribes)."""

    def __init__(self, url: str, timeout: float = TIMEOUT) -> None:
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError
        self._errors = (RedisError, OSError, asyncio.TimeoutError, ValueError)
        self.url = url
        self.r = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                         retry_on_timeout=False, health_check_interval=5)
        self._bucket = self.r.register_script(TOKEN_BUCKET_LUA)

    async def _do(self, coro):
        try:
            return await coro
        except self._errors as e:
            raise StateUnavailable(f"{type(e).__name__}: {e}") from None

    async def take(self, key: str, calls: int, per: float, cost: int = 1) -> float:
        wait = await self._do(self._bucket(keys=[key], args=[calls, per, cost]))
        try:
            return float(wait)
        except (TypeError, ValueError):
            raise StateUnavailable(f"token bucket answered {wait!r}") from None

    async def put_approval(self, rec: dict, ttl: float) -> None:
        await self._do(self.r.set(APPROVAL_KEY + rec["id"], json.dumps(rec), ex=max(1, int(ttl) + APPROVAL_GRACE)))

    @staticmethod
    def _load(raw: Any) -> dict | None:
        try:
            rec = json.loads(raw) if raw is not None else None
        except (ValueError, UnicodeDecodeError):
            return None
        return rec if isinstance(rec, dict) else None

    async def get_approval(self, pid: str) -> dict | None:
        return self._load(await self._do(self.r.get(APPROVAL_KEY + pid)))

    async def list_approvals(self) -> list[dict]:
        async def scan() -> list[dict]:
            keys = [k async for k in self.r.scan_iter(match=APPROVAL_KEY + "*", count=500)]
            raws = await self.r.mget(keys) if keys else []
            return [r for r in map(self._load, raws) if r is not None]
        return await self._do(scan())

    async def update_approval(self, pid: str, change: Callable[[dict], dict | None]) -> dict | None:
        """Optimistic read-modify-write (WATCH/MULTI): two replicas deciding at once
        cannot both win; `change` returns None to leave the record alone."""
        from redis.exceptions import WatchError
        key = APPROVAL_KEY + pid

        async def attempt() -> dict | None:
            async with self.r.pipeline(transaction=True) as pipe:
                for _ in range(10):
                    try:
                        await pipe.watch(key)
                        rec = self._load(await pipe.get(key))
                        new = change(rec) if rec is not None else None
                        if new is None:
                            await pipe.unwatch()
                            return None
                        ttl = await pipe.ttl(key)
                        pipe.multi()
                        pipe.set(key, json.dumps(new), ex=max(1, ttl))
                        await pipe.execute()
                        return new
                    except WatchError:
                        continue
            raise StateUnavailable("approval record kept changing (10 attempts)")
        return await self._do(attempt())

    async def drop_approval(self, pid: str) -> None:
        await self._do(self.r.delete(APPROVAL_KEY + pid))

    async def announce(self, pid: str) -> None:
        await self._do(self.r.publish(DECIDED_CHANNEL, pid))

    async def decisions(self) -> AsyncIterator[str]:
        pubsub = self.r.pubsub(ignore_subscribe_messages=True)
        try:
            await self._do(pubsub.subscribe(DECIDED_CHANNEL))
            while True:
                msg = await self._do(pubsub.get_message(timeout=1.0))
                if msg and msg.get("type") == "message":
                    data = msg.get("data")
                    yield data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
        finally:
            try:
                await pubsub.aclose()
            except Exception:  # noqa: BLE001 - closing a broken subscription
                pass

    async def ping(self) -> None:
        await self._do(self.r.ping())

    async def close(self) -> None:
        try:
            await self.r.aclose()
        except Exception:  # noqa: BLE001
            pass


def open_store(url: str) -> StateStore | None:
    """'' -> None (embedded); redis:// or rediss:// -> RedisStore; anything else is an error."""
    if not url:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
        # the URL itself is not repeated: it may carry the engine's password
        raise ValueError(f"bastion_state must be empty or redis://host:port/db (scheme {parts.scheme or 'missing'!r})")
    return RedisStore(url)


@dataclass
class SharedState:
    """Built once by the pipeline, configured by the state stage, read by policy, approval
    and metrics. `store` None = embedded (each stage keeps its in-process state)."""

    store: StateStore | None = None
    sealer: Sealer | None = None
    up: bool = True
    outage_since: float | None = None
    listeners: list[Callable[[str], None]] = field(default_factory=list)

    @property
    def shared(self) -> bool:
        return self.store is not None

    def mark(self, up: bool, why: str = "") -> None:
        """Record the engine's health; logs only the changes (once per outage, once on recovery)."""
        if up == self.up:
            return
        self.up = up
        if not up:
            self.outage_since = time.time()
            # a warning: mitmproxy exits on an error logged during startup; an outage is not fatal
            log.warning("shared state engine unavailable (%s): approval-required and rate-limited calls are "
                      "refused until it is back", why)
            return
        log.warning("shared state engine back after %.1fs", time.time() - (self.outage_since or time.time()))
        self.outage_since = None

    def live_metrics(self) -> dict[str, float]:
        return {"bastion_state_up": 1.0 if (self.up or not self.shared) else 0.0,
                "bastion_state_shared": 1.0 if self.shared else 0.0}
