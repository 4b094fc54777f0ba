"""Issue 8 acceptance with every real part: SDK client, real identity, shipped policy and
masking rules, demo server; then SQL, replay and export over the store."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from demo.client import connect
from demo.data import customers

BIN = Path(sys.executable).parent


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "mcp-bastion"), *args], capture_output=True, text=True, timeout=120)


def sql(store: Path, query: str) -> list[dict]:
    p = cli("sql", query, "--format", "json", "--store", str(store))
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


async def test_scripted_session_is_recorded_masked_and_replayable(stack, tmp_path):
    demo, gw = stack("json", policy=None)          # shipped rules/policy.yaml + masking.yaml
    token = gw.token("ana", ["analyst"], client_id="nightly-report")
    async with connect(gw.mcp_url(), token, mode="legacy") as c:
        tools = {t.name for t in (await c.list_tools()).tools}
        assert "run_command" not in tools and "get_customer" in tools
        got = await c.call_tool("get_customer", {"id": 3})
        assert got.structured_content["ssn"] == "[MASKED:ssn]"
        with pytest.raises(Exception, match="analyst-sql-read-only"):
            await c.call_tool("query_sql", {"sql": "DROP TABLE customers"})
    store = gw.recordings
    sessions = sql(store, "SELECT * FROM sessions WHERE subs = 'ana'")
    assert len(sessions) == 1 and sessions[0]["client_ids"] == "nightly-report"
    sid = sessions[0]["session_id"]
    decided = sql(store, f"SELECT tool, action, rule FROM decisions WHERE session_id = '{sid}' AND tool IS NOT NULL "
                         "ORDER BY seq")
    assert {"tool": "get_customer", "action": "allow", "rule": "analyst-customers"} in decided
    assert {"tool": "query_sql", "action": "deny", "rule": "analyst-sql-read-only"} in decided
    masked = sql(store, f"SELECT DISTINCT type FROM masks WHERE session_id = '{sid}'")
    assert {"ssn"} <= {m["type"] for m in masked}
    results = sql(store, f"SELECT result FROM messages WHERE session_id = '{sid}' AND kind = 'response' "
                         "AND result IS NOT NULL")
    assert any("[MASKED:ssn]" in json.dumps(r) for r in results)
    # replay for an auditor, and a flow file mitmproxy's own reader opens
    replay = cli("replay", sid, "--store", str(store))
    assert replay.returncode == 0 and "ana" in replay.stdout and "analyst-sql-read-only" in replay.stdout
    out = tmp_path / "s.mitm"
    assert cli("export", sid, "-o", str(out), "--store", str(store)).returncode == 0
    from mitmproxy import io
    with open(out, "rb") as f:
        flows = list(io.FlowReader(f).stream())
    assert flows
    # no secret value and no token anywhere in the store or the export
    c3 = customers()[2]
    secrets = [c3["ssn"], token, demo.token, token.split(".")[2]]
    for f in [*store.rglob("*"), out]:
        if f.is_file():
            blob = f.read_bytes()
            for s in secrets:
                assert s.encode() not in blob, f"{f} holds a secret"
