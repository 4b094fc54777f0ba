"""The demo MCP server on its own (no gateway): every transport works with the official SDK
client, every tool does what the other tests rely on, the service-token gate holds, and the
received-request log records what arrived (before the gate, with credentials fingerprinted)."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import time

import httpx
import pytest

from demo.client import connect
from demo.data import CARDS, api_keys, customers, luhn_ok
from tests.e2e.conftest import ROOT

TOOLS = {"query_sql", "get_customer", "run_command", "launch_container", "read_file", "stream_report"}
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}
HDRS = {"content-type": "application/json", "accept": "application/json, text/event-stream"}


def fp(value: str) -> str:
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:16]


# (transport, client mode): auto = the SDK's default (server/discover, falling back to initialize)
CASES = [("json", "auto"), ("sse", "auto"), ("stateless", "auto"), ("json", "legacy"), ("sse", "legacy"),
         ("legacy", "legacy"), ("legacy", "auto")]


@pytest.mark.parametrize("transport,mode", CASES, ids=[f"{t}-{m}" for t, m in CASES])
async def test_every_tool_over_every_transport(demo_server, transport, mode):
    demo = demo_server(transport)
    async with connect(demo.url, demo.token, legacy=transport == "legacy", mode=mode) as c:
        assert TOOLS <= {t.name for t in (await c.list_tools()).tools}

        r = await c.call_tool("query_sql", {"sql": "SELECT id, name, ssn FROM customers ORDER BY id LIMIT 3"})
        assert not r.is_error, r
        assert r.structured_content["rowcount"] == 3
        assert [row["id"] for row in r.structured_content["rows"]] == [1, 2, 3]
        # the same rows as JSON text, for clients that only read content[]
        assert json.loads(r.content[0].text)["rows"] == r.structured_content["rows"]

        r = await c.call_tool("get_customer", {"id": 2})
        cust = r.structured_content
        assert {"email", "ssn", "card_number", "billing"} <= cust.keys()
        assert cust["billing"]["api_token"].startswith("tok_live_")

        r = await c.call_tool("run_command", {"command": "ls; echo err >&2; exit 3"})
        assert r.structured_content["exit_code"] == 3
        assert "hello.txt" in r.structured_content["output"] and "err" in r.structured_content["output"]

        r = await c.call_tool("launch_container", {"image": "alpine:3", "privileged": True})
        launched = r.structured_content
        assert launched["status"] == "started" and launched["privileged"] is True

        r = await c.call_tool("read_file", {"path": "hello.txt"})
        assert "hello from the demo server" in r.content[0].text

        r = await c.call_tool("stream_report", {"steps": 2, "delay": 0.05})
        assert not r.is_error and "report done" in r.content[0].text

    lines = (demo.data_dir / "launches.jsonl").read_text().splitlines()
    assert [json.loads(l)["id"] for l in lines] == [launched["id"]]
    # which protocol era the client spoke is visible in what the server received
    bodies = demo.received_bodies()
    if mode == "legacy":
        assert '"initialize"' in bodies and "server/discover" not in bodies
    else:
        assert "server/discover" in bodies


async def test_read_file_refuses_escapes(demo_server, tmp_path):
    demo = demo_server("json")
    (demo.data_dir / "outside.txt").write_text("not for you")
    async with connect(demo.url, demo.token) as c:
        for path in ("../outside.txt", "/etc/passwd", "sub/../../outside.txt"):
            r = await c.call_tool("read_file", {"path": path})
            assert r.is_error, path
            assert "not for you" not in json.dumps(r.model_dump(mode="json"))
        # a legitimate nested path inside the scratch dir still works
        (demo.data_dir / "scratch" / "sub").mkdir()
        (demo.data_dir / "scratch" / "sub" / "a.txt").write_text("nested ok")
        r = await c.call_tool("read_file", {"path": "sub/a.txt"})
        assert not r.is_error and r.content[0].text == "nested ok"


async def test_run_command_times_out_after_5s(demo_server):
    demo = demo_server("json")
    async with connect(demo.url, demo.token) as c:
        t0 = time.monotonic()
        r = await c.call_tool("run_command", {"command": "sleep 30"})
        assert time.monotonic() - t0 < 15
        assert r.structured_content["exit_code"] == -1 and "timed out" in r.structured_content["output"]


async def test_stream_report_emits_progress_before_result(demo_server):
    demo = demo_server("sse")
    seen: list[tuple[float, float, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((time.monotonic(), progress, message))

    async with connect(demo.url, demo.token, mode="legacy") as c:
        t0 = time.monotonic()
        r = await c.call_tool("stream_report", {"steps": 4, "delay": 0.3}, progress_callback=on_progress)
        done = time.monotonic()
    assert [p for _, p, _ in seen] == [1, 2, 3, 4]
    # progress arrived while the tool was still working, not all at the end
    assert seen[0][0] - t0 < done - t0 - 0.6
    text = r.content[0].text
    assert "alice.nguyen@example.com" in text and "107-11-1037" in text


@pytest.mark.parametrize("transport", ["json", "legacy"])
def test_missing_or_wrong_token_is_refused_and_logged(demo_server, transport):
    demo = demo_server(transport)
    wrong = "not-the-service-token-" + "x" * 8
    for headers in ({}, {"authorization": f"Bearer {wrong}"}, {"authorization": demo.token}):
        if transport == "legacy":
            r = httpx.get(demo.url, headers=headers, timeout=10)
        else:
            r = httpx.post(demo.url, json=INIT, headers={**HDRS, **headers}, timeout=10)
        assert r.status_code == 401, r.text
        assert r.json()["error"] == "unauthorized"
    got = demo.received()
    assert len(got) == 3 and all(g["path"] == ("/sse" if transport == "legacy" else "/mcp") for g in got)
    auths = [[v for k, v in g["headers"] if k.lower() == "authorization"] for g in got]
    assert auths == [[], [fp(f"Bearer {wrong}")], [fp(demo.token)]]
    # the log holds fingerprints only, never a credential
    raw = demo.received_log.read_text()
    assert wrong not in raw and demo.token not in raw


def test_received_log_records_accepted_requests(demo_server):
    demo = demo_server("json")
    r = httpx.post(demo.url, json=INIT, headers={**HDRS, "authorization": f"Bearer {demo.token}"}, timeout=10)
    assert r.status_code == 200, r.text
    (entry,) = demo.received()
    assert entry["method"] == "POST" and entry["path"] == "/mcp"
    assert json.loads(entry["body"]) == INIT
    assert dict((k.lower(), v) for k, v in entry["headers"])["authorization"] == fp(f"Bearer {demo.token}")
    assert demo.token not in demo.received_log.read_text()


async def test_token_from_env(demo_server):
    demo = demo_server("json", token_env="DEMO_E2E_SERVICE_TOKEN")
    assert not demo.token_file.exists() or demo.token_file.read_text().strip() != demo.token
    async with connect(demo.url, demo.token) as c:
        assert TOOLS <= {t.name for t in (await c.list_tools()).tools}
    r = httpx.post(demo.url, json=INIT, headers=HDRS, timeout=10)
    assert r.status_code == 401


async def test_many_tools(demo_server):
    demo = demo_server("stateless", many_tools=25)
    async with connect(demo.url, demo.token) as c:
        names = {t.name for t in (await c.list_tools()).tools}
        assert {f"tool_{i:03d}" for i in range(25)} <= names and "tool_025" not in names
        r = await c.call_tool("tool_007", {"x": 4})
        assert r.content[0].text == "tool 7: 4"


def test_init_token_creates_private_file_once(tmp_path):
    path = tmp_path / ".secrets" / "demo-service-token"
    run = [sys.executable, "-m", "demo.server", "--init-token", str(path)]
    subprocess.run(run, cwd=ROOT, check=True, capture_output=True, timeout=60)
    first = path.read_text()
    assert len(first.strip()) >= 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    subprocess.run(run, cwd=ROOT, check=True, capture_output=True, timeout=60)
    assert path.read_text() == first, "an existing token is kept"


def test_secrets_dir_is_git_ignored():
    r = subprocess.run(["git", "check-ignore", "-q", ".secrets/demo-service-token"], cwd=ROOT)
    assert r.returncode == 0


def test_demo_data_is_realistic():
    cs = customers()
    assert len(cs) == 20 and len({c["email"] for c in cs}) == 20
    for c in cs:
        assert luhn_ok(c["card_number"]), c
        a, b, d = c["ssn"].split("-")
        assert (len(a), len(b), len(d)) == (3, 2, 4)
    assert all(luhn_ok(n) for n in CARDS) and not luhn_ok("4111111111111112")
    secrets = [k["secret"] for k in api_keys()]
    assert any(s.startswith("sk_live_") for s in secrets) and any(s.startswith("AKIA") for s in secrets)
