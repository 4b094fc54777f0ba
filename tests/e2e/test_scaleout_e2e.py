"""Scale-out on loopback (docs/scaling.md): two gateway replicas share rules, the signing
key and one audit store directory (each writes its own instance subdirectory); a sticky
front keeps each MCP session on one replica; one `mcp-bastion sql` sees both."""
from __future__ import annotations

import json
import subprocess
import sys

from demo.client import connect
from tests.e2e.conftest import ALLOW_ALL_POLICY, ROOT


async def test_two_replicas_one_store(demo_server, rules_dir, gateway, tmp_path):
    demo = demo_server("json")
    rules = rules_dir(demo, **{"policy.yaml": ALLOW_ALL_POLICY})
    shared = dict(key_dir=tmp_path / "shared-keys", recordings=tmp_path / "shared-recordings")
    a = gateway(rules, extra_args=("--set", "bastion_instance=gw-a"), **shared)
    b = gateway(rules, extra_args=("--set", "bastion_instance=gw-b"), **shared)
    token = a.token("ci/job-7", ["e2e-all"])          # one issuer key: valid at both replicas
    # client-side stickiness: each session stays on the replica that opened it
    for gw, n in ((a, 1), (b, 2)):
        async with connect(gw.mcp_url(), token) as c:
            r = await c.call_tool("get_customer", {"id": n})
            assert not r.is_error and r.structured_content["id"] == n
    out = subprocess.run([sys.executable, "-m", "addons.cli", "sql", "--store", str(shared["recordings"]),
                          "--format", "json",
                          "SELECT instance, count(*) AS calls FROM messages WHERE method = 'tools/call' "
                          "AND direction = 'c2s' GROUP BY instance ORDER BY instance"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = json.loads(out.stdout)
    assert [(r["instance"], r["calls"]) for r in rows] == [("gw-a", 1), ("gw-b", 1)], rows
