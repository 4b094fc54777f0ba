"""Issue 19 part B: three real gateway replicas share one real redis-server
(bastion_state=redis://…): a call held on A is listed through B and approved through C;
a rate limit is global across the replicas; Redis stopped -> approvals and limits refuse
clearly while other calls flow, and recover after a restart; forged or swapped decision
records and messages release nothing."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import redis.asyncio as aioredis

from addons.core.statestore import APPROVAL_KEY, DECIDED_CHANNEL, Sealer
from demo.client import connect
from tests.e2e.conftest import gateway_starter
from tests.e2e.procs import free_port
from tests.e2e.test_approval_e2e import cli, launches, pending
from tests.redisserver import redis_server  # noqa: F401 - fixture

LIMIT = 5
POLICY = f"""\
rules:
  - name: dev-container-needs-approval
    when: {{roles: [dev], tool: launch_container}}
    approve: {{approvers: [approver], timeout: 60}}
  - name: dev-whoami-limited
    when: {{roles: [dev], tool: whoami}}
    allow: true
    rate_limit: {{calls: {LIMIT}, per: 60}}
  - name: dev-shell
    when: {{roles: [dev], tool: run_command}}
    allow: true
"""


@pytest.fixture
def replicas(redis_server, demo_server, rules_dir, tmp_path, procs):
    demo = demo_server("json")
    rules = rules_dir(demo, **{"policy.yaml": POLICY})
    start = gateway_starter(tmp_path, procs)
    gws = []
    for i in range(3):
        metrics = free_port()
        gw = start(rules, key_dir=tmp_path / "keys", recordings=tmp_path / f"recordings-{i}",
                   extra_args=("--set", f"bastion_state={redis_server.url}",
                               "--set", f"bastion_metrics_port={metrics}"))
        gw.metrics_port = metrics
        gws.append(gw)
    return demo, gws, redis_server


def state_up(gw) -> float:
    text = httpx.get(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=10).text
    line = next(l for l in text.splitlines() if l.startswith("bastion_state_up "))
    return float(line.split()[1])


async def wait_for(pred, timeout: float = 15, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pred():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


async def test_held_on_a_listed_through_b_decided_through_c_or_b(replicas):
    demo, (a, b, c), _ = replicas
    dev, approver = a.token("dan", ["dev"]), a.token("alice", ["approver"])
    async with connect(a.mcp_url(), dev) as client:
        call = asyncio.create_task(client.call_tool("launch_container", {"image": "postgres:17"}))
        items = await pending(b, approver)
        assert items[0]["requester"] == "dan" and items[0]["rule"] == "dev-container-needs-approval"
        assert items[0]["calls"][0]["target"] == "launch_container"
        assert not call.done() and launches(demo) == []
        listed = cli(b, "approvals", "--token", approver)
        assert items[0]["id"] in listed.stdout and "dan" in listed.stdout
        # the requester can never approve their own request, whichever replica they ask
        own = cli(c, "approve", items[0]["id"], "--token", c.token("dan", ["dev", "approver"]))
        assert own.returncode == 1 and "own request" in own.stdout
        other = cli(c, "approve", items[0]["id"], "--token", c.token("bob", ["analyst"]))
        assert other.returncode == 1
        assert not call.done()
        ok = cli(c, "approve", items[0]["id"], "--token", approver)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        result = await asyncio.wait_for(call, 20)
        # and a denial through another replica reaches the caller on A as a JSON-RPC error
        call = asyncio.create_task(client.call_tool("launch_container", {"image": "evil:latest"}))
        held = await pending(c, approver)
        assert cli(b, "deny", held[0]["id"], "--reason", "not in a change window", "--token", approver).returncode == 0
        with pytest.raises(Exception) as e:
            await asyncio.wait_for(call, 20)
        assert "approval denied" in str(e.value) and "change window" in str(e.value)
    assert not result.is_error and result.structured_content["image"] == "postgres:17"
    assert [l["image"] for l in launches(demo)] == ["postgres:17"]
    assert "approved" in a.log_text() and "through the shared engine" in c.log_text()
    # decided: no replica lists it any more
    async with httpx.AsyncClient(timeout=5) as http:
        for gw in (a, b, c):
            r = await http.get(f"{gw.url}/_bastion/approvals", headers={"authorization": f"Bearer {approver}"})
            assert r.json()["pending"] == []


async def test_rate_limit_is_global_across_replicas(replicas):
    demo, gws, _ = replicas
    dev = gws[0].token("dan", ["dev"])
    async with connect(gws[0].mcp_url(), dev) as c0, connect(gws[1].mcp_url(), dev) as c1, \
            connect(gws[2].mcp_url(), dev) as c2:
        clients = (c0, c1, c2)
        for i in range(LIMIT):                       # N calls spread over the three replicas
            r = await clients[i % 3].call_tool("whoami", {})
            assert not r.is_error, r
        for client in clients:                       # call N+1 trips on every replica, not at N x 3
            with pytest.raises(Exception) as e:
                await client.call_tool("whoami", {})
            assert "rate limit of 5 calls per 60s exceeded" in str(e.value)
        # another principal has its own bucket
        async with connect(gws[1].mcp_url(), gws[1].token("erin", ["dev"])) as other:
            assert not (await other.call_tool("whoami", {})).is_error
    whoamis = [r for r in demo.received() if '"whoami"' in r["body"]]
    assert len(whoamis) == LIMIT + 1


async def test_engine_down_refuses_what_needs_it_other_calls_flow_then_recovers(replicas):
    demo, (a, b, c), redis = replicas
    dev, approver = a.token("dan", ["dev"]), a.token("alice", ["approver"])
    async with connect(a.mcp_url(), dev) as client:
        assert not (await client.call_tool("whoami", {})).is_error
        assert state_up(a) == 1.0
        redis.stop()
        for _ in range(3):
            with pytest.raises(Exception) as e:
                await client.call_tool("whoami", {})
            assert "shared state engine is unavailable" in str(e.value) and "dev-whoami-limited" in str(e.value)
        with pytest.raises(Exception) as e:
            await client.call_tool("launch_container", {"image": "postgres:17"})
        assert "shared state engine is unavailable" in str(e.value) and "approval" in str(e.value)
        # a call needing neither flows
        r = await client.call_tool("run_command", {"command": "echo still-flowing"})
        assert not r.is_error and "still-flowing" in str(r.structured_content)
        assert state_up(a) == 0.0
        # admin API on another replica: a clear 503, not an empty list
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.get(f"{b.url}/_bastion/approvals", headers={"authorization": f"Bearer {approver}"})
            assert r.status_code == 503 and "state engine is unavailable" in r.text
        assert a.log_text().count("shared state engine unavailable") == 1      # once per outage
        assert launches(demo) == []

        redis.start()                                   # same port, no gateway restart

        async def whoami_ok():
            try:
                return not (await client.call_tool("whoami", {})).is_error
            except Exception:  # noqa: BLE001 - still refused while reconnecting
                return False
        await wait_for(whoami_ok, what="limited calls to work again")
        await wait_for(lambda: asyncio.sleep(0, state_up(a) == 1.0), what="bastion_state_up back to 1")
        assert "shared state engine back" in a.log_text()
        call = asyncio.create_task(client.call_tool("launch_container", {"image": "after-restart"}))
        items = await pending(b, approver)
        assert cli(c, "approve", items[0]["id"], "--token", approver).returncode == 0
        result = await asyncio.wait_for(call, 20)
    assert not result.is_error and [l["image"] for l in launches(demo)] == ["after-restart"]


async def test_forged_and_swapped_decisions_release_nothing(replicas):
    demo, (a, b, c), redis = replicas
    dev, approver = a.token("dan", ["dev"]), a.token("alice", ["approver"])
    r = aioredis.Redis.from_url(redis.url)
    async with connect(a.mcp_url(), dev) as ca, connect(b.mcp_url(), dev) as cb:
        evil = asyncio.create_task(ca.call_tool("launch_container", {"image": "evil:latest"}))
        items = await pending(c, approver)
        good = asyncio.create_task(cb.call_tool("launch_container", {"image": "good:1"}))
        items = await pending(c, approver, want=2)
        ev = next(i for i in items if i["calls"][0]["arguments"]["image"] == "evil:latest")
        gd = next(i for i in items if i["calls"][0]["arguments"]["image"] == "good:1")
        import json
        stored = json.loads(await r.get(APPROVAL_KEY + ev["id"]))
        other = json.loads(await r.get(APPROVAL_KEY + gd["id"]))
        sealer = Sealer(bytes.fromhex((a.key_dir / "state.key").read_text().strip()))
        forgeries = [
            # 1. a bare announcement: the message decides nothing
            None,
            # 2. someone without the seal key writes "approved" (the old seal no longer fits)
            {**stored, "outcome": "approved", "approver": "mallory"},
            # 3. ... and seals it with a key of their own
            Sealer(b"m" * 32).seal({**{k: v for k, v in stored.items() if k != "mac"}, "outcome": "approved"}),
            # 4. a correctly sealed approval of ANOTHER call, replayed under this id
            sealer.seal({**{k: v for k, v in other.items() if k != "mac"}, "outcome": "approved", "approver": "x"}),
            # 5. sealed, this id, but bound to the other call's request fingerprint
            sealer.seal({**{k: v for k, v in stored.items() if k != "mac"}, "fingerprint": other["fingerprint"],
                         "outcome": "approved", "approver": "x"}),
        ]
        for forged in forgeries:
            if forged is not None:
                await r.set(APPROVAL_KEY + ev["id"], json.dumps(forged), ex=60)
            for _ in range(3):                          # duplicates of the message too
                await r.publish(DECIDED_CHANNEL, ev["id"])
            await asyncio.sleep(2.5)                    # > one periodic look at the record
            assert not evil.done(), forged
        assert launches(demo) == []
        assert "not sealed for this call" in a.log_text()
        # a replica will not decide a record it cannot verify either
        bad = cli(b, "approve", ev["id"], "--token", approver)
        assert bad.returncode == 1
        await r.set(APPROVAL_KEY + ev["id"], json.dumps(stored), ex=60)     # the real record back
        assert cli(b, "deny", ev["id"], "--token", approver).returncode == 0
        with pytest.raises(Exception) as e:
            await asyncio.wait_for(evil, 20)
        assert "approval denied" in str(e.value)
        # legitimate use next to it still works
        assert cli(c, "approve", gd["id"], "--token", approver).returncode == 0
        assert not (await asyncio.wait_for(good, 20)).is_error
    await r.aclose()
    assert [l["image"] for l in launches(demo)] == ["good:1"]
