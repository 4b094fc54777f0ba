"""Refusals reach clients of the legacy HTTP+SSE transport (they read answers on the
event stream, never the POST body): a denied call fails promptly with the rule named,
the upstream sees only a bare ping with the call's id, and allowed calls still work."""
from __future__ import annotations

import asyncio
import json
import time

import pytest

from demo.client import connect

POLICY = """\
rules:
  - name: dev-shell
    when: {roles: [dev], tool: run_command}
    allow: true
  - name: dev-no-sql
    when: {roles: [dev], tool: query_sql}
    deny: "developers do not query the database directly"
  - name: dev-container-needs-approval
    when: {roles: [dev], tool: launch_container}
    approve: {approvers: [approver], timeout: 1}
  - name: dev-customers
    when: {roles: [dev], tool: get_customer}
    allow: true
  - name: dev-session
    when: {roles: [dev], method: ["initialize", "notifications/initialized", "ping", "tools/list", "server/discover"]}
    allow: true
"""


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_denied_call_answered_on_the_event_stream(stack, mode):
    demo, gw = stack("legacy", policy=POLICY)
    async with connect(gw.mcp_url(), gw.token("dan", ["dev"]), legacy=True, mode=mode, timeout=15) as c:
        t0 = time.monotonic()
        with pytest.raises(Exception) as e:
            await asyncio.wait_for(c.call_tool("query_sql", {"sql": "SELECT secret_marker_71 FROM customers"}), 10)
        assert time.monotonic() - t0 < 5, "the refusal did not reach the client promptly"
        assert "dev-no-sql" in str(e.value) and "do not query" in str(e.value)
        # the session goes on: an allowed call on the same stream works
        ok = await c.call_tool("run_command", {"command": "ls"})
        assert not ok.is_error and "hello.txt" in ok.structured_content["output"]
    bodies = [json.loads(r["body"]) for r in demo.received() if r["method"] == "POST" and r["body"]]
    assert all("secret_marker_71" not in json.dumps(b) for b in bodies)
    carriers = [b for b in bodies if isinstance(b, dict) and b.get("method") == "ping"]
    assert carriers and all(set(b) == {"jsonrpc", "id", "method"} for b in carriers)


async def test_approval_timeout_answered_on_the_event_stream(stack):
    demo, gw = stack("legacy", policy=POLICY)
    async with connect(gw.mcp_url(), gw.token("dan", ["dev"]), legacy=True, timeout=15) as c:
        with pytest.raises(Exception) as e:
            await asyncio.wait_for(c.call_tool("launch_container", {"image": "alpine:3"}), 10)
    assert "approval timed out" in str(e.value)
    assert all("alpine:3" not in r["body"] for r in demo.received())


async def test_default_deny_on_legacy_transport(stack):
    """A tool no rule mentions is refused under default deny, on the stream too."""
    demo, gw = stack("legacy", policy=POLICY)
    async with connect(gw.mcp_url(), gw.token("dan", ["dev"]), legacy=True, timeout=15) as c:
        with pytest.raises(Exception) as e:
            await asyncio.wait_for(c.call_tool("read_file", {"path": "hello.txt"}), 10)
    assert "denied" in str(e.value).lower()
    assert all("hello.txt" not in r["body"] for r in demo.received())


async def test_results_masked_on_the_event_stream(stack):
    """Answers to legacy POSTs arrive on the GET stream; they get the masking of the
    request they answer (the demo's customer 2 has SSN 114-12-1074)."""
    demo, gw = stack("legacy", policy=POLICY)
    async with connect(gw.mcp_url(), gw.token("dan", ["dev"]), legacy=True, timeout=15) as c:
        r = await asyncio.wait_for(c.call_tool("get_customer", {"id": 2}), 10)
    assert not r.is_error
    seen = json.dumps(r.structured_content) + "".join(getattr(b, "text", "") for b in r.content)
    assert "114-12-1074" not in seen and "[MASKED:ssn]" in seen
    assert r.structured_content["id"] == 2
