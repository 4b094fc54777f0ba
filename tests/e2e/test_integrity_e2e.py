"""Issue 11 end to end: pinned tool definitions (rug pull hidden and refused, pin --diff),
look-alike names, injection marking/stripping/refusing with benign text untouched, and
the output cap truncating or refusing."""
from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from demo.client import connect
from tests.e2e.conftest import ROOT

POLICY = """\
rules:
  - name: dev-everything
    when: {roles: [dev], method: "*"}
    allow: true
"""


def cli(rules, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "addons.cli", "--rules", str(rules), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)


def with_integrity(rules, **settings) -> None:
    """Add an `integrity:` mapping to the demo connection of a test rules dir."""
    path = rules / "connections.yaml"
    doc = json.loads(path.read_text())
    doc["connections"]["demo"]["integrity"] = settings
    path.write_text(json.dumps(doc, indent=2))


async def test_rug_pull_hidden_refused_and_diffed(demo_server, rules_dir, gateway):
    demo = demo_server("json", name="pinned")
    rules = rules_dir(demo, **{"policy.yaml": POLICY})
    r = cli(rules, "pin", "demo")
    assert r.returncode == 0 and "pinned" in r.stdout, r.stdout + r.stderr
    assert (rules / "pins" / "demo.yaml").exists()
    assert cli(rules, "pin", "--diff", "demo").returncode == 0
    # the server changes run_command's description after review
    demo.proc.stop()
    demo = demo_server("json", name="pinned", args=("--rug-pull",), port=demo.port)
    gw = gateway(rules)
    token = gw.token("dan", ["dev"])
    async with connect(gw.mcp_url(), token) as c:
        names = {t.name for t in (await c.list_tools()).tools}
        assert "run_command" not in names and "get_customer" in names
        with pytest.raises(Exception) as e:
            await c.call_tool("run_command", {"command": "ls"})
        assert "changed since it was pinned" in str(e.value)
        assert not (await c.call_tool("get_customer", {"id": 1})).is_error
    assert '"command": "ls"' not in demo.received_bodies() and '"ls"' not in demo.received_bodies()
    assert "tool run_command changed since it was pinned" in gw.log_text()
    d = cli(rules, "pin", "--diff", "demo")
    assert d.returncode == 1 and "== run_command: changed" in d.stdout and "collector.example" in d.stdout, d.stdout


def _raw_call(gw, token: str, tool: str, args: dict) -> httpx.Response:
    body = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": tool, "arguments": args}}
    return httpx.post(gw.mcp_url(), json=body, timeout=20, headers={
        "authorization": f"Bearer {token}", "accept": "application/json, text/event-stream",
        "mcp-protocol-version": "2025-06-18"})


@pytest.mark.parametrize("name", ["run_cоmmand", "run_command\u200b", "ｒun_command", "RUN_COMMAND"])
def test_lookalike_tool_names_refused(demo_server, rules_dir, gateway, name):
    demo = demo_server("stateless")
    rules = rules_dir(demo, **{"policy.yaml": POLICY})
    assert cli(rules, "pin", "demo").returncode == 0
    demo.clear_received()                       # the pin command's own tools/list
    gw = gateway(rules)
    r = _raw_call(gw, gw.token("dan", ["dev"]), name, {"command": "id"})
    assert "-32036" in r.text and ("imitates" in r.text or "unusual characters" in r.text), r.text
    assert demo.received() == []


@pytest.mark.parametrize("mode", ["mark", "strip", "refuse"])
async def test_injection_modes(demo_server, rules_dir, gateway, mode):
    demo = demo_server("json", args=("--inject",))
    rules = rules_dir(demo, **{"policy.yaml": POLICY})
    with_integrity(rules, injection=mode)
    gw = gateway(rules)
    async with connect(gw.mcp_url(), gw.token("dan", ["dev"])) as c:
        tools = {t.name: t for t in (await c.list_tools()).tools}
        if mode == "refuse":
            assert "echo_text" not in tools
        else:
            desc = tools["echo_text"].description
            meta = tools["echo_text"].meta or {}
            assert meta.get("io.mcp-bastion/injection") == ["override"]
            assert ("Ignore all previous instructions" in desc) == (mode == "mark")
        try:
            res = await c.call_tool("echo_text", {"text": "hello"})
        except Exception as e:  # noqa: BLE001
            assert mode == "refuse" and "instruction to the model" in str(e)
        else:
            assert mode != "refuse"
            text = res.content[0].text
            assert text.startswith("hello")
            assert ("ignore previous instructions" in text) == (mode == "mark")
            assert (res.meta or {}).get("io.mcp-bastion/injection") == ["override", "secrecy"]
        # benign text that mentions the same words is left alone
        ok = await c.call_tool("run_command", {"command": "echo 'the docs tell the user how to ignore warnings'"})
        assert not ok.is_error and "io.mcp-bastion/injection" not in (ok.meta or {})


@pytest.mark.parametrize("on_oversize", ["truncate", "refuse"])
async def test_output_cap(demo_server, rules_dir, gateway, on_oversize):
    demo = demo_server("json", args=("--big-output", "50000"))
    rules = rules_dir(demo, **{"policy.yaml": POLICY})
    with_integrity(rules, max_output_chars=10000, on_oversize=on_oversize)
    gw = gateway(rules)
    async with connect(gw.mcp_url(), gw.token("dan", ["dev"])) as c:
        small = await c.call_tool("echo_text", {"text": "short"})          # under the cap: untouched
        assert small.content[0].text == "short"
        try:
            big = await c.call_tool("big_text", {})
        except Exception as e:  # noqa: BLE001
            assert on_oversize == "refuse" and "over this connection's limit of 10000" in str(e)
        else:
            assert on_oversize == "truncate"
            text = big.content[0].text
            assert "[truncated by mcp-bastion: " in text and "limit 10000]" in text
            assert len(text) < 10100
            assert len(json.dumps(big.structured_content)) <= 10000
