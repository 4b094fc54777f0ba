"""Recording end to end with real processes: mitmdump running the bastion chain, a fast
upstream MCP server, and clients over HTTP.

Self-contained harness: identity and policy are replaced by a small stand-in addon
(allow everything except the tool "forbidden", identity from X-Test-Sub) so these tests
exercise only recording, whatever the state of the other stages.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
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
UPSTREAM_TOKEN = "upstream-PLANTED-service-credential-7f3a"
CLIENT_TOKEN = "client-PLANTED-bearer-token-91c2"

UPSTREAM_APP = textwrap.dedent('''
    import json, os, sys, uvicorn
    TOKEN = os.environ["UPSTREAM_TOKEN"].encode()

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        headers = dict(scope["headers"])
        if headers.get(b"authorization") != b"Bearer " + TOKEN:
            await send({"type": "http.response.start", "status": 401, "headers": []})
            await send({"type": "http.response.body", "body": b"no"})
            return
        msg = json.loads(body)
        if "id" not in msg:
            await send({"type": "http.response.start", "status": 202, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        if msg["method"] == "initialize":
            result = {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}},
                      "serverInfo": {"name": "e2e-upstream", "version": "1"}}
        else:
            args = msg.get("params", {}).get("arguments", {})
            result = {"content": [{"type": "text", "text": "echo " + json.dumps(args)}]}
        out = json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": result}).encode()
        hdrs = [(b"mcp-session-id", b"e2e-session")] if msg["method"] == "initialize" else []
        if isinstance(msg["id"], int) and msg["id"] % 2 == 0:   # half the answers as SSE
            progress = json.dumps({"jsonrpc": "2.0", "method": "notifications/progress",
                                   "params": {"progressToken": msg["id"], "progress": 1}}).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": hdrs + [(b"content-type", b"text/event-stream")]})
            await send({"type": "http.response.body", "body": b"event: message\\ndata: " + progress + b"\\n\\n",
                        "more_body": True})
            await send({"type": "http.response.body", "body": b"event: message\\ndata: " + out + b"\\n\\n"})
        else:
            await send({"type": "http.response.start", "status": 200,
                        "headers": hdrs + [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": out})

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
''')

GATEWAY_SCRIPT = textwrap.dedent('''
    import os, sys
    sys.path.insert(0, {root!r})
    from addons.bastion import Bastion, build_stages
    from addons.hooks.httputil import refuse_jsonrpc
    from addons.core.mcpwire import jsonrpc_error
    from addons.core.record import Decision, Identity, get_record


    class StandInIdentity:
        """identity from X-Test-Sub (tests only); sits where the identity addon would."""
        name = "standin-identity"

        def request(self, flow):
            rec = get_record(flow.metadata)
            if flow.response is not None or rec.connection is None:
                return
            rec.identity = Identity(flow.request.headers.get("x-test-sub", "anon"), ("tester",), "e2e-client")


    class StandInPolicy:
        """allow all but the tool 'forbidden' (tests only)."""
        name = "standin"

        def request(self, flow):
            rec = get_record(flow.metadata)
            if flow.response is not None or rec.connection is None:
                return
            for m in rec.messages:
                if m.tool_name in ("forbidden", "drop_table"):
                    rec.decisions.append(Decision("deny", rule="no-forbidden", reason="tool is forbidden",
                                                  message_id=m.id))
                    refuse_jsonrpc(flow, [jsonrpc_error(m.id, -32001, "denied by rule no-forbidden")], False,
                                   reason="tool is forbidden", rule="no-forbidden")
                    return
                rec.decisions.append(Decision("allow", rule="allow-all", message_id=m.id))


    # the stand-in upstream answers calls, not tools/list: no argument schemas to learn
    skip = {{"identity", "policy", "approval", "argschema"}}
    if not os.environ.get("E2E_MASKING"):
        skip.add("masking")
    if os.environ.get("E2E_NO_RECORDER"):      # benchmarks: same chain without recording
        skip.add("recorder")
    chain = [s for s in build_stages() if s.name not in skip]    # a test variant of the pipeline
    pos = next(i for i, a in enumerate(chain) if a.name in ("recorder", "injector"))
    chain.insert(pos, StandInPolicy())
    chain.insert(1, StandInIdentity())
    addons = [Bastion(chain)]
''')


@pytest.fixture
def upstream(tmp_path):
    port = free_port()
    script = tmp_path / "upstream.py"
    script.write_text(UPSTREAM_APP)
    p = subprocess.Popen([sys.executable, str(script), str(port)], env={**os.environ, "UPSTREAM_TOKEN": UPSTREAM_TOKEN},
                         start_new_session=True)
    wait_port(port, p)
    yield port
    stop(p)


class Gateway:
    def __init__(self, tmp: Path, upstream_port: int, masking: bool = False):
        self.headers: dict[str, str] = HEADERS      # with the sealed session id after open_session()
        self.tmp = tmp
        self.upstream_port = upstream_port
        self.store = tmp / "recordings"
        self.rules = tmp / "rules"
        self.rules.mkdir(exist_ok=True)
        (self.rules / "connections.yaml").write_text(
            f"connections:\n  demo:\n    upstream: http://127.0.0.1:{upstream_port}/mcp\n"
            f"    credential:\n      from: env:E2E_UPSTREAM_TOKEN\n")
        if masking:
            (self.rules / "masking.yaml").write_text((ROOT / "rules" / "masking.yaml").read_text())
        self.masking = masking
        self.script = tmp / "gateway.py"
        self.script.write_text(GATEWAY_SCRIPT.format(root=str(ROOT)))
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self, instance: str = "gw-e2e", *extra: str, env: dict | None = None) -> "Gateway":
        self.port = free_port()
        cmd = [str(BIN / "mitmdump"), "-q", "--listen-host", "127.0.0.1",
               "--mode", f"reverse:http://127.0.0.1:{self.upstream_port}@{self.port}",
               "-s", str(self.script), "--set", f"bastion_rules={self.rules}",
               "--set", f"bastion_recordings={self.store}", "--set", f"bastion_instance={instance}",
               "--set", "connection_strategy=lazy", *extra]
        self.log = open(self.tmp / f"mitmdump-{instance}.log", "ab")
        self.proc = subprocess.Popen(cmd, env={**os.environ, "E2E_UPSTREAM_TOKEN": UPSTREAM_TOKEN,
                                          **({"E2E_MASKING": "1"} if self.masking else {}), **(env or {})},
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.tmp)
        wait_port(self.port, self.proc)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp/demo"

    def open_session(self) -> None:
        """initialize through the gateway, which seals the upstream's session id (e2e-session)
        for the caller: the gateway refuses session ids it did not issue."""
        r = httpx.post(self.url, json={"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {}},
                       headers={k: v for k, v in HEADERS.items() if k != "mcp-session-id"}, timeout=30)
        assert r.status_code == 200 and r.headers["mcp-session-id"] != HEADERS["mcp-session-id"], r.text
        self.headers = {**HEADERS, "mcp-session-id": r.headers["mcp-session-id"]}

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


@pytest.fixture
def gateway(tmp_path, upstream):
    gws: list[Gateway] = []

    def make(instance: str = "gw-e2e", *extra: str) -> Gateway:
        g = Gateway(tmp_path, upstream).start(instance, *extra)
        gws.append(g)
        return g
    yield make
    for g in gws:
        g.stop()


HEADERS = {"content-type": "application/json", "accept": "application/json, text/event-stream",
           "authorization": f"Bearer {CLIENT_TOKEN}", "mcp-session-id": "e2e-session", "x-test-sub": "loadtester"}


def tool_call(i: int, tool: str = "echo") -> dict:
    return {"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": {"name": tool, "arguments": {"n": i}}}


def response_of(r: httpx.Response, i: int) -> dict | None:
    """The JSON-RPC response with id i, from a JSON or SSE body."""
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        for block in r.text.split("\n\n"):
            for line in block.splitlines():
                if line.startswith("data: "):
                    obj = json.loads(line[6:])
                    if obj.get("id") == i:
                        return obj
        return None
    obj = r.json()
    return obj if isinstance(obj, dict) and obj.get("id") == i else None


def sql(store: Path, query: str) -> list[dict]:
    p = subprocess.run([str(BIN / "mcp-bastion"), "sql", query, "--format", "json", "--store", str(store)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


async def test_crash_loses_no_acknowledged_call(gateway):
    """2,000 calls at load, kill -9 mid-run: every call whose response reached the
    client is in the store (and is still there after recovery on restart)."""
    gw = gateway("gw-crash")
    gw.open_session()
    received: set[int] = set()
    total, concurrency, kill_after = 2000, 64, 700
    killed = asyncio.Event()

    async def worker(ids: list[int], client: httpx.AsyncClient) -> None:
        for i in ids:
            if killed.is_set():
                return
            try:
                r = await client.post(gw.url, json=tool_call(i), headers=gw.headers)
            except httpx.HTTPError:
                continue
            if r.status_code == 200 and (obj := response_of(r, i)) and "result" in obj:
                received.add(i)
                if len(received) >= kill_after and not killed.is_set():
                    killed.set()
                    os.kill(gw.proc.pid, signal.SIGKILL)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        ids = list(range(1, total + 1))
        await asyncio.gather(*(worker(ids[k::concurrency], client) for k in range(concurrency)))
    gw.proc.wait(10)
    assert killed.is_set() and len(received) >= kill_after
    assert gw.proc.returncode == -signal.SIGKILL

    def recorded() -> set[int]:
        rows = sql(gw.store, "SELECT DISTINCT rpc_id FROM messages WHERE direction = 's2c' AND kind = 'response' "
                             "AND method = 'tools/call'")
        return {int(r["rpc_id"]) for r in rows}

    got = recorded()                       # straight from the journal left by the crash
    missing = received - got
    assert not missing, f"{len(missing)} acknowledged call(s) missing, e.g. {sorted(missing)[:10]}"
    req_rows = sql(gw.store, "SELECT count(DISTINCT rpc_id) AS n FROM messages WHERE direction = 'c2s'")
    assert req_rows[0]["n"] >= len(received)

    # restart with the same instance name: the leftover journal becomes a segment
    gw.proc = None
    gw2 = gateway("gw-crash")
    gw2.open_session()
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(gw2.url, json=tool_call(999_999), headers=gw2.headers)
        assert r.status_code == 200
    assert list((gw.store / "gw-crash").glob("seg-*.parquet"))
    assert received <= recorded()


async def test_sql_while_gateway_serves_and_records(gateway):
    gw = gateway("gw-live")
    gw.open_session()
    stop_load = asyncio.Event()
    done = 0

    async def load(client: httpx.AsyncClient, k: int) -> None:
        nonlocal done
        i = k * 100_000
        while not stop_load.is_set():
            i += 1
            r = await client.post(gw.url, json=tool_call(i), headers=gw.headers)
            assert r.status_code == 200
            done += 1

    async with httpx.AsyncClient(timeout=30) as client:
        tasks = [asyncio.create_task(load(client, k)) for k in range(8)]
        counts = []
        for _ in range(5):
            await asyncio.sleep(0.3)
            proc = await asyncio.create_subprocess_exec(
                str(BIN / "mcp-bastion"), "sql", "SELECT count(*) AS n FROM messages", "--format", "json",
                "--store", str(gw.store), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await proc.communicate()
            assert proc.returncode == 0, err.decode()
            assert b"lock" not in err.lower()
            counts.append(json.loads(out)[0]["n"])
        stop_load.set()
        await asyncio.gather(*tasks)
    assert done > 0
    assert counts == sorted(counts) and counts[-1] > counts[0] > 0


async def test_refusal_redaction_and_session_recorded(gateway):
    gw = gateway("gw-audit")
    async with httpx.AsyncClient(timeout=30) as client:
        init = {"jsonrpc": "2.0", "id": "init-1", "method": "initialize",
                "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                           "clientInfo": {"name": "e2e", "version": "1"}}}
        h = {k: v for k, v in HEADERS.items() if k != "mcp-session-id"}
        r = await client.post(gw.url, json=init, headers=h)
        assert r.status_code == 200 and r.headers["mcp-session-id"] != "e2e-session"     # sealed
        sealed = {**HEADERS, "mcp-session-id": r.headers["mcp-session-id"]}
        r = await client.post(gw.url, json=tool_call(2), headers=sealed)       # SSE answer
        assert response_of(r, 2)["result"]
        r = await client.post(gw.url, json=tool_call(3, "forbidden"), headers=sealed)
        assert r.json()["error"]["code"] == -32001
        r = await client.post(f"http://127.0.0.1:{gw.port}/mcp/unknown", json=tool_call(4), headers=sealed)
        assert r.status_code == 404
    rows = sql(gw.store, "SELECT kind, direction, via, method, tool, sub, rpc_id FROM events "
                         "WHERE session_id = 'e2e-session' AND kind IN ('request','response','notification','error') "
                         "ORDER BY time, seq")
    assert [(x["kind"], x["direction"], x["method"], x["rpc_id"]) for x in rows] == [
        ("request", "c2s", "initialize", "init-1"), ("response", "s2c", "initialize", "init-1"),
        ("request", "c2s", "tools/call", "2"), ("notification", "s2c", "notifications/progress", None),
        ("response", "s2c", "tools/call", "2"),
        ("request", "c2s", "tools/call", "3"), ("error", "s2c", "tools/call", "3")]
    assert {x["sub"] for x in rows} == {"loadtester"}
    assert [x["via"] for x in rows if x["direction"] == "s2c"] == ["json", "sse", "sse", "gateway"]
    refusals = sql(gw.store, "SELECT rule, reason, status, path FROM refusals ORDER BY time")
    assert refusals[0]["rule"] == "no-forbidden" and refusals[1]["status"] == 404
    gw.stop()                                  # graceful: journal rolled into Parquet
    assert list((gw.store / "gw-audit").glob("seg-*.parquet"))
    for p in gw.store.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            assert UPSTREAM_TOKEN.encode() not in data and CLIENT_TOKEN.encode() not in data, p

    # replay and export of the recorded session; the export opens in mitmweb itself
    p = subprocess.run([str(BIN / "mcp-bastion"), "replay", "e2e-sess", "--store", str(gw.store)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "identity   loadtester  roles=tester  client=e2e-client" in p.stdout
    assert "DENY tools/call forbidden  rule=no-forbidden  reason: tool is forbidden" in p.stdout
    assert "⇠ server notification notifications/progress" in p.stdout
    out = gw.tmp / "session.mitm"
    p = subprocess.run([str(BIN / "mcp-bastion"), "export", "e2e-session", "-o", str(out), "--store", str(gw.store)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert UPSTREAM_TOKEN.encode() not in out.read_bytes() and CLIENT_TOKEN.encode() not in out.read_bytes()
    web_port = free_port()
    mw = subprocess.Popen([str(BIN / "mitmweb"), "-r", str(out), "--mode", "regular@0", "--set", f"web_port={web_port}",
                           "--set", "web_host=127.0.0.1", "--set", "web_open_browser=false", "--set", "web_password=e2e"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_port(web_port, mw)
        flows = []
        for _ in range(50):
            flows = httpx.get(f"http://127.0.0.1:{web_port}/flows", headers={"authorization": "Bearer e2e"}).json()
            if len(flows) >= 3:
                break
            time.sleep(0.1)
        # initialize, call, denied call (the call to an unknown connection carried a session id
        # sealed for another connection: not this session; recorded under the id it presented)
        assert len(flows) == 3
        assert any(f.get("marked") for f in flows)          # the refused call is marked
    finally:
        stop(mw)


SDK_UPSTREAM = textwrap.dedent('''
    import sys, uvicorn
    from mcp.server.mcpserver import MCPServer

    server = MCPServer("e2e-sdk")

    @server.tool()
    def get_customer(id: int) -> dict:
        """Customer record (contains personal data)."""
        return {"id": id, "name": "Ann Example", "email": "ann.example@corp.test", "ssn": "123-45-6789"}

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    @server.tool()
    def drop_table(name: str) -> str:
        """Dangerous."""
        return "dropped " + name

    uvicorn.run(server.streamable_http_app(), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
''')


@pytest.fixture
def sdk_gateway(tmp_path):
    port = free_port()
    script = tmp_path / "sdk_upstream.py"
    script.write_text(SDK_UPSTREAM)
    up = subprocess.Popen([sys.executable, str(script), str(port)], start_new_session=True)
    gw = None
    try:
        wait_port(port, up)
        gw = Gateway(tmp_path, port, masking=True).start("gw-sdk")
        yield gw
    finally:
        if gw is not None:
            gw.stop()
        stop(up)


async def test_scripted_sdk_session_is_recorded_with_identity_decisions_and_masked_values(sdk_gateway):
    """initialize, list, several calls incl. one denied and one masked, through the official SDK."""
    import httpx2
    from mcp.client.client import Client
    from mcp.client.streamable_http import streamable_http_client

    gw = sdk_gateway
    http_client = httpx2.AsyncClient(headers={"authorization": f"Bearer {CLIENT_TOKEN}", "x-test-sub": "alice"},
                                     timeout=30)
    async with http_client:
        async with Client(streamable_http_client(gw.url, http_client=http_client), mode="legacy") as client:
            tools = await client.list_tools()
            assert {t.name for t in tools.tools} >= {"get_customer", "add", "drop_table"}
            r = await client.call_tool("add", {"a": 2, "b": 3})
            assert not r.is_error
            cust = await client.call_tool("get_customer", {"id": 42})
            text = cust.content[0].text
            assert "123-45-6789" not in text and "ann.example@corp.test" not in text   # masked for the caller
            from mcp.shared.exceptions import MCPError
            with pytest.raises(MCPError, match="denied by rule"):
                await client.call_tool("drop_table", {"name": "users"})

    sessions = sql(gw.store, "SELECT * FROM sessions")
    assert len(sessions) == 1
    s = sessions[0]
    assert s["subs"] == "alice" and not s["synthetic"] and s["tool_calls"] == 3 and s["refusals"] == 1
    assert s["masked"] >= 2
    sid = s["session_id"]
    msgs = sql(gw.store, f"SELECT direction, kind, method, tool, CAST(arguments AS VARCHAR) AS args, "
                         f"CAST(result AS VARCHAR) AS result, sub FROM messages WHERE session_id = '{sid}' "
                         "ORDER BY time, seq")
    methods = [(m["direction"], m["kind"], m["method"]) for m in msgs]
    assert methods[:3] == [("c2s", "request", "initialize"), ("s2c", "response", "initialize"),
                           ("c2s", "notification", "notifications/initialized")]
    assert ("c2s", "request", "tools/list") in methods and ("s2c", "response", "tools/list") in methods
    calls = {m["tool"]: m for m in msgs if m["direction"] == "s2c" and m["method"] == "tools/call"}
    assert set(calls) == {"add", "get_customer", "drop_table"}
    got = calls["get_customer"]["result"]
    assert "[MASKED:ssn]" in got and "123-45-6789" not in got and "ann.example@corp.test" not in got
    assert {m["sub"] for m in msgs} == {"alice"}
    decisions = sql(gw.store, "SELECT tool, action, rule FROM decisions WHERE method = 'tools/call' ORDER BY seq")
    assert [(d["tool"], d["action"]) for d in decisions] == [("add", "allow"), ("get_customer", "allow"),
                                                             ("drop_table", "deny")]
    masks = sql(gw.store, "SELECT type, sum(count) AS n FROM masks WHERE tool = 'get_customer' GROUP BY ALL")
    assert {m["type"] for m in masks} >= {"ssn"}
    gw.stop()
    for p in gw.store.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            for secret in (UPSTREAM_TOKEN, CLIENT_TOKEN, "123-45-6789", "ann.example@corp.test"):
                assert secret.encode() not in data, (p, secret)
    p = subprocess.run([str(BIN / "mcp-bastion"), "replay", sid, "--store", str(gw.store)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "identity   alice" in p.stdout and "DENY tools/call drop_table" in p.stdout
    assert "[MASKED:ssn]" in p.stdout and "123-45-6789" not in p.stdout
