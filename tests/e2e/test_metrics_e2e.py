"""The metrics endpoint of a real gateway, scraped after allowed, denied and masked calls."""
from __future__ import annotations

import asyncio
import time

import httpx

from demo.client import connect
from tests.e2e.conftest import free_port

POLICY = """\
rules:
  - name: analyst-customers
    when: {roles: [analyst], tool: get_customer}
    allow: true
"""


def scrape(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def test_metrics_scraped(demo_server, rules_dir, gateway):
    demo = demo_server("json")
    port = free_port()
    gw = gateway(rules_dir(demo, **{"policy.yaml": POLICY}), extra_args=("--set", f"bastion_metrics_port={port}"))
    async with connect(gw.mcp_url(), gw.token("ana", ["analyst"])) as c:
        r = await c.call_tool("get_customer", {"id": 1})
        assert not r.is_error
        try:
            await c.call_tool("run_command", {"command": "id"})
        except Exception:  # noqa: BLE001 - the denial
            pass
    m = scrape(port)
    assert m['bastion_requests_total{connection="demo",decision="allow",method="tools/call"}'] >= 1
    assert m['bastion_requests_total{connection="demo",decision="deny",method="tools/call"}'] >= 1
    assert m['bastion_refusals_total{rule="default-deny"}'] >= 1
    assert m['bastion_masked_values_total{type="ssn"}'] >= 1
    assert m['bastion_request_seconds_count{connection="demo"}'] >= 3
    assert m["bastion_recorder_healthy"] == 1 and m["bastion_recorder_events_total"] > 0
    assert m["bastion_recorder_errors_total"] == 0 and m["bastion_recorder_queue"] >= 0
    assert m["bastion_approvals_pending"] == 0
    # the endpoint is on its own port: the proxy port does not serve it
    assert httpx.get(f"{gw.url}/metrics", timeout=10).status_code == 404


APPROVAL_POLICY = """\
rules:
  - name: dev-container-needs-approval
    when: {roles: [dev], tool: launch_container}
    approve: {approvers: [approver], timeout: 3}
"""


async def wait_metric(port: int, name: str, value: float, timeout: float = 15) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = scrape(port)
        if m.get(name) == value:
            return m
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name} never reached {value}: {m.get(name)}")


async def test_pending_approvals_gauge_follows_a_held_call(demo_server, rules_dir, gateway):
    demo = demo_server("json")
    port = free_port()
    gw = gateway(rules_dir(demo, **{"policy.yaml": APPROVAL_POLICY}), extra_args=("--set", f"bastion_metrics_port={port}"))
    async with connect(gw.mcp_url(), gw.token("dan", ["dev"])) as c:
        call = asyncio.create_task(c.call_tool("launch_container", {"image": "postgres:17"}))
        await wait_metric(port, "bastion_approvals_pending", 1)       # held: counted while it waits
        try:
            await asyncio.wait_for(call, 30)                          # times out: refused
        except Exception:  # noqa: BLE001 - the refusal
            pass
    m = await wait_metric(port, "bastion_approvals_pending", 0)
    assert m['bastion_requests_total{connection="demo",decision="approve",method="tools/call"}'] == 1
