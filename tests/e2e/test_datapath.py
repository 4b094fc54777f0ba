"""Issue 3 acceptance: real SDK clients through a real mitmdump to the real demo server."""
from __future__ import annotations

import gzip
import hashlib
import json
import socket

import httpx
import pytest

from demo.client import connect
from tests.e2e.conftest import ROOT

TOOLS = {"query_sql", "get_customer", "run_command", "launch_container", "read_file", "stream_report"}
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}


def fp(value: str) -> str:
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:16]


def auth_values(received: list[dict]) -> set[str]:
    return {v for r in received for k, v in r["headers"] if k.lower() == "authorization"}


async def exercise(url: str, token: str, legacy: bool = False, mode: str | None = None) -> dict:
    out = {}
    async with connect(url, token, legacy=legacy, mode=mode) as c:
        tools = await c.list_tools()
        out["tools"] = {t.name for t in tools.tools}
        r = await c.call_tool("query_sql", {"sql": "SELECT id, name FROM customers ORDER BY id LIMIT 3"})
        out["query_sql"] = r
        out["get_customer"] = await c.call_tool("get_customer", {"id": 2})
        out["run_command"] = await c.call_tool("run_command", {"command": "ls"})
        out["launch_container"] = await c.call_tool("launch_container", {"image": "alpine:3"})
        out["read_file"] = await c.call_tool("read_file", {"path": "hello.txt"})
    return out


def check_results(out: dict) -> None:
    assert TOOLS <= out["tools"]
    for name in ("query_sql", "get_customer", "run_command", "launch_container", "read_file"):
        assert not out[name].is_error, (name, out[name])
    assert out["query_sql"].structured_content["rowcount"] == 3
    assert out["get_customer"].structured_content["id"] == 2
    assert "hello.txt" in out["run_command"].structured_content["output"]
    assert out["launch_container"].structured_content["status"] == "started"
    assert "hello from the demo server" in out["read_file"].content[0].text


@pytest.mark.parametrize("transport", ["json", "sse", "stateless"])
async def test_sdk_client_auto_mode_through_gateway(stack, transport):
    demo, gw = stack(transport)
    token = gw.token("alice", ["e2e-all"])
    check_results(await exercise(gw.mcp_url(), token))
    # the upstream got the service credential and never the caller's token
    received = demo.received()
    assert received, "the demo server saw no traffic"
    assert auth_values(received) == {fp(f"Bearer {demo.token}")}
    assert fp(f"Bearer {token}") not in json.dumps(received)
    log = gw.log_text()
    assert demo.token not in log and token not in log


@pytest.mark.parametrize("transport", ["json", "sse"])
async def test_sdk_client_handshake_era_through_gateway(stack, transport):
    demo, gw = stack(transport)
    check_results(await exercise(gw.mcp_url(), gw.token("bob", ["e2e-all"]), mode="legacy"))
    assert any('"initialize"' in r["body"] for r in demo.received())


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_legacy_sse_transport_through_gateway(stack, mode):
    """HTTP+SSE (2024-11-05 transport); the SDK speaks the handshake era on it in `legacy`
    mode and 2026-07-28 in `auto` mode."""
    demo, gw = stack("legacy")
    token = gw.token("carol", ["e2e-all"])
    check_results(await exercise(gw.mcp_url(), token, legacy=True, mode=mode))
    assert ("server/discover" in demo.received_bodies()) == (mode == "auto")
    received = demo.received()
    # the GET stream went to /sse and POSTs only to the path the upstream announced
    assert {r["path"] for r in received} <= {"/sse", "/messages/"}
    assert auth_values(received) == {fp(f"Bearer {demo.token}")}
    assert fp(f"Bearer {token}") not in json.dumps(received)
    log = gw.log_text()
    assert demo.token not in log and token not in log


async def test_client_never_sees_service_credential(stack):
    demo, gw = stack("json")
    token = gw.token("dave", ["e2e-all"])
    async with httpx.AsyncClient() as http:
        r = await http.post(gw.mcp_url(), json=INIT, headers={"authorization": f"Bearer {token}",
                                                             "accept": "application/json, text/event-stream"})
    assert r.status_code == 200, r.text
    assert demo.token not in r.text and demo.token not in json.dumps(dict(r.headers))


def raw_post(gw, body: bytes, token: str, **headers: str) -> httpx.Response:
    h = {"authorization": f"Bearer {token}", "content-type": "application/json",
         "accept": "application/json, text/event-stream", **headers}
    return httpx.post(gw.mcp_url(), content=body, headers=h, timeout=10)


BAD_BODIES = [
    ("invalid-json", b'{"jsonrpc":"2.0","id":1,', {}, 400, -32700),
    ("not-jsonrpc", b'{"hello":"world"}', {}, 400, -32600),
    ("wrong-version", b'{"jsonrpc":"1.0","id":1,"method":"tools/list"}', {}, 400, -32600),
    ("duplicate-keys", b'{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call"}', {}, 400, -32700),
    ("duplicate-escaped-keys", b'{"jsonrpc":"2.0","id":1,"method":"tools/list","m\\u0065thod":"tools/call"}', {}, 400, -32700),
    ("non-utf8", b'{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"x":"\xff\xfe"}}', {}, 400, -32700),
    ("bom", b'\xef\xbb\xbf{"jsonrpc":"2.0","id":1,"method":"tools/list"}', {}, 400, -32700),
    ("bad-encoding", b'not gzip at all', {"content-encoding": "gzip"}, 400, -32700),
    ("unknown-encoding", b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}', {"content-encoding": "x-secret"}, 400, -32700),
    ("wrong-case-method", b'{"jsonrpc":"2.0","id":1,"method":"Tools/List"}', {}, 404, -32601),
    ("arguments-string", b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"run_command","arguments":"{}"}}', {}, 400, -32602),
    ("routing-header-mismatch", b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"run_command","arguments":{"command":"ls"}}}',
     {"mcp-method": "tools/list"}, 400, -32020),
    ("routing-name-mismatch", b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"run_command","arguments":{"command":"ls"}}}',
     {"mcp-method": "tools/call", "mcp-name": "read_file"}, 400, -32020),
]


@pytest.mark.parametrize("case", BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_input_refused_and_not_forwarded(stack, case):
    _, body, headers, status, code = case
    demo, gw = stack("json")
    token = gw.token("eve", ["e2e-all"])
    r = raw_post(gw, body, token, **headers)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert demo.received() == []


def test_duplicate_routing_header_refused(stack):
    demo, gw = stack("json")
    body = b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}'
    token = gw.token("eve", ["e2e-all"])
    # httpx folds dict headers; send the duplicate as a raw list
    r = httpx.post(gw.mcp_url(), content=body, timeout=10, headers=[
        ("authorization", f"Bearer {token}"), ("content-type", "application/json"),
        ("accept", "application/json, text/event-stream"),
        ("mcp-method", "tools/list"), ("Mcp-Method", "tools/list")])
    assert r.status_code == 400 and r.json()["error"]["code"] == -32020
    assert demo.received() == []


def test_oversized_and_content_type(stack):
    demo, gw = stack("json")
    token = gw.token("eve", ["e2e-all"])
    big = b'{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"pad":"' + b"a" * (5 * 1024 * 1024) + b'"}}'
    assert raw_post(gw, big, token).status_code == 413
    ok = b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}'
    assert raw_post(gw, ok, token, **{"content-type": "text/plain"}).status_code == 415
    assert demo.received() == []


def test_gzip_body_is_decoded_inspected_and_forwarded_decoded(stack):
    demo, gw = stack("json")
    token = gw.token("eve", ["e2e-all"])
    r = raw_post(gw, gzip.compress(json.dumps(INIT).encode()), token, **{"content-encoding": "gzip"})
    assert r.status_code == 200, r.text
    got = demo.received()
    assert len(got) == 1 and json.loads(got[0]["body"])["method"] == "initialize"
    assert not any(k.lower() == "content-encoding" for k, _ in got[0]["headers"])


PATH_TRICKS = ["/mcp/demo/../demo", "/mcp/demo/%2e%2e/other", "/mcp/demo%2f..%2fother", "/mcp//demo",
               "/mcp/demo/..%2f..%2fsse", "/mcp/demo\\..\\x", "/mcp/nope", "/mcp/demo/extra", "/admin", "/mcp/demo?x=1"]


@pytest.mark.parametrize("path", PATH_TRICKS)
def test_path_tricks_never_reach_upstream(stack, path):
    demo, gw = stack("json")
    token = gw.token("eve", ["e2e-all"])
    body = json.dumps(INIT).encode()
    # raw socket: clients normalise paths, attackers don't
    req = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\nAuthorization: Bearer {token}\r\n"
           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(req)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    assert 400 <= status < 500, data[:300]
    assert demo.received() == []


def test_exception_in_an_addon_fails_closed(demo_server, rules_dir, gateway):
    from tests.e2e.conftest import ALLOW_ALL_POLICY
    demo = demo_server("json")
    gw = gateway(rules_dir(demo, **{"policy.yaml": ALLOW_ALL_POLICY}),
                 pre_scripts=(str(ROOT / "tests" / "e2e" / "fault_inject.py"),),
                 env={"BASTION_FAULT": "addons.hooks.policy:Policy.request"})
    r = raw_post(gw, json.dumps(INIT).encode(), gw.token("eve", ["e2e-all"]))
    assert r.status_code == 502
    assert r.json() == {"error": "gateway_error", "error_description": "the gateway could not check this request"}
    assert "injected fault" in gw.log_text()
    assert demo.received() == []


async def test_session_belongs_to_its_identity(stack):
    """A second identity that learns a session id cannot ride on it."""
    demo, gw = stack("json")
    alice, mallory = gw.token("alice", ["e2e-all"]), gw.token("mallory", ["e2e-all"])
    async with httpx.AsyncClient(timeout=10) as http:
        hdr = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
        r = await http.post(gw.mcp_url(), json=INIT, headers={**hdr, "authorization": f"Bearer {alice}"})
        sid = r.headers["mcp-session-id"]
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
        before = len(demo.received())
        r2 = await http.post(gw.mcp_url(), json=call,
                             headers={**hdr, "authorization": f"Bearer {mallory}", "mcp-session-id": sid})
        assert r2.status_code == 404 and r2.json()["error"] == "unknown_session"
        assert len(demo.received()) == before
        # the owner keeps using it
        await http.post(gw.mcp_url(), json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                        headers={**hdr, "authorization": f"Bearer {alice}", "mcp-session-id": sid})
        r3 = await http.post(gw.mcp_url(), json=call,
                             headers={**hdr, "authorization": f"Bearer {alice}", "mcp-session-id": sid})
        assert r3.status_code == 200 and "tools" in r3.json()["result"]
