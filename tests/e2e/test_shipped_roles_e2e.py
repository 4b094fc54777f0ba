"""Issue 18: the shipped rules (rules/policy.yaml) do what docs/policy.md's role table says,
call by call, through a real gateway in front of the real demo server. If the table or the
rules change, this test says which row no longer holds."""
from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from tests.e2e.conftest import ROOT

ALLOW, DENY, APPROVE = "allow", "deny", "approve"
# (role, tool, arguments, expected) for every row of the table in docs/policy.md
CASES = [
    ("analyst", "query_sql", {"sql": "SELECT count(*) FROM customers"}, ALLOW),
    ("analyst", "query_sql", {"sql": "DELETE FROM customers"}, DENY),
    ("analyst", "query_sql", {"sql": "SELECT 1; SELECT 2"}, DENY),
    ("analyst", "get_customer", {"id": 1}, ALLOW),
    ("analyst", "stream_report", {"steps": 1, "delay": 0}, ALLOW),
    ("analyst", "run_command", {"command": "ls"}, DENY),
    ("dev", "run_command", {"command": "ls -la"}, ALLOW),
    ("dev", "run_command", {"command": "python3 -c 1"}, DENY),
    ("dev", "run_command", {"command": "ls; id"}, DENY),
    ("dev", "read_file", {"path": "notes.txt"}, ALLOW),
    ("dev", "launch_container", {"image": "alpine:3"}, APPROVE),
    ("dev", "launch_container", {"image": "alpine:3", "privileged": True}, DENY),
    ("dev", "query_sql", {"sql": "SELECT 1"}, DENY),
    ("dba", "query_sql", {"sql": "SELECT count(*) FROM customers"}, ALLOW),     # reads need no approval
    ("dba", "query_sql", {"sql": "CREATE TABLE t18 (x INT)"}, APPROVE),
    ("dba", "query_sql", {"sql": "UPDATE customers SET name = 'x'"}, DENY),
    ("dba", "query_sql", {"sql": "DROP TABLE api_keys"}, DENY),                  # everyone: api_keys read-only
    ("dba", "get_customer", {"id": 1}, DENY),
    ("nobody", "get_customer", {"id": 1}, DENY),
]


def test_the_table_covers_every_documented_role():
    doc = (ROOT / "docs" / "policy.md").read_text()
    table = doc[doc.index("## Demo rules (rules/policy.yaml)"):]
    roles = set(re.findall(r"^\| `(\w+)` \|", table, re.M))
    assert roles == {"analyst", "dev", "dba"} and roles <= {c[0] for c in CASES}, roles
    assert "| `dba` | `query_sql` read (no approval)" in table


@pytest.mark.parametrize("role,tool,args,expected", CASES, ids=[f"{c[0]}-{c[1]}-{c[3]}-{i}" for i, c in enumerate(CASES)])
async def test_shipped_role_permissions(shipped, role, tool, args, expected):
    demo, gw = shipped
    token = gw.token(f"{role}-user", [role])
    approver = gw.token("alice", ["approver", "secops"])
    hdr = {"authorization": f"Bearer {token}", "content-type": "application/json",
           "accept": "application/json, text/event-stream", "mcp-protocol-version": "2025-06-18"}
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": args}}
    async with httpx.AsyncClient(timeout=30) as http:
        call = asyncio.create_task(http.post(gw.mcp_url(), json=body, headers=hdr))
        if expected == APPROVE:
            held = []
            deadline = time.monotonic() + 10
            while not held and time.monotonic() < deadline:
                r = await http.get(f"{gw.url}/_bastion/approvals", headers={"authorization": f"Bearer {approver}"})
                held = [p for p in r.json()["pending"] if p["requester"] == f"{role}-user"]
                await asyncio.sleep(0.1)
            assert held, "not held for approval"
            await http.post(f"{gw.url}/_bastion/approvals/{held[0]['id']}/deny", json={"reason": "test"},
                            headers={"authorization": f"Bearer {approver}"})
        r = await call
    text = r.text
    if expected == ALLOW:
        assert r.status_code == 200 and '"result"' in text and "-32030" not in text, text[:300]
    elif expected == DENY:
        assert "-32030" in text, text[:300]
    else:
        assert "-32033" in text, text[:300]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    from tests.e2e.conftest import Proc, demo_starter, gateway_starter, rules_maker
    procs: list[Proc] = []
    tmp = tmp_path_factory.mktemp("shipped-rules")
    try:
        demo = demo_starter(tmp, procs)("stateless")
        (demo.data_dir.parent / "scratch").mkdir(exist_ok=True)
        gw = gateway_starter(tmp, procs)(rules_maker(tmp)(demo))     # the repo's rules, unchanged
        yield demo, gw
    finally:
        for p in reversed(procs):
            p.stop()
