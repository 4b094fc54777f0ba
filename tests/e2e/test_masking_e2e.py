"""Masking end to end with real processes: an MCP server built on the official SDK (tools
get_customer, query_sql, stream_report with the demo's data shapes), a real mitmdump
running the bastion chain with the shipped rules/masking.yaml, and the SDK client.

Self-contained: identity and policy are replaced by a small stand-in addon (roles from the
X-Test-Roles header, allow everything) placed where they sit in the chain, so these tests
exercise masking whatever the state of the other stages.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.procs import free_port, stop, wait_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
UPSTREAM_TOKEN = "upstream-service-credential-e2e-masking"

CUSTOMER = {"id": 1, "name": "Alice Martin", "email": "alice.martin@example.com", "ssn": "123-45-6789",
            "card_number": "4111 1111 1111 1111", "notes": "VIP; call +1 415 555 0100",
            "billing": {"plan": "pro", "api_token": "tok_live_8f3a9c2e7b"}}
SECRETS = ("alice.martin@example.com", "123-45-6789", "4111 1111 1111 1111", "tok_live_8f3a9c2e7b",
           "415 555 0100", "078-05-1120", "bob.stone@example.org", "5500 0000 0000 0004", "tok_live_0c1d2e3f4a")

UPSTREAM_APP = textwrap.dedent('''
    import asyncio, json, os, sys, time
    import uvicorn
    from pydantic import BaseModel
    from mcp.server.mcpserver import MCPServer, Context

    TOKEN = os.environ["UPSTREAM_TOKEN"]
    ROWS = [
        {CUSTOMER!r},
        {{"id": 2, "name": "Bob Stone", "email": "bob.stone@example.org", "ssn": "078-05-1120",
          "card_number": "5500 0000 0000 0004", "notes": "prefers e-mail",
          "billing": {{"plan": "basic", "api_token": "tok_live_0c1d2e3f4a"}}}},
    ]

    class Billing(BaseModel):
        plan: str
        api_token: str

    class Customer(BaseModel):
        id: int
        name: str
        email: str
        ssn: str
        card_number: str
        notes: str
        billing: Billing

    server = MCPServer("masking-e2e")

    @server.tool()
    def get_customer(id: int) -> Customer:
        """One customer."""
        return Customer(**next(r for r in ROWS if r["id"] == id))

    @server.tool()
    def query_sql(sql: str) -> str:
        """Rows as JSON text."""
        return json.dumps([{{k: v for k, v in r.items() if k != "billing"}} for r in ROWS], indent=2)

    @server.tool()
    async def stream_report(steps: int, delay: float, ctx: Context) -> str:
        """Slow report with progress."""
        for i in range(steps):
            await ctx.report_progress(i + 1, steps, f"step {{i + 1}}: checked ssn 123-45-6789")
            await asyncio.sleep(delay)
        with open(os.environ["FINISHED_FILE"], "a") as f:
            f.write(f"{{time.time()}}\\n")
        return "report done for alice.martin@example.com"

    class Auth:
        def __init__(self, app):
            self.app = app
        async def __call__(self, scope, receive, send):
            if scope["type"] == "http" and dict(scope["headers"]).get(b"authorization") != f"Bearer {{TOKEN}}".encode():
                await send({{"type": "http.response.start", "status": 401, "headers": []}})
                await send({{"type": "http.response.body", "body": b"no"}})
                return
            await self.app(scope, receive, send)

    app = server.streamable_http_app(json_response=sys.argv[2] == "json", stateless_http=True)
    uvicorn.run(Auth(app), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
''').format(CUSTOMER=CUSTOMER)

GATEWAY_SCRIPT = textwrap.dedent('''
    import sys
    sys.path.insert(0, {root!r})
    from addons.bastion import Bastion, build_stages
    from addons.core.record import Decision, Identity, get_record


    class StandInIdentityPolicy:
        """Tests only: roles from X-Test-Roles; allow every message."""
        name = "standin"

        def request(self, flow):
            rec = get_record(flow.metadata)
            if flow.response is not None or rec.connection is None:
                return
            roles = tuple(r for r in flow.request.headers.get("x-test-roles", "").split(",") if r)
            rec.identity = Identity("e2e-user", roles, "e2e-client")
            rec.decisions = [Decision("allow", rule="allow-all", message_id=m.id) for m in rec.messages]


    # a test variant of the pipeline: identity, policy and approval replaced by the stand-in
    chain = [s for s in build_stages() if s.name not in {{"identity", "policy", "approval", "recorder"}}]
    pos = next(i for i, a in enumerate(chain) if a.name == "masking")
    chain.insert(pos, StandInIdentityPolicy())
    addons = [Bastion(chain)]
''')


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Two upstreams (JSON responses and SSE responses) behind one gateway."""
    tmp = tmp_path_factory.mktemp("masking-e2e")
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        (tmp / "upstream.py").write_text(UPSTREAM_APP)
        ports = {}
        for mode in ("json", "sse"):
            port = free_port()
            log = open(tmp / f"upstream-{mode}.log", "ab")
            logs.append(log)
            p = subprocess.Popen([sys.executable, str(tmp / "upstream.py"), str(port), mode],
                                 env={**os.environ, "UPSTREAM_TOKEN": UPSTREAM_TOKEN,
                                      "FINISHED_FILE": str(tmp / f"finished-{mode}")},
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(p)
            wait_port(port, p)
            ports[mode] = port
        rules = tmp / "rules"
        rules.mkdir()
        (rules / "connections.yaml").write_text("connections:\n" + "".join(
            f"  demo-{mode}:\n    upstream: http://127.0.0.1:{port}/mcp\n"
            f"    credential:\n      from: env:E2E_UPSTREAM_TOKEN\n" for mode, port in ports.items()))
        (rules / "masking.yaml").write_text((ROOT / "rules" / "masking.yaml").read_text())
        (tmp / "gateway.py").write_text(GATEWAY_SCRIPT.format(root=str(ROOT)))
        gw_port = free_port()
        gw_log = open(tmp / "mitmdump.log", "ab")
        logs.append(gw_log)
        gw = subprocess.Popen(
            [str(BIN / "mitmdump"), "--listen-host", "127.0.0.1",
             "--mode", f"reverse:http://127.0.0.1:{ports['json']}@{gw_port}", "-s", str(tmp / "gateway.py"),
             "--set", f"bastion_rules={rules}", "--set", f"bastion_mask_key_file={tmp / 'secrets' / 'mask-key'}",
             "--set", "connection_strategy=lazy"],
            env={**os.environ, "E2E_UPSTREAM_TOKEN": UPSTREAM_TOKEN}, cwd=tmp,
            stdout=gw_log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(gw)
        wait_port(gw_port, gw)
        yield {"port": gw_port, "tmp": tmp}
    finally:
        for p in reversed(procs):
            stop(p)
        for log in logs:
            log.close()
        gw_log_path = tmp / "mitmdump.log"
        if gw_log_path.exists():
            text = gw_log_path.read_text(errors="replace")
            for s in SECRETS + (UPSTREAM_TOKEN,):
                assert s not in text, f"{s!r} in mitmdump output"


def client(env, mode: str, roles: str):
    import httpx2
    from mcp.client.client import Client
    from mcp.client.streamable_http import streamable_http_client

    http = httpx2.AsyncClient(headers={"x-test-roles": roles}, timeout=30)
    url = f"http://127.0.0.1:{env['port']}/mcp/demo-{mode}"
    return Client(streamable_http_client(url, http_client=http))


def assert_no_secret(obj) -> None:
    text = obj if isinstance(obj, str) else json.dumps(obj)
    for s in SECRETS:
        assert s not in text, s


@pytest.mark.parametrize("mode", ["json", "sse"])
async def test_get_customer_as_analyst_is_masked_and_validates(env, mode):
    async with client(env, mode, "analyst") as c:
        # call_tool re-validates structuredContent against the tool's outputSchema
        res = await c.call_tool("get_customer", {"id": 1})
    assert not res.is_error
    sc = res.structured_content
    assert sc["ssn"] == "[MASKED:ssn]"
    assert sc["card_number"] == "**** **** **** 1111"
    assert sc["billing"] == {"plan": "pro", "api_token": "[MASKED:api_token]"}
    assert sc["email"] == "a***@example.com"
    assert sc["notes"] == "VIP; call [MASKED:phone]"
    assert sc["name"] == "Alice Martin" and sc["id"] == 1
    text = res.content[0].text
    assert json.loads(text) == sc
    assert_no_secret(res.model_dump(mode="json"))


@pytest.mark.parametrize("mode", ["json", "sse"])
async def test_query_sql_rows_as_analyst_are_masked(env, mode):
    async with client(env, mode, "analyst") as c:
        res = await c.call_tool("query_sql", {"sql": "select * from customers"})
    rows = json.loads(res.content[0].text)
    assert [r["ssn"] for r in rows] == ["[MASKED:ssn]", "[MASKED:ssn]"]
    assert [r["card_number"] for r in rows] == ["**** **** **** 1111", "**** **** **** 0004"]
    assert [r["email"] for r in rows] == ["a***@example.com", "b***@example.org"]
    assert_no_secret(res.model_dump(mode="json"))


@pytest.mark.parametrize("mode", ["json", "sse"])
async def test_other_roles_get_the_strict_profile(env, mode):
    async with client(env, mode, "dev") as c:
        res = await c.call_tool("get_customer", {"id": 1})
    sc = res.structured_content
    assert sc["email"].startswith("[HASH:") and sc["card_number"] == "[MASKED:card_number]"
    assert sc["ssn"] == "[MASKED:ssn]" and sc["billing"]["api_token"] == "[MASKED:api_token]"
    async with client(env, mode, "auditor") as c:
        again = await c.call_tool("get_customer", {"id": 1})
    assert again.structured_content["email"] == sc["email"]          # keyed hash: joinable


async def test_streaming_tool_first_event_arrives_before_upstream_finishes(env):
    events: list[tuple[float, str | None]] = []

    async def on_progress(progress, total, message):
        events.append((time.time(), message))

    async with client(env, "sse", "analyst") as c:
        started = time.time()
        res = await c.call_tool("stream_report", {"steps": 4, "delay": 0.6}, progress_callback=on_progress)
        ended = time.time()
    finished = float((env["tmp"] / "finished-sse").read_text().split()[-1])
    assert len(events) == 4
    first = events[0][0]
    # the first event reached the client while the upstream was still working (~1.8 s more)
    assert first - started < 1.0 and finished - first > 1.2, (started, first, finished, ended)
    assert all(m == f"step {i + 1}: checked ssn [MASKED:ssn]" for i, (_, m) in enumerate(events))
    assert res.content[0].text == "report done for a***@example.com"


async def test_raw_sse_response_is_masked_event_by_event(env):
    """Without the SDK (which would normalise): the bytes on the wire carry no secret."""
    url = f"http://127.0.0.1:{env['port']}/mcp/demo-sse"
    headers = {"content-type": "application/json", "accept": "application/json, text/event-stream",
               "x-test-roles": "analyst", "mcp-protocol-version": "2025-11-25"}
    body = {"jsonrpc": "2.0", "id": 5, "method": "tools/call",
            "params": {"name": "get_customer", "arguments": {"id": 2}}}
    async with httpx.AsyncClient(timeout=30) as h:
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                           "clientInfo": {"name": "raw", "version": "1"}}}
        r0 = await h.post(url, json=init, headers=headers)
        assert r0.status_code == 200
        r = await h.post(url, json=body, headers=headers)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert_no_secret(r.text)
    assert "[MASKED:api_token]" in r.text and "b***@example.org" in r.text


async def test_hot_reload_while_running_and_broken_file_keeps_last_good(env):
    """Runs last in this module: edits the gateway's rules/masking.yaml and restores it."""
    import asyncio

    path = env["tmp"] / "rules" / "masking.yaml"
    original = path.read_text()
    try:
        path.write_text(original.replace("roles: [analyst]\n    profile: analyst", "roles: [analyst]\n    profile: strict"))
        await asyncio.sleep(1.5)
        async with client(env, "json", "analyst") as c:
            res = await c.call_tool("get_customer", {"id": 1})
        assert res.structured_content["email"].startswith("[HASH:")          # strict now

        path.write_text(original.replace("style: partial", "style: scramble", 1))
        await asyncio.sleep(1.5)
        async with client(env, "json", "analyst") as c:
            res = await c.call_tool("get_customer", {"id": 1})
        assert res.structured_content["email"].startswith("[HASH:")          # last good rules stay
        log = (env["tmp"] / "mitmdump.log").read_text(errors="replace")
        assert "masking rules reload rejected" in log and "masking.yaml:" in log
    finally:
        path.write_text(original)
        await asyncio.sleep(1.5)
    async with client(env, "json", "analyst") as c:
        res = await c.call_tool("get_customer", {"id": 1})
    assert res.structured_content["email"] == "a***@example.com"


# --- the bundled demo server (demo/server.py) ----------------------------------------------

@pytest.fixture(scope="module")
def demo_env(tmp_path_factory):
    """demo.server in its JSON and SSE variants behind one gateway with the shipped rules."""
    tmp = tmp_path_factory.mktemp("masking-demo-e2e")
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        ports = {}
        for mode in ("json", "sse"):
            port = free_port()
            log = open(tmp / f"demo-{mode}.log", "ab")
            logs.append(log)
            p = subprocess.Popen([sys.executable, "-m", "demo.server", "--port", str(port), "--transport", mode,
                                  "--token-env", "E2E_UPSTREAM_TOKEN", "--data-dir", str(tmp / f"data-{mode}")],
                                 env={**os.environ, "E2E_UPSTREAM_TOKEN": UPSTREAM_TOKEN}, cwd=ROOT,
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(p)
            wait_port(port, p)
            ports[mode] = port
        rules = tmp / "rules"
        rules.mkdir()
        (rules / "connections.yaml").write_text("connections:\n" + "".join(
            f"  demo-{mode}:\n    upstream: http://127.0.0.1:{port}/mcp\n"
            f"    credential:\n      from: env:E2E_UPSTREAM_TOKEN\n" for mode, port in ports.items()))
        (rules / "masking.yaml").write_text((ROOT / "rules" / "masking.yaml").read_text())
        (tmp / "gateway.py").write_text(GATEWAY_SCRIPT.format(root=str(ROOT)))
        gw_port = free_port()
        gw_log = open(tmp / "mitmdump.log", "ab")
        logs.append(gw_log)
        gw = subprocess.Popen(
            [str(BIN / "mitmdump"), "--listen-host", "127.0.0.1",
             "--mode", f"reverse:http://127.0.0.1:{ports['json']}@{gw_port}", "-s", str(tmp / "gateway.py"),
             "--set", f"bastion_rules={rules}", "--set", f"bastion_mask_key_file={tmp / 'secrets' / 'mask-key'}",
             "--set", "connection_strategy=lazy"],
            env={**os.environ, "E2E_UPSTREAM_TOKEN": UPSTREAM_TOKEN}, cwd=tmp,
            stdout=gw_log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(gw)
        wait_port(gw_port, gw)
        yield {"port": gw_port, "tmp": tmp}
    finally:
        for p in reversed(procs):
            stop(p)
        for log in logs:
            log.close()
        gw_log_path = tmp / "mitmdump.log"
        if gw_log_path.exists():
            text = gw_log_path.read_text(errors="replace")
            for s in demo_secrets() + [UPSTREAM_TOKEN]:
                assert s not in text, f"{s!r} in mitmdump output"


def demo_secrets() -> list[str]:
    import hashlib

    from demo.data import api_keys, customers
    out = []
    for c in customers():
        out += [c["email"], c["ssn"], c["card_number"], c["notes"].split()[2].rstrip(";"),
                f"tok_live_{hashlib.sha1(str(c['id']).encode()).hexdigest()}"]
    return out + [k["secret"] for k in api_keys()]


def assert_no_demo_secret(obj) -> None:
    text = obj if isinstance(obj, str) else json.dumps(obj)
    for s in demo_secrets():
        assert s not in text, s


@pytest.mark.parametrize("mode", ["json", "sse"])
async def test_demo_get_customer_as_analyst(demo_env, mode):
    async with client(demo_env, mode, "analyst") as c:
        res = await c.call_tool("get_customer", {"id": 1})     # structured result re-validated by the SDK
    sc = res.structured_content
    assert sc["ssn"] == "[MASKED:ssn]"
    assert sc["billing"]["api_token"] == "[MASKED:api_token]"
    assert sc["email"] == "a***@example.com"
    assert sc["card_number"].endswith("4444") and set(sc["card_number"][:-4]) == {"*"}
    assert "[MASKED:phone]" in sc["notes"]
    assert json.loads(res.content[0].text) == sc
    assert_no_demo_secret(res.model_dump(mode="json"))


@pytest.mark.parametrize("mode", ["json", "sse"])
async def test_demo_query_sql_select_star_as_analyst(demo_env, mode):
    async with client(demo_env, mode, "analyst") as c:
        res = await c.call_tool("query_sql", {"sql": "select * from customers"})
        keys = await c.call_tool("query_sql", {"sql": "select * from api_keys"})
    rows = res.structured_content["rows"]
    assert len(rows) == 20
    assert all(r["ssn"] == "[MASKED:ssn]" for r in rows)
    assert all(r["email"].startswith(r["name"][0].lower() + "***@") for r in rows)
    assert all(r["card_number"][-4:].isdigit() and "*" in r["card_number"] for r in rows)
    assert json.loads(res.content[0].text)["rows"] == rows
    assert all(k["secret"] == "[MASKED:secret]" for k in keys.structured_content["rows"])
    assert_no_demo_secret(res.model_dump(mode="json"))
    assert_no_demo_secret(keys.model_dump(mode="json"))


async def test_demo_stream_report_streams_masked_events_before_upstream_finishes(demo_env):
    received: list[tuple[float, str | None]] = []
    logs: list[str] = []

    async def on_progress(progress, total, message):
        received.append((time.time(), message))

    async def on_log(params):
        logs.append(json.dumps(params.data))

    import httpx2
    from mcp.client.client import Client
    from mcp.client.streamable_http import streamable_http_client
    http = httpx2.AsyncClient(headers={"x-test-roles": "analyst"}, timeout=30)
    url = f"http://127.0.0.1:{demo_env['port']}/mcp/demo-sse"
    async with Client(streamable_http_client(url, http_client=http), logging_callback=on_log, log_level="info") as c:
        res = await c.call_tool("stream_report", {"steps": 4, "delay": 0.5}, progress_callback=on_progress)
    text = res.content[0].text
    upstream_done = float(text.split("report done at ")[1].split(":")[0])
    assert len(received) == 4
    first_seen = received[0][0]
    # first event at the client well before the upstream produced its result (3 x 0.5 s later)
    assert upstream_done - first_seen > 1.0, (first_seen, upstream_done)
    assert "[MASKED:ssn]" in text and "a***@example.com" in text and "************1111" in text
    assert_no_demo_secret(text)
    assert logs and all("a***@example.com" in line for line in logs), logs   # log notifications masked too
