"""Recorder addon: what is recorded (as the caller saw it), redaction, refusals, SSE,
fail closed on an unavailable store, CLI (sql / sessions / replay / export)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from mitmproxy import io as mio
from mitmproxy.test import taddons, tflow, tutils

from addons.core import mcpwire

from addons.core.record import Decision, Identity, MaskEvent, get_record
from addons.cli import recordings as cli_rec
from addons.cli.recordings import build_flows, format_timeline
from addons.hooks.recorder import Recorder, StreamTap, redact_headers, redact_path
from addons.core.audit.store import Store

SECRET = "eyJhbGciOiJSUzI1NiJ9.PLANTED-SECRET-TOKEN.c2lnbmF0dXJl"
SERVICE_SECRET = "svc-PLANTED-SERVICE-CREDENTIAL-42"


@pytest.fixture
def rec_ctx(tmp_path):
    r = Recorder()
    with taddons.context(r) as tctx:
        tctx.configure(r, bastion_recordings=str(tmp_path / "rec"), bastion_instance="gw-test")
        yield r, tctx, tmp_path / "rec"
        r.done()


def mcp_flow(body: dict | list, *, session: str | None = "sess-1", sub: str = "alice",
             resp: dict | list | None = None, status: int = 200, headers: dict | None = None):
    hdrs = {"content-type": "application/json", "authorization": f"Bearer {SECRET}",
            "cookie": f"sid={SECRET}", "x-api-key": SECRET, "user-agent": "test-agent"}
    if session:
        hdrs["mcp-session-id"] = session
    hdrs.update(headers or {})
    raw = json.dumps(body).encode()
    req = tutils.treq(method=b"POST", path=b"/mcp/demo", content=raw,
                      headers=tuple((k.encode(), v.encode()) for k, v in hdrs.items()))
    req.timestamp_start = req.timestamp_end = time.time()
    f = tflow.tflow(req=req)
    rec = get_record(f.metadata)
    rec.connection = "demo"
    rec.identity = Identity(sub=sub, roles=("analyst",), client_id="cli-app", issuer="https://idp")
    parsed = mcpwire.parse_body(raw)
    rec.messages, rec.batch = parsed.messages, parsed.batch
    rec.protocol_version = "2025-11-25"
    if resp is not None:
        f.response = tresp(status_code=status, content=json.dumps(resp).encode(),
                                  headers=((b"content-type", b"application/json"),))
    return f, rec


def tresp(**kw):
    r = tutils.tresp(**kw)
    r.timestamp_start = r.timestamp_end = time.time()
    return r


def call(i, tool="query_db", args=None):
    return {"jsonrpc": "2.0", "id": i, "method": "tools/call",
            "params": {"name": tool, "arguments": args if args is not None else {"sql": "select 1"}}}


async def run(r, f, rec, resp=None, requested=False):
    """request hook (unless already run), then (like the pipeline) response messages + response hook."""
    if not requested:
        await r.request(f)
    if resp is not None and f.response is None:
        f.response = tresp(status_code=200, content=json.dumps(resp).encode(),
                                  headers=((b"content-type", b"application/json"),))
        objs = resp if isinstance(resp, list) else [resp]
        rec.response_messages.extend(objs)
    r.responseheaders(f)
    await r.response(f)


def q(root, sql, params=None):
    s = Store(root)
    try:
        cur = s.query(sql, params)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row)) for row in cur.fetchall()]
    finally:
        s.close()


async def test_tool_call_recorded_with_identity_decision_and_masked_result(rec_ctx):
    r, tctx, root = rec_ctx
    f, rec = mcp_flow(call(7, args={"customer": 42}))
    rec.decisions.append(Decision("allow", rule="analysts-read", mask_profile="pii", message_id=7))
    rec.masks.append(MaskEvent("$.result.content[0].text", "email", 2))
    masked = {"jsonrpc": "2.0", "id": 7, "result": {"content": [{"type": "text", "text": "mail [email]"}]}}
    await run(r, f, rec, resp=masked)
    msgs = q(root, "SELECT * FROM messages ORDER BY seq")
    assert [(m["direction"], m["kind"]) for m in msgs] == [("c2s", "request"), ("s2c", "response")]
    req, res = msgs
    assert req["tool"] == "query_db" and json.loads(req["arguments"]) == {"customer": 42}
    assert req["sub"] == "alice" and req["roles"] == ["analyst"] and req["client_id"] == "cli-app"
    assert req["session_id"] == "sess-1" and req["rpc_id"] == "7"
    assert res["tool"] == "query_db" and json.loads(res["result"])["content"][0]["text"] == "mail [email]"
    assert res["latency_ms"] is not None
    d = q(root, "SELECT * FROM decisions")
    assert d[0]["action"] == "allow" and d[0]["rule"] == "analysts-read" and d[0]["tool"] == "query_db"
    m = q(root, "SELECT * FROM masks")
    assert (m[0]["path"], m[0]["type"], m[0]["count"], m[0]["tool"]) == ("$.result.content[0].text", "email", 2, "query_db")
    x = q(root, "SELECT * FROM exchanges")[0]
    assert x["status"] == 200 and x["request_bytes"] > 0 and x["response_bytes"] > 0
    assert json.loads(x["req_headers"])["authorization"] == "[redacted]"
    assert json.loads(x["req_headers"])["user-agent"] == "test-agent"


async def test_request_is_durable_before_it_is_forwarded(rec_ctx, monkeypatch):
    """bastion_audit_before_forward with bastion_audit_sync=fsync: write-ahead audit, one
    fsync wait per request."""
    r, tctx, root = rec_ctx
    tctx.configure(r, bastion_audit_before_forward=True, bastion_audit_sync="fsync")
    fsyncs = r.writer.stats.fsyncs
    f, rec = mcp_flow(call(1))
    await r.request(f)
    assert r.writer.stats.fsyncs > fsyncs             # the hook returned after an fsync
    assert f.response is None                          # forwarded
    rows = q(root, "SELECT kind FROM events")          # already on disk, before any response
    assert rows == [{"kind": "request"}]


async def test_by_default_requests_are_not_held_for_fsync(rec_ctx, monkeypatch):
    """The response waits for the fsync that covers the request too (one ordered journal)."""
    r, tctx, root = rec_ctx
    monkeypatch.setattr(r.writer, "commit", lambda lines: pytest.fail("request waited for fsync"))
    f, rec = mcp_flow(call(1))
    await r.request(f)
    assert f.response is None
    monkeypatch.undo()
    await run(r, f, rec, {"jsonrpc": "2.0", "id": 1, "result": {"content": []}}, requested=True)
    kinds = [row["kind"] for row in q(root, "SELECT kind FROM events ORDER BY seq")]
    assert kinds.count("request") == 1 and kinds[0] == "request" and "response" in kinds


async def test_denied_call_records_decision_refusal_and_error_the_caller_saw(rec_ctx):
    r, tctx, root = rec_ctx
    f, rec = mcp_flow(call(3, tool="drop_table"))
    rec.decisions.append(Decision("deny", rule="no-ddl", reason="DDL is not allowed", message_id=3))
    err = mcpwire.jsonrpc_error(3, -32001, "denied by rule no-ddl: DDL is not allowed")
    f.response = tresp(status_code=200, content=json.dumps(err).encode(),
                              headers=((b"content-type", b"application/json"),))
    rec.refuse("DDL is not allowed", "no-ddl")
    await run(r, f, rec)
    refusals = q(root, "SELECT * FROM refusals")
    assert refusals[0]["rule"] == "no-ddl" and refusals[0]["reason"] == "DDL is not allowed"
    assert refusals[0]["status"] == 200 and refusals[0]["tool"] == "drop_table"
    errs = q(root, "SELECT * FROM messages WHERE kind = 'error'")
    assert errs[0]["error_code"] == -32001 and errs[0]["via"] == "gateway"
    assert q(root, "SELECT action FROM decisions") == [{"action": "deny"}]


async def test_http_refusal_without_connection_is_recorded(rec_ctx):
    r, tctx, root = rec_ctx
    f = tflow.tflow(req=tutils.treq(method=b"POST", path=b"/mcp/nope?access_token=" + SECRET.encode()))
    rec = get_record(f.metadata)
    from addons.hooks.httputil import refuse_http
    refuse_http(f, 404, "unknown_connection", "no connection with that name")
    await run(r, f, rec)
    rows = q(root, "SELECT * FROM refusals")
    assert rows[0]["status"] == 404 and "unknown_connection" in rows[0]["reason"]
    assert SECRET not in rows[0]["path"] and "access_token=[redacted]" in rows[0]["path"]


async def test_non_mcp_flows_are_not_recorded(rec_ctx):
    r, tctx, root = rec_ctx
    f = tflow.tflow(resp=True)
    await r.request(f)
    await r.response(f)
    assert q(root, "SELECT count(*) AS n FROM events") == [{"n": 0}]


async def test_approval_outcome_recorded(rec_ctx):
    r, tctx, root = rec_ctx
    f, rec = mcp_flow(call(5, tool="send_money"))
    rec.decisions.append(Decision("approve", rule="payments", approvers=("finance",), message_id=5))
    rec.approval = {"outcome": "approved", "approver": "bob", "waited": 3.5, "rule": "payments"}
    await run(r, f, rec, resp={"jsonrpc": "2.0", "id": 5, "result": {"content": []}})
    a = q(root, "SELECT * FROM approvals")[0]
    assert (a["outcome"], a["approver"], a["tool"], a["latency_ms"]) == ("approved", "bob", "send_money", 3500.0)


async def test_initialize_is_recorded_under_the_session_id_the_server_assigns(rec_ctx):
    r, tctx, root = rec_ctx
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    f, rec = mcp_flow(init, session=None)
    await r.request(f)
    f.response = tresp(status_code=200, content=b'{"jsonrpc":"2.0","id":0,"result":{}}',
                              headers=((b"content-type", b"application/json"), (b"mcp-session-id", b"srv-abc")))
    await r.response(f)
    assert {r_["session_id"] for r_ in q(root, "SELECT session_id FROM events")} == {"srv-abc"}


async def test_stateless_calls_get_a_synthetic_session(rec_ctx):
    r, tctx, root = rec_ctx
    f1, rec1 = mcp_flow(call(1), session=None)
    f2, rec2 = mcp_flow(call(2), session=None)
    f2.client_conn = f1.client_conn
    for f, rec in ((f1, rec1), (f2, rec2)):
        await run(r, f, rec, resp={"jsonrpc": "2.0", "id": 1, "result": {}})
    s = q(root, "SELECT * FROM sessions")
    assert len(s) == 1 and s[0]["synthetic"] and s[0]["session_id"].startswith("~alice@demo/")
    assert s[0]["tool_calls"] == 2


async def test_secrets_appear_in_no_file_of_the_store(rec_ctx, tmp_path):
    r, tctx, root = rec_ctx
    f, rec = mcp_flow(call(1), headers={"x-service-auth": SERVICE_SECRET, "proxy-authorization": f"Basic {SECRET}"})
    rec.injected_header = "X-Service-Auth"
    await r.request(f)
    f.response = tresp(status_code=200, content=b'{"jsonrpc":"2.0","id":1,"result":{}}',
                              headers=((b"content-type", b"application/json"), (b"set-cookie", f"s={SECRET}".encode())))
    await r.response(f)
    # a refused one too, and then roll everything to Parquet
    f2, rec2 = mcp_flow(call(2))
    rec2.refuse("nope", "r")
    f2.response = tresp(status_code=403, content=b'{"error":"forbidden"}')
    await run(r, f2, rec2)
    r.done()
    files = [p for p in root.rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in files)
    for p in files:
        data = p.read_bytes()
        assert SECRET.encode() not in data and SERVICE_SECRET.encode() not in data, p
        assert b"PLANTED" not in data, p
    assert q(root, "SELECT count(*) AS n FROM events WHERE kind = 'request'") == [{"n": 2}]


def test_redact_headers_and_path():
    h = redact_headers([(b"Authorization", b"Bearer x"), (b"X-Custom-Token", b"abc"), (b"Accept", b"*/*"),
                        (b"X-Upstream-Key", b"k")], extra={"X-Upstream-Key"})
    assert h == {"authorization": "[redacted]", "x-custom-token": "[redacted]", "accept": "*/*",
                 "x-upstream-key": "[redacted]"}
    assert redact_path("/mcp/a?x=1&api_key=s3cr3t") == "/mcp/a?x=1&api_key=[redacted]"
    assert redact_path("/mcp/a") == "/mcp/a"


async def test_record_bodies_off_keeps_metadata_only(tmp_path):
    r = Recorder()
    with taddons.context(r) as tctx:
        tctx.configure(r, bastion_recordings=str(tmp_path), bastion_instance="gw", bastion_record_bodies=False)
        f, rec = mcp_flow(call(1, args={"ssn": "123-45-6789"}))
        await run(r, f, rec, resp={"jsonrpc": "2.0", "id": 1, "result": {"content": [{"text": "555-0100"}]}})
        r.done()
    rows = q(tmp_path, "SELECT tool, params, result FROM messages ORDER BY seq")
    assert rows[0]["tool"] == "query_db" and rows[0]["params"] is None and rows[1]["result"] is None
    for p in tmp_path.rglob("*.parquet"):
        assert b"123-45-6789" not in p.read_bytes() and b"555-0100" not in p.read_bytes()


# --- SSE ---------------------------------------------------------------------------

def sse(*objs) -> bytes:
    return b"".join(b"event: message\ndata: " + json.dumps(o).encode() + b"\n\n" for o in objs)


async def test_sse_events_recorded_per_event_as_the_caller_saw_them(rec_ctx):
    r, tctx, root = rec_ctx
    f, rec = mcp_flow(call(9))
    await r.request(f)
    f.response = tresp(status_code=200, content=b"",
                              headers=((b"content-type", b"text/event-stream"),))

    def masking_stream(data: bytes) -> bytes:     # stands in for the responses addon
        return data.replace(b"alice@example.com", b"[email]")
    f.response.stream = masking_stream
    r.responseheaders(f)
    tap = f.response.stream
    assert isinstance(tap, StreamTap)
    progress = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}}
    final = {"jsonrpc": "2.0", "id": 9, "result": {"content": [{"type": "text", "text": "alice@example.com"}]}}
    wire = sse(progress, final)
    chunks = tap(wire[:30]) + tap(wire[30:]) + tap(b"")
    assert all(chunks)                     # never an empty chunk (the end of a chunked body)
    out = b"".join(chunks)
    assert b"[email]" in out and b"alice@example.com" not in out
    # the final response was durable before the tap returned its bytes
    rows = q(root, "SELECT kind, via, result FROM messages WHERE direction = 's2c' ORDER BY seq")
    assert [(x["kind"], x["via"]) for x in rows] == [("notification", "sse"), ("response", "sse")]
    assert "[email]" in rows[1]["result"] and "alice@example.com" not in rows[1]["result"]
    await r.response(f)
    x = q(root, "SELECT * FROM exchanges")[0]
    assert x["response_bytes"] == len(out)
    assert q(root, "SELECT count(*) AS n FROM messages WHERE direction='s2c'") == [{"n": 2}]


# --- fail closed -----------------------------------------------------------------------

async def test_unwritable_store_refuses_with_503_and_recovers(tmp_path):
    root = tmp_path / "rec"
    root.write_text("not a directory")
    r = Recorder()
    with taddons.context(r) as tctx:
        tctx.configure(r, bastion_recordings=str(root), bastion_instance="gw")
        r.writer.probe_interval = 0.05
        f, rec = mcp_flow(call(1))
        await r.request(f)
        assert f.response is not None and f.response.status_code == 503
        assert json.loads(f.response.content)["error"] == "audit_unavailable"
        assert rec.refusal == "audit store unavailable"
        root.unlink()
        root.mkdir()
        deadline = time.time() + 5
        while not r.writer.healthy and time.time() < deadline:
            r.writer.submit([], wait=False)
            time.sleep(0.05)
        f2, rec2 = mcp_flow(call(2))
        await run(r, f2, rec2, resp={"jsonrpc": "2.0", "id": 2, "result": {}})
        assert f2.response.status_code == 200
        r.done()
    assert q(root, "SELECT count(*) AS n FROM messages") == [{"n": 2}]


async def test_response_is_replaced_when_it_cannot_be_recorded(rec_ctx, monkeypatch):
    r, tctx, root = rec_ctx
    f, rec = mcp_flow(call(1))
    await r.request(f)
    f.response = tresp(status_code=200, content=b'{"jsonrpc":"2.0","id":1,"result":{"x":"secret data"}}',
                              headers=((b"content-type", b"application/json"),))
    r.writer.close()                       # store gone between request and response
    await r.response(f)
    assert f.response.status_code == 503
    assert b"secret data" not in f.response.content


async def test_sse_stream_is_cut_when_final_response_cannot_be_recorded(rec_ctx):
    r, tctx, root = rec_ctx
    f, rec = mcp_flow(call(1))
    await r.request(f)
    f.response = tresp(status_code=200, content=b"", headers=((b"content-type", b"text/event-stream"),))
    f.response.stream = True
    r.responseheaders(f)
    r.writer.close()
    out = b"".join(f.response.stream(sse({"jsonrpc": "2.0", "id": 1, "result": {"x": "unaudited"}})))
    assert b"unaudited" not in out and b"could not record" in out
    assert f.response.stream(b"more") == []


async def test_error_hook_records_transport_errors(rec_ctx):
    r, tctx, root = rec_ctx
    f, rec = mcp_flow(call(4))
    await r.request(f)
    from mitmproxy.flow import Error
    f.error = Error("upstream connection refused")
    r.error(f)
    r.done()
    x = q(root, "SELECT * FROM exchanges")[0]
    assert x["note"] == "upstream connection refused" and x["status"] is None


async def test_configure_validation(tmp_path):
    from mitmproxy.exceptions import OptionsError
    r = Recorder()
    with taddons.context(r) as tctx:
        with pytest.raises(OptionsError):
            tctx.configure(r, bastion_recordings=str(tmp_path), bastion_retention_days=-1)
        with pytest.raises(OptionsError):
            tctx.configure(r, bastion_recordings=str(tmp_path), bastion_instance="../x")
        r.done()


# --- replay / export / CLI -----------------------------------------------------------------

async def _scripted_session(r, root):
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    f, rec = mcp_flow(init, session=None)
    rec.decisions.append(Decision("allow", rule="everyone-init", message_id=0))
    await r.request(f)
    f.response = tresp(status_code=200, content=b'{"jsonrpc":"2.0","id":0,"result":{"protocolVersion":"2025-11-25"}}',
                              headers=((b"content-type", b"application/json"), (b"mcp-session-id", b"sess-replay")))
    await r.response(f)
    f, rec = mcp_flow(call(1, "lookup_customer", {"id": 42}), session="sess-replay")
    rec.decisions.append(Decision("allow", rule="support-read", mask_profile="pii", message_id=1))
    rec.masks.append(MaskEvent("$..email", "email", 1))
    await run(r, f, rec, resp={"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": "[email]"}]}})
    f, rec = mcp_flow(call(2, "drop_table", {"t": "users"}), session="sess-replay")
    rec.decisions.append(Decision("deny", rule="no-ddl", reason="DDL is not allowed", message_id=2))
    rec.refuse("DDL is not allowed", "no-ddl")
    f.response = tresp(status_code=200, content=json.dumps(mcpwire.jsonrpc_error(2, -32001, "denied: no-ddl")).encode(),
                              headers=((b"content-type", b"application/json"),))
    await run(r, f, rec)


async def test_replay_timeline(rec_ctx):
    r, tctx, root = rec_ctx
    await _scripted_session(r, root)
    s = Store(root)
    text = format_timeline(cli_rec.session_events(s, "sess-replay"))
    s.close()
    assert "session    sess-replay" in text
    assert "identity   alice  roles=analyst  client=cli-app" in text
    assert "→ request      initialize id=0" in text
    assert 'tools/call lookup_customer id=1  args {"id":42}' in text
    assert "decision     ALLOW tools/call lookup_customer  rule=support-read" in text
    assert "[email]" in text and "masked       email ×1 at $..email" in text
    assert "DENY tools/call drop_table  rule=no-ddl  reason: DDL is not allowed" in text
    assert "✗ refused      200 DDL is not allowed  rule=no-ddl" in text
    assert "← error        tools/call drop_table id=2" in text


async def test_cli_sessions_replay_export_and_sql(rec_ctx, tmp_path, capsys):
    r, tctx, root = rec_ctx
    await _scripted_session(r, root)
    from addons.cli import main
    assert main(["sessions", "--store", str(root)]) == 0
    out = capsys.readouterr().out
    assert "sess-replay" in out and "alice" in out
    assert main(["replay", "sess-rep", "--store", str(root)]) == 0      # unique prefix
    assert "drop_table" in capsys.readouterr().out
    assert main(["replay", "nope", "--store", str(root)]) == 1
    capsys.readouterr()
    out_file = tmp_path / "s.mitm"
    assert main(["export", "sess-replay", "-o", str(out_file), "--store", str(root)]) == 0
    with open(out_file, "rb") as fh:
        flows = list(mio.FlowReader(fh).stream())
    assert len(flows) == 3
    init, ok, denied = flows
    assert json.loads(init.request.content)["method"] == "initialize"
    assert init.request.headers["authorization"] == "[redacted]"
    assert json.loads(ok.response.content)["result"]["content"][0]["text"] == "[email]"
    assert "identity alice" in ok.comment and "masked email" in ok.comment
    assert denied.marked and "refused: DDL is not allowed" in denied.comment
    assert SECRET.encode() not in out_file.read_bytes()
    capsys.readouterr()
    assert main(["sql", "SELECT tool, action FROM decisions ORDER BY seq", "--format", "csv", "--store", str(root)]) == 0
    assert capsys.readouterr().out.splitlines() == ["tool,action", ",allow", "lookup_customer,allow", "drop_table,deny"]
    assert main(["sql", "SELECT count(*) AS n FROM sessions", "--format", "json", "--store", str(root)]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": 1}]
    assert main(["sql", "SELECT count(*) AS n FROM messages", "--store", str(root)]) == 0
    assert "(1 row)" in capsys.readouterr().out
    assert main(["sql", "SELEC nonsense", "--store", str(root)]) == 1
    assert "error" in capsys.readouterr().err


def test_sql_reports_corrupt_segment_by_name(tmp_path, capsys):
    from addons.cli import main
    from addons.core.audit.store import StoreWriter, encode_event
    for inst in ("a", "b"):
        w = StoreWriter(tmp_path, inst).start()
        w.submit([encode_event({"ts": 1.0, "instance": inst, "seq": 1, "kind": "request"})], wait=True).result(5)
        w.close()
    bad = next((tmp_path / "a").glob("seg-*.parquet"))
    bad.write_bytes(b"garbage")
    assert main(["sql", "SELECT instance FROM events", "--format", "csv", "--store", str(tmp_path)]) == 0
    cap = capsys.readouterr()
    assert cap.out.splitlines() == ["instance", "b"]
    assert str(bad) in cap.err and "corrupt segment" in cap.err


def test_build_flows_from_events_roundtrip(tmp_path):
    events = [
        {"ts": 1.0, "instance": "i", "seq": 1, "flow_id": "f1", "kind": "request", "direction": "c2s",
         "rpc_id": "abc", "method": "tools/list", "params": {}, "session_id": "s", "client_addr": "127.0.0.1:5000"},
        {"ts": 1.1, "instance": "i", "seq": 2, "flow_id": "f1", "kind": "response", "direction": "s2c", "via": "sse",
         "rpc_id": "abc", "result": {"tools": []}, "session_id": "s"},
        {"ts": 1.2, "instance": "i", "seq": 3, "flow_id": "f1", "kind": "http", "direction": "gateway",
         "http_method": "POST", "path": "/mcp/demo", "status": 200, "req_headers": {"authorization": "[redacted]"},
         "resp_headers": {"content-type": "text/event-stream"}, "session_id": "s"},
    ]
    flows = build_flows(events)
    p = tmp_path / "x.mitm"
    with open(p, "wb") as fh:
        w = mio.FlowWriter(fh)
        for f in flows:
            w.add(f)
    with open(p, "rb") as fh:
        (f,) = list(mio.FlowReader(fh).stream())
    assert json.loads(f.request.content) == {"jsonrpc": "2.0", "id": "abc", "method": "tools/list", "params": {}}
    assert f.response.content.startswith(b"event: message\ndata: ")


# --- opt-in resend to a test connection ----------------------------------------------------

def _rules(tmp_path, test: bool) -> Path:
    d = tmp_path / "rules"
    d.mkdir(exist_ok=True)
    opts = "    options: {test: true}\n" if test else ""
    (d / "connections.yaml").write_text(
        "connections:\n  prod:\n    upstream: http://127.0.0.1:1/mcp\n"
        f"  sandbox:\n    upstream: http://127.0.0.1:2/mcp\n{opts}")
    return d


def test_resend_refuses_anything_but_a_test_connection(tmp_path, capsys):
    from addons.cli import main
    rules = _rules(tmp_path, test=True)
    assert cli_rec.test_connection_problem(str(rules), "sandbox") is None
    assert "not marked as a test connection" in cli_rec.test_connection_problem(str(rules), "prod")
    assert "no connection" in cli_rec.test_connection_problem(str(rules), "nope")
    assert main(["--rules", str(rules), "resend", "x", "--connection", "prod", "--store", str(tmp_path)]) == 2
    assert "refusing to resend" in capsys.readouterr().err
    rules = _rules(tmp_path, test=False)
    assert cli_rec.test_connection_problem(str(rules), "sandbox") is not None


async def test_resend_replays_requests_with_a_fresh_session(rec_ctx, tmp_path):
    import httpx
    r, tctx, root = rec_ctx
    await _scripted_session(r, root)
    s = Store(root)
    msgs = cli_rec.resend_messages(cli_rec.session_events(s, "sess-replay"))
    s.close()
    assert [m["method"] for m in msgs] == ["initialize", "tools/call", "tools/call"]
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append((body["method"], request.headers.get("mcp-session-id"), request.headers.get("authorization")))
        hdrs = {"mcp-session-id": "fresh"} if body["method"] == "initialize" else {}
        return httpx.Response(200, json={"jsonrpc": "2.0", "id": body["id"], "result": {"protocolVersion": "2025-11-25"}},
                              headers=hdrs)
    import io as _io
    out = _io.StringIO()
    assert cli_rec.resend(msgs, "http://gw/mcp/sandbox", "tok", transport=httpx.MockTransport(handler), out=out) == 0
    assert seen == [("initialize", None, "Bearer tok"), ("tools/call", "fresh", "Bearer tok"),
                    ("tools/call", "fresh", "Bearer tok")]
    assert "tools/call lookup_customer -> HTTP 200 ok" in out.getvalue()


async def test_initialize_answered_on_sse_carries_method_and_server_session(rec_ctx):
    r, tctx, root = rec_ctx
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    f, rec = mcp_flow(init, session=None)
    await r.request(f)
    f.response = tresp(status_code=200, content=b"", headers=((b"content-type", b"text/event-stream"),
                                                             (b"mcp-session-id", b"srv-sse")))
    f.response.stream = True
    r.responseheaders(f)
    f.response.stream(sse({"jsonrpc": "2.0", "id": 0, "result": {"protocolVersion": "2025-11-25"}}))
    f.response.stream(b"")
    await r.response(f)
    rows = q(root, "SELECT direction, method, session_id FROM messages ORDER BY time, seq")
    assert rows == [{"direction": "c2s", "method": "initialize", "session_id": "srv-sse"},
                    {"direction": "s2c", "method": "initialize", "session_id": "srv-sse"}]


@pytest.mark.parametrize("where", ["shared", "own", "shared-overridden", "none"])
def test_encode_lines_redacts_a_secret_wherever_it_sits(where):
    """encode_lines scans the fields every event of a flow shares once and each event's own
    fields after: a secret in either is redacted in every line; clean lines are unchanged."""
    from addons.core.audit.store import encode_event
    from addons.core.masking.secretscan import Secret, SecretIndex
    from addons.hooks.recorder import FlowEvents, encode_lines
    secret = "tok_live_9f8e7d6c5b4a39281706"
    idx = SecretIndex([Secret("service credential", secret)])
    base = {"instance": "gw", "sub": secret if where == "shared" else "alice", "roles": ["support"]}
    evs = [dict(base, kind="mask", seq=i, mask_path=f"$.x{i}") for i in range(5)]
    if where == "own":
        evs[3]["params"] = {"arguments": {"note": f"copy of {secret}"}}
    if where == "shared-overridden":
        evs[2]["sub"] = secret                       # same key as the base, another value
    flow = FlowEvents(base)
    for _ in range(2):                               # the second time the base is not scanned again
        lines = encode_lines(evs, [idx], flow)
        assert len(lines) == 5 and all(secret.encode() not in ln for ln in lines)
    if where == "none":
        assert lines == [encode_event(e) for e in evs]
    else:
        assert any(b"redacted:known-secret" in ln for ln in lines)
