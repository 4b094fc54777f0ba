"""addons/core/statestore.py against a real redis-server (tests/redisserver.py) and in memory."""
from __future__ import annotations

import asyncio
import time

import pytest

from addons.core.statestore import (MemoryStore, RedisStore, Sealer, SharedState, StateUnavailable, bucket_key,
                                    open_store)
from tests.e2e.procs import free_port
from tests.redisserver import redis_server  # noqa: F401 - fixture

KEY = b"k" * 32


async def test_bucket_is_shared_by_every_client_of_one_engine(redis_server):
    a, b, c = (RedisStore(redis_server.url) for _ in range(3))
    key = bucket_key(("rate", "r", "alice", "echo"))
    waits = [await s.take(key, 5, 60) for s in (a, b, c, a, b)]
    assert waits == [0.0] * 5                       # five calls through three clients
    assert await c.take(key, 5, 60) > 0             # the sixth trips, whichever client asks
    assert await a.take(bucket_key(("rate", "r", "bob", "echo")), 5, 60) == 0   # another principal
    for s in (a, b, c):
        await s.close()


async def test_bucket_refills_and_cost_counts(redis_server):
    s = RedisStore(redis_server.url)
    key = bucket_key(("blast", "r", "alice"))
    assert await s.take(key, 10, 1, cost=8) == 0
    assert await s.take(key, 10, 1, cost=8) > 0      # 2 left: 8 more would exceed it
    await asyncio.sleep(0.7)
    assert await s.take(key, 10, 1, cost=8) == 0     # refilled at 10/s
    await s.close()


async def test_concurrent_decisions_only_one_wins(redis_server):
    a, b = RedisStore(redis_server.url), RedisStore(redis_server.url)
    await a.put_approval({"id": "abc", "outcome": None}, 60)

    def decide(who):
        return lambda r: None if r["outcome"] is not None else {**r, "outcome": who}
    results = await asyncio.gather(*[s.update_approval("abc", decide(f"w{i}")) for i, s in enumerate((a, b) * 5)])
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert (await b.get_approval("abc"))["outcome"] == winners[0]["outcome"]
    assert [r["id"] for r in await b.list_approvals()] == ["abc"]
    await a.drop_approval("abc")
    assert await b.get_approval("abc") is None
    await a.close()
    await b.close()


async def test_announcements_reach_subscribers(redis_server):
    a, b = RedisStore(redis_server.url), RedisStore(redis_server.url)
    got: list[str] = []

    async def listen():
        async for pid in b.decisions():
            got.append(pid)
            return
    task = asyncio.create_task(listen())
    for _ in range(50):
        await a.announce("abc")
        await asyncio.sleep(0.05)
        if got:
            break
    await task
    assert got == ["abc"]
    await a.close()
    await b.close()


async def test_engine_down_raises_then_recovers_without_a_new_client(redis_server):
    s = RedisStore(redis_server.url)
    key = bucket_key(("rate", "x"))
    assert await s.take(key, 3, 60) == 0
    redis_server.stop()
    t0 = time.monotonic()
    with pytest.raises(StateUnavailable):
        await s.take(key, 3, 60)
    assert time.monotonic() - t0 < 3                   # bounded by the socket timeouts
    redis_server.start()                                # same port, empty (no persistence)
    assert await s.take(key, 3, 60) == 0
    await s.close()


async def test_unreachable_engine_is_unavailable_not_a_hang():
    s = RedisStore(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(StateUnavailable):
        await s.ping()
    with pytest.raises(StateUnavailable):
        await s.put_approval({"id": "x"}, 5)
    await s.close()


async def test_round_trip_cost_of_a_shared_take(redis_server):
    """Timing (printed): one atomic Lua take on a loopback redis-server."""
    s = RedisStore(redis_server.url)
    key = bucket_key(("rate", "timing"))
    await s.take(key, 10**9, 60)
    n = 500
    t0 = time.perf_counter()
    for _ in range(n):
        await s.take(key, 10**9, 60)
    per = (time.perf_counter() - t0) / n
    print(f"\nshared rate-limit take: {per * 1e6:.0f} us per call ({n} calls, loopback redis-server)")
    assert per < 0.05
    await s.close()


async def test_memory_store_has_the_same_bucket_semantics():
    m = MemoryStore()
    key = bucket_key(("rate", "r"))
    assert [await m.take(key, 2, 60) for _ in range(3)][-1] > 0
    await m.put_approval({"id": "a", "outcome": None}, 60)
    assert (await m.update_approval("a", lambda r: {**r, "outcome": "approved"}))["outcome"] == "approved"
    assert await m.update_approval("zz", lambda r: r) is None


def test_seal_binds_every_field():
    s = Sealer(KEY)
    rec = s.seal({"id": "abc", "fingerprint": "f" * 64, "outcome": "approved"})
    assert s.valid(rec)
    assert not s.valid({**rec, "outcome": "denied"})
    assert not s.valid({**rec, "id": "abd"})
    assert not s.valid({k: v for k, v in rec.items() if k != "mac"})
    assert not Sealer(b"o" * 32).valid(rec)              # sealed with another key
    assert not s.valid("not a dict")
    with pytest.raises(ValueError):
        Sealer(b"short")


def test_open_store_and_health_gauge():
    assert open_store("") is None
    for bad in ("http://x", "redis://", "nonsense"):
        with pytest.raises(ValueError):
            open_store(bad)
    with pytest.raises(ValueError) as e:
        open_store("htp://admin:s3cret-pw@redis.internal:6379/0")      # a typo must not print the password
    assert "s3cret-pw" not in str(e.value)
    state = SharedState()
    assert state.live_metrics() == {"bastion_state_up": 1.0, "bastion_state_shared": 0.0}
    state.store = MemoryStore()
    state.mark(False, "test")
    assert state.live_metrics()["bastion_state_up"] == 0.0 and state.outage_since is not None
    state.mark(True)
    assert state.live_metrics()["bastion_state_up"] == 1.0 and state.outage_since is None
