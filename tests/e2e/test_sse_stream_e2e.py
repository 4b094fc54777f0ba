"""Issue 21: SSE responses through the gateway arrive whole, masked, and end only when the
upstream ends them: a raw upstream writing one byte per chunk (LF and CR-only endings),
and the demo server in SSE mode with multi-MB results (official SDK client)."""
from __future__ import annotations

import json
import time

import httpx
import pytest
from httpx2._sse import _SSEParser as ClientSSEParser

from tests.e2e import bad_upstream
from tests.e2e.bad_upstream import SECRET
from tests.e2e.conftest import ALLOW_ALL_POLICY

CALL = {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "get_customer", "arguments": {"id": 1}}}
HDRS = {"content-type": "application/json", "accept": "application/json, text/event-stream",
        "mcp-protocol-version": "2025-06-18"}


@pytest.fixture
def raw_upstream(tmp_path, procs, rules_dir, gateway):
    port = bad_upstream.start(tmp_path, procs)
    conns = {"connections": {name: {"upstream": f"http://127.0.0.1:{port}/{name}"} for name in ("sse-bytes", "sse-cr")}}
    # the raw upstream answers SSE, not tools/list: no argument schemas to learn from it
    gw = gateway(rules_dir(**{"policy.yaml": ALLOW_ALL_POLICY, "connections.yaml": json.dumps(conns)}),
                 extra_args=("--set", "bastion_validate_args=false"))
    return gw, gw.token("eve", ["e2e-all"])


@pytest.mark.parametrize("connection", ["sse-bytes", "sse-cr"])
def test_byte_by_byte_stream_every_event_delivered_masked_and_ended_by_the_upstream(raw_upstream, connection):
    gw, tok = raw_upstream
    parser, got, wire = ClientSSEParser(), [], b""
    t0 = time.monotonic()
    with httpx.Client(timeout=30) as c, c.stream("POST", gw.mcp_url(connection), content=json.dumps(CALL),
                                               headers={**HDRS, "authorization": f"Bearer {tok}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for chunk in r.iter_bytes():
            assert chunk, "an empty chunk reached the client"
            wire += chunk
            got += [(time.monotonic() - t0, e) for e in parser.decode(chunk.decode("utf-8"))]
    got += [(time.monotonic() - t0, e) for e in parser.flush()]
    assert SECRET not in wire.decode(), wire
    data = [(t, e) for t, e in got if e.data]
    assert len(data) == 2, wire
    note, result = json.loads(data[0][1].data), json.loads(data[1][1].data)
    assert note["params"]["data"] == "ssn [MASKED:ssn]"
    assert result["id"] == 5 and result["result"]["content"][0]["text"] == "ssn [MASKED:ssn]"
    # the secret-bearing id was dropped, the plain one kept; comments and unknown fields never left
    assert [e.id for _, e in data] == ["", "evt-2"]
    assert b"keep-alive" not in wire and b"x-extra" not in wire and b"retry: 500" in wire
    # the first event left as soon as it was complete, the last one after the upstream's pause:
    # the body was not ended in between
    assert data[1][0] - data[0][0] > 0.8, got
    assert "unsafe SSE response" not in gw.log_text()


@pytest.fixture
def big_sse(demo_server, rules_dir, gateway):
    demo = demo_server("sse", args=("--big-output", "3000000"))
    gw = gateway(rules_dir(demo, **{"policy.yaml": ALLOW_ALL_POLICY}))
    return demo, gw


async def test_demo_sse_mode_multi_megabyte_results_arrive_whole_and_masked(big_sse, mcp_client):
    demo, gw = big_sse
    async with mcp_client(gw.mcp_url(), gw.token("eve", ["e2e-all"])) as c:
        small = await c.call_tool("get_customer", {"id": 1})
        assert not small.is_error
        big = await c.call_tool("big_text", {})
        assert big.content[0].text == ("0123456789abcdef" * (3000000 // 16 + 1))[:3000000]
        records = await c.call_tool("big_records", {})
    text = records.content[0].text
    lines = text.splitlines()
    assert len(lines) > 80_000 and len(text) > 2_500_000
    assert SECRET not in text
    assert all(line == f"record {i:07d} ssn [MASKED:ssn] ok" for i, line in enumerate(lines))


def test_demo_sse_mode_large_result_raw_wire(big_sse):
    """Without the SDK: the SSE body of a multi-MB result is one complete, masked event."""
    demo, gw = big_sse
    tok = gw.token("eve", ["e2e-all"])
    h = {**HDRS, "authorization": f"Bearer {tok}"}
    with httpx.Client(timeout=60) as c:
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "e2e", "version": "1"}}}
        r = c.post(gw.mcp_url(), content=json.dumps(init), headers=h)
        assert r.status_code == 200, r.text
        sid = r.headers.get("mcp-session-id")
        h2 = {**h, **({"mcp-session-id": sid} if sid else {})}
        c.post(gw.mcp_url(), content=json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}), headers=h2)
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "big_records", "arguments": {}}}
        r = c.post(gw.mcp_url(), content=json.dumps(call), headers=h2)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert len(r.content) > 2_500_000, len(r.content)
    p = ClientSSEParser()
    evs = [e for e in [*p.decode(r.text), *p.flush()] if e.data]
    assert len(evs) == 1
    msg = json.loads(evs[0].data)
    assert msg["id"] == 2 and SECRET not in r.text and "[MASKED:ssn]" in msg["result"]["content"][0]["text"]
