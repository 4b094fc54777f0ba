"""Scale-out on loopback (docs/scaling.md): three gateway replicas share rules, the key dir
(signing key and session keyring) and one audit store directory, behind a real HAProxy
balancing round-robin with no stickiness. One SDK session is served by whichever replica
each request reaches (the session id is a sealed envelope any replica opens); a replica
killed mid-session costs the client nothing; one `mcp-bastion sql` sees every replica."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

from demo.client import connect
from tests.e2e.conftest import ALLOW_ALL_POLICY, ROOT
from tests.e2e.haproxy import start_haproxy


def replicas(demo_server, rules_dir, gateway, tmp_path, n: int = 3):
    demo = demo_server("json")
    rules = rules_dir(demo, **{"policy.yaml": ALLOW_ALL_POLICY})
    shared = dict(key_dir=tmp_path / "shared-keys", recordings=tmp_path / "shared-recordings")
    gws = [gateway(rules, extra_args=("--set", f"bastion_instance=gw-{i + 1}"), **shared) for i in range(n)]
    return demo, gws, shared


def calls_by_instance(store) -> dict[str, int]:
    rows = sql(store, "SELECT instance, count(*) AS calls, count(DISTINCT session_id) AS sessions FROM messages "
                      "WHERE method = 'tools/call' AND direction = 'c2s' GROUP BY instance ORDER BY instance")
    assert all(r["sessions"] == 1 for r in rows), rows
    return {r["instance"]: r["calls"] for r in rows}


def sql(store, query: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "addons.cli", "sql", "--store", str(store), "--format", "json", query],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def upstream_session_ids(demo) -> set[str]:
    return {v for r in demo.client_requests() for k, v in r.get("headers", []) if k.lower() == "mcp-session-id"}


async def test_one_sdk_session_round_robin_over_three_replicas(demo_server, rules_dir, gateway, procs, tmp_path):
    demo, gws, shared = replicas(demo_server, rules_dir, gateway, tmp_path)
    lb = start_haproxy(procs, [g.port for g in gws], tmp_path / "haproxy")
    token = gws[0].token("ci/job-7", ["e2e-all"])      # one issuer key: valid at every replica
    demo.clear_received()
    async with connect(f"http://127.0.0.1:{lb}/mcp/demo", token, mode="legacy") as c:
        for n in range(1, 10):
            r = await c.call_tool("get_customer", {"id": n})
            assert not r.is_error and r.structured_content["id"] == n, r
    by_instance = calls_by_instance(shared["recordings"])
    print("calls by replica:", by_instance)
    print("calls by replica:", by_instance)
    assert sum(by_instance.values()) == 9 and len(by_instance) >= 2, by_instance
    # the upstream saw one session, under its own id, never the envelope the client held
    (sid,) = upstream_session_ids(demo)
    assert len(sid) == 32, sid
    events = sql(shared["recordings"], "SELECT DISTINCT session_id FROM messages WHERE method = 'tools/call'")
    assert events == [{"session_id": sid}]            # the audit groups the session across replicas


async def test_a_replica_killed_mid_session_the_client_goes_on(demo_server, rules_dir, gateway, procs, tmp_path):
    demo, gws, shared = replicas(demo_server, rules_dir, gateway, tmp_path)
    lb = start_haproxy(procs, [g.port for g in gws], tmp_path / "haproxy")
    token = gws[0].token("ci/job-7", ["e2e-all"])
    async with connect(f"http://127.0.0.1:{lb}/mcp/demo", token, mode="legacy") as c:
        for n in range(1, 4):
            r = await c.call_tool("get_customer", {"id": n})
            assert not r.is_error and r.structured_content["id"] == n
        before = calls_by_instance(shared["recordings"])
        assert sum(before.values()) == 3
        gws[1].proc.stop(signal.SIGKILL)               # gw-2 dies: no goodbye, no flush
        assert gws[1].proc.popen.poll() is not None
        for n in range(4, 12):                          # at once: HAProxy's retries route around it
            r = await c.call_tool("get_customer", {"id": n})
            assert not r.is_error and r.structured_content["id"] == n, r
    after = calls_by_instance(shared["recordings"])
    print("calls by replica before/after the kill:", before, after)
    assert after.get("gw-2", 0) == before.get("gw-2", 0), (before, after)
    assert sum(after.values()) == 11 and {k for k, v in after.items() if v > before.get(k, 0)} == {"gw-1", "gw-3"}

