"""`mcp-bastion serve`: the whole pipeline on the lean master (docs/performance.md) — a real
demo MCP server, the official SDK client, a refusal, a masked answer and the audit record."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mcp.shared.exceptions import MCPError

from demo.client import connect
from demo.data import customers
from tests.e2e.conftest import ROOT

POLICY = """\
rules:
  - name: no-shell
    when: {roles: [e2e-all], tool: run_command}
    deny: no shell here
  - name: e2e-allow-all
    when: {roles: [e2e-all]}
    allow: true
"""


async def test_serve_runs_the_pipeline(demo_server, rules_dir, gateway):
    demo = demo_server("json")
    gw = gateway(rules_dir(demo, **{"policy.yaml": POLICY}), serve=True)
    assert "mcp-bastion" in gw.proc.cmd[0] and "-s" not in gw.proc.cmd    # no script loader involved
    async with connect(gw.mcp_url(), gw.token("ci/job")) as c:
        tools = {t.name for t in (await c.list_tools()).tools}
        assert "get_customer" in tools
        r = await c.call_tool("get_customer", {"id": 3})
        text = json.dumps(r.structured_content)
        assert not r.is_error and customers()[2]["ssn"] not in text and "MASKED" in text
        with pytest.raises(MCPError, match="no-shell"):
            await c.call_tool("run_command", {"command": "true"})
    assert not [m for m in demo.client_requests() if m.get("params", {}).get("name") == "run_command"]
    out = subprocess.run([sys.executable, "-m", "addons.cli", "sql", "--store", str(gw.recordings), "--format",
                          "json", "SELECT count(*) AS n FROM messages WHERE tool = 'get_customer'"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0 and json.loads(out.stdout)[0]["n"] >= 2, out.stdout + out.stderr
