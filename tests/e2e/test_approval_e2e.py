"""Issue 6: held calls, decided through the admin API / CLI, by identified approvers."""
from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time

import httpx
import pytest

from demo.client import connect

POLICY = """\
rules:
  - name: dev-container-needs-approval
    when: {roles: [dev], tool: launch_container}
    approve: {approvers: [approver], timeout: %(timeout)s}
  - name: dev-shell
    when: {roles: [dev], tool: run_command}
    allow: true
"""


def cli(gw, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "addons.cli", *args, "--gateway", gw.url],
                          capture_output=True, text=True, timeout=30)


async def pending(gw, token: str, want: int = 1, timeout: float = 10) -> list[dict]:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5) as http:
        while time.monotonic() < deadline:
            r = await http.get(f"{gw.url}/_bastion/approvals", headers={"authorization": f"Bearer {token}"})
            assert r.status_code == 200, r.text
            if len(r.json()["pending"]) >= want:
                return r.json()["pending"]
            await asyncio.sleep(0.1)
    raise AssertionError("no pending approval appeared")


def launches(demo) -> list[dict]:
    f = demo.data_dir / "launches.jsonl"
    return [json.loads(l) for l in f.read_text().splitlines()] if f.exists() else []


async def test_approved_by_approver_via_cli(stack):
    demo, gw = stack("json", policy=POLICY % {"timeout": 30})
    dev, approver = gw.token("dan", ["dev"]), gw.token("alice", ["approver"])
    async with connect(gw.mcp_url(), dev) as c:
        call = asyncio.create_task(c.call_tool("launch_container", {"image": "postgres:17"}))
        items = await pending(gw, approver)
        assert items[0]["requester"] == "dan" and items[0]["rule"] == "dev-container-needs-approval"
        assert not call.done() and launches(demo) == []
        # the requester can never approve their own request
        own = cli(gw, "approve", items[0]["id"], "--token", gw.token("dan", ["dev", "approver"]))
        assert own.returncode == 1 and "own request" in own.stdout
        # a caller without an approver role cannot either
        other = cli(gw, "approve", items[0]["id"], "--token", gw.token("bob", ["analyst"]))
        assert other.returncode == 1
        listed = cli(gw, "approvals", "--token", approver)
        assert items[0]["id"] in listed.stdout and "dan" in listed.stdout
        ok = cli(gw, "approve", items[0]["id"], "--token", approver)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        result = await asyncio.wait_for(call, 20)
    assert not result.is_error and result.structured_content["image"] == "postgres:17"
    assert [l["image"] for l in launches(demo)] == ["postgres:17"]


async def test_denied_gets_jsonrpc_error_and_upstream_sees_nothing(stack):
    demo, gw = stack("json", policy=POLICY % {"timeout": 30})
    dev, approver = gw.token("dan", ["dev"]), gw.token("alice", ["approver"])
    async with connect(gw.mcp_url(), dev) as c:
        call = asyncio.create_task(c.call_tool("launch_container", {"image": "evil:latest"}))
        items = await pending(gw, approver)
        r = cli(gw, "deny", items[0]["id"], "--reason", "not in a change window", "--token", approver)
        assert r.returncode == 0, r.stdout
        with pytest.raises(Exception) as e:
            await asyncio.wait_for(call, 20)
    assert "approval denied" in str(e.value) and "change window" in str(e.value)
    assert launches(demo) == []
    assert all("evil:latest" not in r["body"] for r in demo.received())


async def test_timeout_refuses(stack):
    demo, gw = stack("json", policy=POLICY % {"timeout": 1})
    async with connect(gw.mcp_url(), gw.token("dan", ["dev"])) as c:
        t0 = time.monotonic()
        with pytest.raises(Exception) as e:
            await c.call_tool("launch_container", {"image": "x"})
        waited = time.monotonic() - t0
    assert "approval timed out" in str(e.value)
    assert 0.9 <= waited < 10
    assert launches(demo) == []


async def test_waiting_calls_do_not_slow_other_traffic(stack):
    demo, gw = stack("json", policy=POLICY % {"timeout": 60})
    dev = gw.token("dan", ["dev"])
    body = lambda i, tool, args: {"jsonrpc": "2.0", "id": i, "method": "tools/call",  # noqa: E731
                                  "params": {"name": tool, "arguments": args}}
    hdr = {"authorization": f"Bearer {dev}", "content-type": "application/json",
           "accept": "application/json, text/event-stream"}
    async with httpx.AsyncClient(timeout=90) as http:
        async def timed_ls(n: int) -> tuple[float, float]:
            times = []
            for i in range(n):
                t0 = time.perf_counter()
                r = await http.post(gw.mcp_url(), json=body(i, "run_command", {"command": "true"}), headers=hdr)
                times.append(time.perf_counter() - t0)
                assert r.status_code == 200 and "result" in r.json(), r.text
            return statistics.median(times), max(times)
        # stateless raw calls: the demo in json mode wants a session, so initialize first
        init = await http.post(gw.mcp_url(), json={"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}},
            headers=hdr)
        hdr["mcp-session-id"] = init.headers["mcp-session-id"]
        await timed_ls(5)                           # warm-up (first connection, imports)
        baseline, base_max = await timed_ls(30)
        held = [asyncio.create_task(http.post(gw.mcp_url(), json=body(100 + i, "launch_container", {"image": f"i{i}"}),
                                              headers=hdr)) for i in range(20)]
        await pending(gw, gw.token("alice", ["approver"]), want=20)
        loaded, loaded_max = await timed_ls(30)
        for t in held:
            t.cancel()
    print(f"\n[approval e2e] unrelated tools/call latency, median (max) of 30: {baseline*1000:.1f} ms "
          f"({base_max*1000:.1f}) idle, {loaded*1000:.1f} ms ({loaded_max*1000:.1f}) with 20 calls held")
    assert loaded < baseline * 5 + 0.05


def sql(gw, query: str) -> list[dict]:
    p = subprocess.run([sys.executable, "-m", "addons.cli", "sql", query, "--format", "json", "--store",
                        str(gw.recordings)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


async def test_outcomes_are_in_the_audit_store(stack):
    demo, gw = stack("json", policy=POLICY % {"timeout": 30})
    approver = gw.token("alice", ["approver"])
    async with connect(gw.mcp_url(), gw.token("dan", ["dev"])) as c:
        call = asyncio.create_task(c.call_tool("launch_container", {"image": "redis:7"}))
        items = await pending(gw, approver)
        assert cli(gw, "approve", items[0]["id"], "--token", approver).returncode == 0
        await asyncio.wait_for(call, 20)
    rows = []
    deadline = time.monotonic() + 20
    while not rows and time.monotonic() < deadline:   # the recorder flushes in the background
        rows = sql(gw, "SELECT outcome, approver, rule FROM approvals")
        await asyncio.sleep(0.5)
    assert {"outcome": "approved", "approver": "alice", "rule": "dev-container-needs-approval"} in rows


async def test_client_disconnect_cancels_the_hold(stack):
    demo, gw = stack("json", policy=POLICY % {"timeout": 30})
    dev, approver = gw.token("dan", ["dev"]), gw.token("alice", ["approver"])
    hdr = {"authorization": f"Bearer {dev}", "content-type": "application/json",
           "accept": "application/json, text/event-stream"}
    async with httpx.AsyncClient(timeout=60) as http:
        init = await http.post(gw.mcp_url(), json={"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}},
            headers=hdr)
        hdr["mcp-session-id"] = init.headers["mcp-session-id"]
    http = httpx.AsyncClient(timeout=60)
    call = asyncio.create_task(http.post(gw.mcp_url(), headers=hdr, json={
        "jsonrpc": "2.0", "id": 5, "method": "tools/call",
        "params": {"name": "launch_container", "arguments": {"image": "gone:1"}}}))
    items = await pending(gw, approver)
    call.cancel()
    await http.aclose()                               # the caller goes away
    deadline = time.monotonic() + 10
    async with httpx.AsyncClient(timeout=5) as admin:
        while time.monotonic() < deadline:
            r = await admin.get(f"{gw.url}/_bastion/approvals", headers={"authorization": f"Bearer {approver}"})
            if not r.json()["pending"]:
                break
            await asyncio.sleep(0.1)
    assert r.json()["pending"] == [], "hold not cancelled after the client left"
    late = cli(gw, "approve", items[0]["id"], "--token", approver)
    assert late.returncode == 1 and "already decided" in late.stdout
    await asyncio.sleep(0.5)
    assert launches(demo) == [] and all("gone:1" not in r["body"] for r in demo.received())
    assert "client disconnected" in gw.log_text()


BATCH_POLICY = """\
rules:
  - name: sql-needs-dba
    when: {roles: [dev], tool: query_sql}
    approve: {approvers: [dba], timeout: 30}
  - name: launch-needs-secops
    when: {roles: [dev], tool: launch_container}
    approve: {approvers: [secops], timeout: 30}
"""


async def test_batch_holding_two_calls_needs_an_approver_for_each(stack):
    """Attack: a batch mixing calls held under different approver lists, released by an
    approver allowed for only one of them."""
    demo, gw = stack("stateless", policy=BATCH_POLICY)
    dev, dba, secops = gw.token("dan", ["dev"]), gw.token("dora", ["dba"]), gw.token("sam", ["secops"])
    batch = [{"jsonrpc": "2.0", "id": 1, "method": "tools/call",
              "params": {"name": "query_sql", "arguments": {"sql": "SELECT 1"}}},
             {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
              "params": {"name": "launch_container", "arguments": {"image": "batch:1"}}}]
    hdr = {"authorization": f"Bearer {dev}", "content-type": "application/json",
           "accept": "application/json, text/event-stream", "mcp-protocol-version": "2025-03-26"}
    async with httpx.AsyncClient(timeout=40) as http:
        call = asyncio.create_task(http.post(gw.mcp_url(), json=batch, headers=hdr))
        items = await pending(gw, dba)
        half = cli(gw, "approve", items[0]["id"], "--token", dba)
        assert half.returncode == 0 and "still waiting" in half.stdout and "secops" in half.stdout, half.stdout
        await asyncio.sleep(1.0)
        assert not call.done() and launches(demo) == [] and demo.client_requests() == []
        assert [i["id"] for i in await pending(gw, secops)] == [items[0]["id"]]
        full = cli(gw, "approve", items[0]["id"], "--token", secops)
        assert full.returncode == 0 and "approved by dora, sam" in full.stdout, full.stdout
        await asyncio.wait_for(call, 20)
    # released only now, to the upstream (the SDK server then refuses batches itself: 2025-06-18
    # dropped them, and that answer is its own)
    assert "batch:1" in demo.received_bodies()


def test_approve_rule_without_approvers_is_a_config_error(tmp_path):
    (tmp_path / "policy.yaml").write_text("rules:\n  - name: anyone\n    when: {tool: launch_container}\n"
                                          "    approve: {timeout: 30}\n")
    p = subprocess.run([sys.executable, "-m", "addons.cli", "--rules", str(tmp_path), "check"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "policy.yaml:4" in p.stdout + p.stderr and "needs approvers" in p.stdout + p.stderr
