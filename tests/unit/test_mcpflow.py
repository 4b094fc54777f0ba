"""addons/hooks/mcpflow.py McpParser: every client->server body is parsed before policy; what cannot
be parsed is refused with the right JSON-RPC error and HTTP status and never forwarded."""
from __future__ import annotations

import gzip
import json
import zlib

import brotli
import pytest
from mitmproxy import http
from mitmproxy.net import encoding
from mitmproxy.test import taddons, tflow, tutils

from addons.core import mcpwire
from addons.hooks.failclosed import FailClosed
from addons.hooks.mcpflow import McpParser, stream_key
from addons.core.record import Identity, get_record

META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {}}
CALL = {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
        "params": {"name": "query_sql", "arguments": {"sql": "select 1", "region": "eu"}}}


class Opts:
    """Stands in for the connections addon, which declares the shared options."""

    def load(self, loader):
        loader.add_option("bastion_rules", str, "rules", "")
        loader.add_option("bastion_max_body", int, 4 * 1024 * 1024, "")


@pytest.fixture
def parser(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)         # a default keyring (.secrets/session-keys) would land here
    p = McpParser()
    with taddons.context(Opts(), p) as tctx:
        tctx.configure(p, bastion_session_keys=str(tmp_path / "session-keys"))
        yield p, tctx


def mkflow(content: bytes | None = None, obj=CALL, method="POST", path="/mcp/demo",
           ctype="application/json", headers=(), conn="demo", sub="alice"):
    hdrs = [(b"host", b"gw")]
    if ctype is not None:
        hdrs.append((b"content-type", ctype.encode()))
    hdrs += [(k.encode(), v.encode()) for k, v in headers]
    body = content if content is not None else (json.dumps(obj).encode() if obj is not None else b"")
    f = tflow.tflow(req=tutils.treq(method=method.encode(), path=path.encode(), headers=http.Headers(hdrs),
                                    content=body))
    rec = get_record(f.metadata)
    rec.connection = conn
    rec.identity = Identity(sub=sub) if sub else None
    return f, rec


def rpc_error(f) -> dict:
    assert f.response.headers["content-type"] == "application/json"
    return json.loads(f.response.content)["error"]


def test_plain_post_parsed(parser):
    p, _ = parser
    f, rec = mkflow(headers=[("MCP-Protocol-Version", "2025-06-18")])
    p.request(f)
    assert f.response is None
    assert [m.method for m in rec.messages] == ["tools/call"] and not rec.batch
    assert rec.messages[0].tool_name == "query_sql" and rec.protocol_version == "2025-06-18"
    f, rec = mkflow(obj={"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": META}})
    p.request(f)
    assert rec.protocol_version == "2026-07-28"


@pytest.mark.parametrize("enc", ["gzip", "deflate", "br", "zstd"])
def test_compressed_bodies_decoded_and_forwarded_decoded(parser, enc):
    p, _ = parser
    plain = json.dumps(CALL).encode()
    f, rec = mkflow(content=encoding.encode(plain, enc), headers=[("content-encoding", enc)])
    assert f.request.raw_content != plain
    p.request(f)
    assert f.response is None and rec.messages[0].tool_name == "query_sql"
    # the upstream gets exactly the bytes that were inspected
    assert "content-encoding" not in f.request.headers
    assert f.request.raw_content == plain


def test_compressed_with_independent_codecs(parser):
    p, _ = parser
    plain = json.dumps(CALL).encode()
    for enc, data in (("gzip", gzip.compress(plain)), ("deflate", zlib.compress(plain)), ("br", brotli.compress(plain))):
        f, rec = mkflow(content=data, headers=[("content-encoding", enc)])
        p.request(f)
        assert f.response is None and f.request.raw_content == plain, enc


def test_compressed_attack_is_parsed_after_decoding(parser):
    # the decoded body is what gets checked: a bad method hidden in gzip is still refused
    p, _ = parser
    bad = json.dumps({**CALL, "method": "Tools/call"}).encode()
    f, rec = mkflow(content=gzip.compress(bad), headers=[("content-encoding", "gzip")])
    p.request(f)
    assert f.response.status_code == 404 and rpc_error(f)["code"] == mcpwire.METHOD_NOT_FOUND


@pytest.mark.parametrize("enc,data", [
    ("gzip", b"not gzip at all"), ("br", b"\x00\x01garbage"), ("zstd", b"nope"), ("deflate", b"\xff\xff"),
    ("compress", b"x"), ("x-custom", b"{}"), ("gzip, gzip", gzip.compress(gzip.compress(b"{}"))),
])
def test_undecodable_encoding_refused(parser, enc, data):
    p, _ = parser
    f, rec = mkflow(content=data, headers=[("content-encoding", enc)])
    p.request(f)
    assert f.response.status_code == 400 and rpc_error(f)["code"] == mcpwire.PARSE_ERROR
    assert rec.refusal and not rec.messages


@pytest.mark.parametrize("ctype", [None, "", "text/plain", "application/x-www-form-urlencoded", "text/json",
                                   "application/jsonx", "application/json-seq", "multipart/form-data",
                                   "text/event-stream"])
def test_wrong_or_missing_content_type_415(parser, ctype):
    p, _ = parser
    f, rec = mkflow(ctype=ctype)
    p.request(f)
    assert f.response.status_code == 415 and json.loads(f.response.content)["error"] == "unsupported_media_type"
    assert not rec.messages


@pytest.mark.parametrize("ctype", ["application/json", "Application/JSON", "application/json; charset=utf-8",
                                   " application/json ;charset=UTF-8"])
def test_json_content_type_variants_accepted(parser, ctype):
    p, _ = parser
    f, _ = mkflow(ctype=ctype)
    p.request(f)
    assert f.response is None


def test_oversized_body_413_also_after_decoding(parser):
    p, tctx = parser
    tctx.options.bastion_max_body = 1000
    f, rec = mkflow(content=b'{"a":"' + b"x" * 2000 + b'"}')
    p.request(f)
    assert f.response.status_code == 413 and not rec.messages
    bomb = gzip.compress(json.dumps({**CALL, "pad": "x" * 5000}).encode())
    assert len(bomb) < 1000
    f, rec = mkflow(content=bomb, headers=[("content-encoding", "gzip")])
    p.request(f)
    assert f.response.status_code == 413
    f, rec = mkflow()
    p.request(f)
    assert f.response is None
    # the limit is kept from configure: lowering it applies to the next request
    tctx.options.bastion_max_body = 10
    f, rec = mkflow()
    p.request(f)
    assert f.response.status_code == 413 and b"exceeds 10 bytes" in f.response.content


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_get_or_delete_with_body_refused(parser, method):
    p, _ = parser
    f, rec = mkflow(method=method, content=b'{"jsonrpc":"2.0","id":1,"method":"tools/call"}')
    p.request(f)
    assert f.response.status_code == 400 and not rec.stream_checked


def test_get_without_body_is_a_checked_stream(parser):
    p, _ = parser
    env = bind(p, "s1", "alice")
    f, rec = mkflow(method="GET", content=b"", ctype=None, headers=[("mcp-session-id", env)])
    p.request(f)
    assert f.response is None and rec.stream_checked and rec.session_id == "s1"
    assert f.request.headers["mcp-session-id"] == "s1" and rec.session_envelope == env
    assert callable(rec.pending_lookup) and callable(rec.bind_session)


@pytest.mark.parametrize("content,code,status", [
    (b"{not json", mcpwire.PARSE_ERROR, 400),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","method":"ping"}', mcpwire.PARSE_ERROR, 400),
    (b'\xef\xbb\xbf{"jsonrpc":"2.0","id":1,"method":"ping"}', mcpwire.PARSE_ERROR, 400),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","x":"\xff"}', mcpwire.PARSE_ERROR, 400),
    (b'{"hello":"world"}', mcpwire.INVALID_REQUEST, 400),
    (b"[]", mcpwire.INVALID_REQUEST, 400),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call ","params":{"name":"x"}}', mcpwire.METHOD_NOT_FOUND, 404),
    (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":"{}"}}',
     mcpwire.INVALID_PARAMS, 400),
])
def test_bad_bodies_refused_with_jsonrpc_errors(parser, content, code, status):
    p, _ = parser
    f, rec = mkflow(content=content)
    p.request(f)
    assert f.response.status_code == status and rpc_error(f)["code"] == code
    assert rec.refusal and not rec.messages


def test_error_echoes_request_id(parser):
    p, _ = parser
    f, _ = mkflow(obj={**CALL, "id": "req-9", "method": "Tools/call"})
    p.request(f)
    assert json.loads(f.response.content)["id"] == "req-9"


def test_batch_parsed(parser):
    p, _ = parser
    f, rec = mkflow(obj=[{"jsonrpc": "2.0", "id": 1, "method": "ping"}, CALL])
    p.request(f)
    assert f.response is None and rec.batch and len(rec.messages) == 2


def modern(obj=CALL):
    o = json.loads(json.dumps(obj))
    o["params"]["_meta"] = META
    return o


def routing(obj, **extra):
    h = [("MCP-Protocol-Version", "2026-07-28"), ("Mcp-Method", obj["method"])]
    if obj["method"] == "tools/call":
        h.append(("Mcp-Name", obj["params"]["name"]))
    return h + list(extra.items())


def test_routing_headers_checked(parser):
    p, _ = parser
    obj = modern()
    f, rec = mkflow(obj=obj, headers=routing(obj))
    p.request(f)
    assert f.response is None
    f, rec = mkflow(obj=obj, headers=[("MCP-Protocol-Version", "2026-07-28"), ("Mcp-Method", "tools/call"),
                                      ("Mcp-Name", "read_file")])
    p.request(f)
    assert f.response.status_code == 400 and rpc_error(f)["code"] == mcpwire.HEADER_MISMATCH
    f, rec = mkflow(obj=obj, headers=routing(obj) + [("mcp-method", "tools/call")])
    p.request(f)
    assert f.response.status_code == 400 and rpc_error(f)["code"] == mcpwire.HEADER_MISMATCH


TOOLS_LIST_RESULT = {"jsonrpc": "2.0", "id": 1, "result": {"tools": [
    {"name": "query_sql", "inputSchema": {"type": "object", "properties": {
        "sql": {"type": "string"}, "region": {"type": "string", "x-mcp-header": "Region"}}}},
    {"name": "no_headers", "inputSchema": {"type": "object"}},
    "junk", {"name": 5},
]}}


def learn_from_tools_list(p):
    f, rec = mkflow(obj={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    p.request(f)
    assert f.response is None and rec.response_transforms
    msg = TOOLS_LIST_RESULT
    for t in rec.response_transforms:
        assert getattr(t, "readonly", False)        # learning never changes the response
        msg = t(msg)
    assert msg is TOOLS_LIST_RESULT


def test_param_headers_refused_before_schema_is_known_then_checked(parser):
    p, _ = parser
    obj = modern()
    f, _ = mkflow(obj=obj, headers=routing(obj) + [("Mcp-Param-Region", "eu")])
    p.request(f)
    assert f.response.status_code == 400 and rpc_error(f)["code"] == mcpwire.HEADER_MISMATCH
    learn_from_tools_list(p)
    assert p.param_maps[("demo", "query_sql")] == {"mcp-param-region": ("region",)}
    f, _ = mkflow(obj=obj, headers=routing(obj) + [("Mcp-Param-Region", "eu")])
    p.request(f)
    assert f.response is None
    f, _ = mkflow(obj=obj, headers=routing(obj) + [("Mcp-Param-Region", "us")])
    p.request(f)
    assert f.response.status_code == 400 and rpc_error(f)["code"] == mcpwire.HEADER_MISMATCH
    f, _ = mkflow(obj=obj, headers=routing(obj) + [("Mcp-Param-Sql", "select 1")])
    p.request(f)
    assert f.response.status_code == 400
    # the schema was learnt for this connection only
    f, _ = mkflow(obj=obj, headers=routing(obj) + [("Mcp-Param-Region", "eu")], conn="other")
    p.request(f)
    assert f.response.status_code == 400


def test_skips_refused_and_unrouted_flows(parser):
    p, _ = parser
    f, rec = mkflow(content=b"garbage")
    f.response = tutils.tresp()
    p.request(f)
    assert not rec.messages and rec.refusal is None
    f, rec = mkflow(content=b"garbage", conn=None)
    p.request(f)
    assert f.response is None


# --- sessions belong to the identity that opened them ---------------------------------------

def bind(p, sid="s1", sub="alice", conn="demo") -> str:
    """An initialize whose upstream answer names session `sid`: the sealed id the client gets."""
    f, rec = mkflow(obj={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}, sub=sub, conn=conn)
    p.request(f)
    f.response = tutils.tresp(headers=http.Headers([(b"mcp-session-id", sid.encode())]))
    p.responseheaders(f)
    p.response(f)
    env = f.response.headers["mcp-session-id"]
    assert env != sid and (len(sid) < 3 or sid not in env)
    return env


def test_session_owner_enforced(parser):
    p, _ = parser
    env = bind(p, "s1", "alice")
    f, _ = mkflow(headers=[("mcp-session-id", env)], sub="alice")
    p.request(f)
    assert f.response is None and f.request.headers["mcp-session-id"] == "s1"
    f, rec = mkflow(headers=[("mcp-session-id", env)], sub="mallory")
    p.request(f)
    assert f.response.status_code == 404 and not rec.messages
    assert f.request.headers["mcp-session-id"] == env          # nothing of the session opened
    f, rec = mkflow(method="GET", content=b"", headers=[("mcp-session-id", env)], sub="mallory")
    p.request(f)
    assert f.response.status_code == 404
    f, rec = mkflow(headers=[("mcp-session-id", env)], sub=None)
    p.request(f)
    assert f.response.status_code == 404


def test_raw_upstream_id_and_other_connection_refused(parser):
    """The upstream's own id is not a session id at the gateway, and an envelope opens
    only on the connection it was issued for."""
    p, _ = parser
    env = bind(p, "s1", "alice")
    for headers, conn in (([("mcp-session-id", "s1")], "demo"), ([("mcp-session-id", env)], "other")):
        f, rec = mkflow(headers=headers, sub="alice", conn=conn)
        p.request(f)
        assert f.response.status_code == 404 and json.loads(f.response.content)["error"] == "unknown_session"


def test_expired_envelope_refused(parser):
    import time
    p, tctx = parser
    tctx.configure(p, bastion_session_ttl=60)
    env = bind(p, "s1", "alice")
    f, _ = mkflow(headers=[("mcp-session-id", env)])
    p.request(f)
    assert f.response is None
    p.sealer.clock = lambda: time.time() + 61
    f, _ = mkflow(headers=[("mcp-session-id", env)])
    p.request(f)
    assert f.response.status_code == 404


def test_server_echo_gets_the_clients_envelope_and_stray_ids_are_dropped(parser):
    p, _ = parser
    env = bind(p, "s1", "alice")
    f, _ = mkflow(headers=[("mcp-session-id", env)])
    p.request(f)
    f.response = tutils.tresp(headers=http.Headers([(b"mcp-session-id", b"s1")]))
    p.responseheaders(f)
    assert f.response.headers["mcp-session-id"] == env
    # an upstream naming a session outside an initialize: the raw id never reaches the client
    for sid in ("s2", "s1"):
        f, _ = mkflow(sub="alice")
        p.request(f)
        f.response = tutils.tresp(headers=http.Headers([(b"mcp-session-id", sid.encode())]))
        p.responseheaders(f)
        assert "mcp-session-id" not in f.response.headers
    # nor an id the gateway cannot seal (not visible ASCII / too long)
    f, _ = mkflow(obj={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}})
    p.request(f)
    f.response = tutils.tresp(headers=http.Headers([(b"mcp-session-id", b"x" * 300)]))
    p.responseheaders(f)
    assert "mcp-session-id" not in f.response.headers


def test_keyring_rotation_hot_reloads(parser, tmp_path):
    from addons.core import sessionseal
    p, tctx = parser
    keys = tmp_path / "ring"
    tctx.configure(p, bastion_session_keys=str(keys))
    old = bind(p, "s-old", "alice")
    sessionseal.rotate(keys)
    p.check_reload()
    new = bind(p, "s-new", "alice")
    assert old[:8] != new[:8]                    # version + key id differ: sealed under the new key
    for env, sid in ((old, "s-old"), (new, "s-new")):
        f, _ = mkflow(headers=[("mcp-session-id", env)])
        p.request(f)
        assert f.response is None and f.request.headers["mcp-session-id"] == sid
    keys.write_text("not a keyring\n")           # a bad file keeps the last good keys
    p.check_reload()
    f, _ = mkflow(headers=[("mcp-session-id", new)])
    p.request(f)
    assert f.response is None
    sessionseal.rotate(keys.with_name("fresh"))  # the old keys rotated out entirely
    keys.write_text(keys.with_name("fresh").read_text())
    p.check_reload()
    f, _ = mkflow(headers=[("mcp-session-id", new)])
    p.request(f)
    assert f.response.status_code == 404


def test_envelope_under_a_key_loaded_later_opens(parser, tmp_path):
    """Another replica rotated first: an unknown key id makes the parser look at the file."""
    from addons.core import sessionseal
    p, tctx = parser
    keys = tmp_path / "ring"
    tctx.configure(p, bastion_session_keys=str(keys))
    other = McpParser()
    with taddons.context(Opts(), other) as t2:
        sessionseal.rotate(keys)
        t2.configure(other, bastion_session_keys=str(keys))
        env = bind(other, "s9", "alice")
    # p's poll has not run yet (no check_reload): the unknown key id makes it look once
    f, _ = mkflow(headers=[("mcp-session-id", env)])
    p.request(f)
    assert f.response is None and f.request.headers["mcp-session-id"] == "s9"


def test_duplicate_session_header_refused(parser):
    p, _ = parser
    victim = bind(p, "victim", "alice")
    mine = bind(p, "mine", "mallory")
    for sids in ((victim, victim), (mine, victim)):
        f, rec = mkflow(headers=[("mcp-session-id", sids[0]), ("Mcp-Session-Id", sids[1])], sub="mallory")
        p.request(f)
        assert f.response.status_code == 400 and not rec.messages, sids


def test_legacy_session_query_owner_enforced(parser):
    p, _ = parser
    f, rec = mkflow(method="GET", content=b"", path="/mcp/leg/sse", conn="leg", sub="alice")
    p.request(f)
    env = rec.bind_session("abc")      # the endpoint event named session abc: sealed
    assert env and "abc" not in env
    for path in (f"/mcp/leg/messages/?session_id={env}", "/mcp/leg/messages/?session_id=abc"):
        f, rec = mkflow(path=path, conn="leg", sub="mallory")
        p.request(f)
        assert f.response.status_code == 404
    f, rec = mkflow(path="/mcp/leg/messages/?session_id=abc", conn="leg", sub="alice")
    p.request(f)
    assert f.response.status_code == 404        # the raw upstream id is no session id here
    f, rec = mkflow(path=f"/mcp/leg/messages/?x=1&session_id={env}", conn="leg", sub="alice")
    rec.upstream_path = f"/messages/?x=1&session_id={env}"
    p.request(f)
    assert f.response is None and rec.upstream_path == "/messages/?x=1&session_id=abc"
    assert f.request.path == "/mcp/leg/messages/?x=1&session_id=abc" and rec.session_key == ("leg", "abc")


def test_unknown_session_id_is_refused_not_allowed(parser):
    """An id the gateway never bound (made up, expired, from another replica) gets 404."""
    p, _ = parser
    for headers, path in (([("mcp-session-id", "never-seen")], "/mcp/demo"), ([], "/mcp/leg/messages/?session_id=zz")):
        f, rec = mkflow(headers=headers, path=path, sub="alice")
        p.request(f)
        assert f.response.status_code == 404 and not rec.messages


def test_opening_and_closing_many_sessions_never_evicts_a_victim(parser):
    p, tctx = parser
    tctx.configure(p, bastion_session_limit=3, bastion_session_max=5)
    victim = bind(p, "victim", "alice")
    for i in range(50):                          # the attack: open, close, repeat
        env = bind(p, f"m{i}", "mallory")
        f, _ = mkflow(method="DELETE", content=b"", ctype=None, headers=[("mcp-session-id", env)], sub="mallory")
        p.request(f)
        assert f.response is None
        f.response = tutils.tresp(status_code=200)
        p.responseheaders(f)
        p.response(f)
    assert len(p.sessions) == 1
    f, rec = mkflow(headers=[("mcp-session-id", victim)], sub="mallory")
    p.request(f)
    assert f.response.status_code == 404
    f, rec = mkflow(headers=[("mcp-session-id", victim)], sub="alice")
    p.request(f)
    assert f.response is None


def test_session_limits_refuse_instead_of_evicting(parser):
    p, tctx = parser
    tctx.configure(p, bastion_session_limit=2, bastion_session_max=3)
    envs = {"a1": bind(p, "a1", "alice"), "m1": bind(p, "m1", "mallory"), "m2": bind(p, "m2", "mallory")}
    f, _ = mkflow(obj={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}, sub="mallory")
    p.request(f)
    assert f.response.status_code == 429 and json.loads(f.response.content)["error"] == "too_many_sessions"
    f, _ = mkflow(obj={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}, sub="bob")
    p.request(f)
    assert f.response.status_code == 503 and json.loads(f.response.content)["error"] == "session_table_full"
    for sid, sub in (("a1", "alice"), ("m1", "mallory"), ("m2", "mallory")):
        f, _ = mkflow(headers=[("mcp-session-id", envs[sid])], sub=sub)
        p.request(f)
        assert f.response is None, sid
    # a reservation whose initialize failed upstream is given back
    tctx.configure(p, bastion_session_max=4)
    f, _ = mkflow(obj={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}, sub="alice")
    p.request(f)
    assert f.response is None
    p.error(f)
    f, _ = mkflow(obj={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}, sub="alice")
    p.request(f)
    assert f.response is None


def test_session_binding_expires_only_when_idle():
    from addons.core.sessions import SessionTable
    now = [0.0]
    t = SessionTable(per_identity=5, total=5, idle=10, clock=lambda: now[0])
    t.admit("f1", "alice")
    assert t.bind("f1", ("c", "s"), "alice")
    t.admit("f2", "alice")
    assert t.bind("f2", ("c", "stream"), "alice")
    t.stream(("c", "stream"), +1)
    for _ in range(5):
        now[0] += 8
        t.touch(("c", "s"))                      # used: kept
    assert len(t) == 2 and t.counts == {"alice": 2}
    now[0] += 11
    t.touch(("c", "other-replicas-session"))     # not counted here: nothing to do
    assert ("c", "s") not in t.bindings and t.counts == {"alice": 1}   # idle: its count is freed
    assert ("c", "stream") in t.bindings         # an open stream keeps its session
    assert not t.bind("nothing-reserved", ("c", "x"), "alice")


def test_stream_key():
    class R:
        session_id = None
    r = R()
    req = tutils.treq(path=b"/mcp/leg/messages/?x=1&session_id=abc")
    assert stream_key(r, req) == "abc"
    assert stream_key(r, tutils.treq(path=b"/m?sessionId=q")) == "q"
    assert stream_key(r, tutils.treq(path=b"/m?session_id=")) is None
    r.session_id = "hdr"
    assert stream_key(r, req) == "hdr"


def test_pending_transforms_follow_the_response_and_are_bounded(parser, monkeypatch):
    from addons.hooks import mcpflow
    p, _ = parser
    monkeypatch.setattr(mcpflow, "MAX_PENDING", 5)
    env = bind(p, "s", "alice")
    for i in range(8):
        f, rec = mkflow(obj={**CALL, "id": i}, headers=[("mcp-session-id", env)])
        p.request(f)
        marker = lambda m, i=i: m  # noqa: E731
        rec.response_transforms.append(marker)
    assert len(p.pending) == 5
    g, grec = mkflow(method="GET", content=b"", headers=[("mcp-session-id", env)])
    p.request(g)
    assert grec.pending_lookup(7) and grec.pending_lookup(0) is None
    assert grec.pending_lookup("7") is None            # ids of another type never collide


def test_wrapped_parser_fails_closed(monkeypatch):
    p = McpParser()
    wrapped = FailClosed(p)
    with taddons.context(Opts(), wrapped):
        monkeypatch.setattr(mcpwire, "parse_body", lambda *a, **k: 1 / 0)
        f, rec = mkflow()
        wrapped.request(f)
        assert f.response.status_code == 502 and rec.refusal


# --- bounded decoding (decompression bombs) ------------------------------------------------

@pytest.mark.parametrize("enc", ["gzip", "deflate", "br", "zstd"])
def test_decompression_bomb_refused_without_inflating_it(parser, enc):
    from addons.hooks.mcpflow import BodyTooLarge, decode_bounded
    p, tctx = parser
    limit = 512 * 1024
    tctx.options.bastion_max_body = limit
    bomb = encoding.encode(b'{"jsonrpc":"2.0","id":1,"method":"ping","pad":"' + b"0" * (64 * 1024 * 1024) + b'"}', enc)
    assert len(bomb) < limit      # passes the Content-Length check, inflates 128x past the limit
    with pytest.raises(BodyTooLarge):
        decode_bounded(bomb, enc, limit)
    f, rec = mkflow(content=bomb, headers=[("content-encoding", enc)])
    p.request(f)
    assert f.response.status_code == 413 and not rec.messages


@pytest.mark.parametrize("enc", ["gzip", "deflate", "br", "zstd"])
def test_decode_bounded_exact_and_corrupt(enc):
    from addons.hooks.mcpflow import BodyTooLarge, decode_bounded
    plain = json.dumps(CALL).encode()
    data = encoding.encode(plain, enc)
    assert decode_bounded(data, enc, len(plain)) == plain           # exactly at the limit
    assert decode_bounded(data, enc.upper(), len(plain)) == plain
    with pytest.raises(BodyTooLarge):
        decode_bounded(data, enc, len(plain) - 1)
    with pytest.raises(ValueError):
        decode_bounded(data[: len(data) // 2], enc, 10_000)           # truncated
    if enc in ("gzip", "zstd"):
        with pytest.raises(ValueError):
            decode_bounded(data + data, enc, 10_000)                   # second member / frame smuggled after


def test_decode_bounded_identity_and_unknown():
    from addons.hooks.mcpflow import decode_bounded
    assert decode_bounded(b"{}", "", 10) == b"{}" and decode_bounded(b"{}", "identity", 10) == b"{}"
    for enc in ("compress", "x-gzip", "gzip, br", "br;q=1"):
        with pytest.raises(ValueError):
            decode_bounded(b"{}", enc, 10)


def test_legacy_session_ends_with_its_stream(parser):
    p, _ = parser
    f, rec = mkflow(method="GET", content=b"", ctype=None, path="/mcp/leg/sse", conn="leg", sub="alice")
    p.request(f)
    assert f.response is None
    env = rec.bind_session("abc")
    g, _ = mkflow(path=f"/mcp/leg/messages/?session_id={env}", conn="leg", sub="alice")
    p.request(g)
    assert g.response is None and len(p.sessions) == 1
    p.error(f)                                    # the SSE stream went away: so did the session
    assert len(p.sessions) == 0 and not p.sessions.counts   # (the upstream answers 404 for it now)
