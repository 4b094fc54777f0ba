"""addons/hooks/connections.py: connection YAML validation (with line numbers), credentials,
path tricks, legacy endpoint rewriting, and the Router / Injector addons."""
from __future__ import annotations

import asyncio
import json
import textwrap
from pathlib import Path

import pytest
from mitmproxy import exceptions, http
from mitmproxy.test import taddons, tflow, tutils

from addons.core.connections import ConnectionRegistry
from addons.cli import connections as cli_connections
from addons.core import connections as model
from addons.core.connections import (Connection, load_connections, parse_connections, plain_query, rewrite_endpoint,
                                     split_path)
from addons.hooks.connections import Forwarder, Injector, Router, unchecked_reason
from addons.hooks.httputil import checked_snapshot
from addons.hooks.failclosed import FailClosed
from addons.core.mcpwire import parse_body
from addons.core.record import BastionRecord, Decision, Identity, get_record
from addons.core.rules import RulesError, load_yaml

SECRET = "svc-token-0123456789abcdef"


def write_rules(tmp_path: Path, text: str, name: str = "connections.yaml") -> Path:
    d = tmp_path / "rules"
    d.mkdir(exist_ok=True)
    p = d / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return p


def parse(tmp_path, text) -> dict[str, Connection]:
    p = write_rules(tmp_path, text)
    return parse_connections(p, load_yaml(p))


def error_of(tmp_path, text) -> RulesError:
    with pytest.raises(RulesError) as ei:
        parse(tmp_path, text)
    return ei.value


# --- parse_connections ------------------------------------------------------------------

def test_valid_connections(tmp_path, monkeypatch):
    monkeypatch.setenv("DEMO_TOKEN", SECRET)
    monkeypatch.setenv("UP_PORT", "9100")
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "tok").write_text("file-secret\n")
    conns = parse(tmp_path, """
        connections:
          demo:
            upstream: http://127.0.0.1:${UP_PORT}/mcp
            credential: env:DEMO_TOKEN
          files:
            upstream: https://files.internal/sse
            transport: sse
            credential:
              from: file:tok
              header: X-Api-Key
            audience: https://gw/mcp/files
            roles: [ops, dev]
            options: {a: 1}
          open:
            upstream: http://localhost:${NOPE_PORT:-8931}
    """)
    d = conns["demo"]
    assert (d.scheme, d.host, d.port, d.path, d.transport) == ("http", "127.0.0.1", 9100, "/mcp", "streamable")
    assert d.secret == f"Bearer {SECRET}" and d.credential.header == "Authorization"
    assert SECRET not in repr(d)                                  # the secret never shows in reprs/logs
    f = conns["files"]
    assert f.secret == "file-secret" and f.credential.header == "X-Api-Key" and f.credential.scheme is None
    assert (f.port, f.transport, f.roles, f.audience, f.options) == (443, "sse", ("ops", "dev"),
                                                                    "https://gw/mcp/files", {"a": 1})
    o = conns["open"]
    assert (o.port, o.path, o.credential, o.secret, o.origin) == (8931, "/", None, None, "http://localhost:8931")


def test_empty_file_means_no_connections(tmp_path):
    assert parse(tmp_path, "# nothing yet\n") == {}


@pytest.mark.parametrize("text,line,match", [
    ("""
     connections:
       ok:
         upstream: http://a/mcp
       "bad name!":
         upstream: http://b/mcp
     """, 4, "must match"),
    ("""
     connections:
       demo:
         upstream: http://a/mcp
         credentials: env:X
     """, 4, "unknown key"),
    ("""
     connections:
       demo:
         transport: streamable
         upstream: ftp://a/mcp
     """, 4, "http\\(s\\) URL"),
    ("""
     connections:
       demo:
         transport: streamable
         upstream: http://user:pw@a/mcp
     """, 4, "userinfo"),
    ("""
     connections:
       demo:
         upstream: http://a/mcp?token=abc
     """, 3, "query"),
    ("""
     connections:
       demo:
         upstream: http://a:99999/mcp
     """, 3, "port"),
    ("""
     connections:
       demo:
         upstream: http://a/mcp
         transport: websocket
     """, 4, "transport"),
    ("""
     connections:
       demo:
         upstream: http://a/mcp
         credential: sk-live-1234567890abcdef
     """, 4, "never written inline"),
    ("""
     connections:
       demo:
         upstream: http://a/mcp
         credential:
           header: Authorization
           from: "Bearer eyJhbGciOiJIUzI1NiJ9.e30.x"
     """, 6, "never written inline"),
    ("""
     connections:
       demo:
         upstream: http://a/mcp
         credential:
           from: env:X
           header: "X Api Key"
     """, 6, "header name"),
    ("""
     connections:
       demo:
         upstream: http://a/mcp
         credential: [env:X]
     """, 4, "credential needs"),
    ("""
     connections:
       demo:
         upstream: http://a/mcp
         credential: env:BASTION_TEST_UNSET_VARIABLE
     """, 4, "not set"),
    ("""
     connections:
       demo:
         upstream: http://a/mcp
         credential: file:does-not-exist
     """, 4, "cannot read"),
    ("""
     connections:
       demo:
         upstream: http://a/mcp
         roles: 5
     """, 4, "roles"),
    ("""
     connections:
       demo:
         upstream: http://a/mcp
         options: [1, 2]
     """, 4, "options"),
    ("""
     connections:
       demo: http://a/mcp
     """, 2, "must be a mapping"),
    ("""
     connections:
       - demo
     """, 1, "mapping of name"),
])
def test_validation_errors_carry_line_numbers(tmp_path, text, line, match):
    e = error_of(tmp_path, text)
    assert e.line == line, str(e)
    assert e.file.endswith("connections.yaml")
    assert str(e).startswith(f"{e.file}:{line}: ")
    assert pytest.raises(RulesError, parse, tmp_path, text).match(match)


def test_inline_secret_is_never_echoed_in_the_error(tmp_path):
    e = error_of(tmp_path, """
        connections:
          demo:
            upstream: http://a/mcp
            credential: sk-live-1234567890abcdef
    """)
    assert "sk-live" not in str(e)


def test_missing_upstream_points_at_the_connection(tmp_path):
    e = error_of(tmp_path, """
        connections:
          demo:
            transport: sse
    """)
    assert e.line == 3 and "upstream" in e.message


def test_empty_credential_file_refused(tmp_path):
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "empty").write_text("\n")
    e = error_of(tmp_path, """
        connections:
          demo:
            upstream: http://a/mcp
            credential: file:empty
    """)
    assert "empty" in e.message and e.line == 4


def test_yaml_syntax_and_duplicate_keys_have_lines(tmp_path):
    p = write_rules(tmp_path, """
        connections:
          demo:
            upstream: http://a/mcp
          demo:
            upstream: http://b/mcp
    """)
    with pytest.raises(RulesError) as ei:
        load_yaml(p)
    assert ei.value.line in (2, 4)
    p = write_rules(tmp_path, "connections:\n  demo: [\n")
    with pytest.raises(RulesError) as ei:
        load_yaml(p)
    assert ei.value.line is not None


def test_top_level_shapes(tmp_path):
    assert "top level" in error_of(tmp_path, "- a\n- b\n").message
    assert "top level" in error_of(tmp_path, "other: 1\n").message


def test_load_connections_merges_d_directory_and_refuses_duplicates(tmp_path):
    write_rules(tmp_path, "connections:\n  a:\n    upstream: http://a/mcp\n")
    write_rules(tmp_path, "connections:\n  b:\n    upstream: http://b/mcp\n", "connections.d/10-b.yaml")
    assert sorted(load_connections(tmp_path / "rules")) == ["a", "b"]
    write_rules(tmp_path, "connections:\n  a:\n    upstream: http://c/mcp\n", "connections.d/20-a.yaml")
    with pytest.raises(RulesError, match="defined twice"):
        load_connections(tmp_path / "rules")
    assert model.validate_dir(str(tmp_path / "rules"))


def test_load_connections_without_file(tmp_path):
    (tmp_path / "rules").mkdir()
    assert load_connections(tmp_path / "rules") == {}
    assert model.validate_dir(str(tmp_path / "rules")) == []


def test_cli_list_prints_no_secret(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DEMO_TOKEN", SECRET)
    write_rules(tmp_path, "connections:\n  demo:\n    upstream: http://a/mcp\n    credential: env:DEMO_TOKEN\n")

    class Args:
        rules = str(tmp_path / "rules")
    assert cli_connections._cli_list(Args()) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "env:DEMO_TOKEN" in out and SECRET not in out


# --- split_path -------------------------------------------------------------------------

@pytest.mark.parametrize("path,expected", [
    ("/mcp/demo", ("demo", "", "")),
    ("/mcp/demo/", ("demo", "/", "")),
    ("/mcp/demo/messages/?session_id=ab", ("demo", "/messages/", "session_id=ab")),
    ("/mcp/demo-2_x", ("demo-2_x", "", "")),
    ("/mcp/demo/a.b/c..d", ("demo", "/a.b/c..d", "")),
])
def test_split_path_legit(path, expected):
    assert split_path(path) == expected


@pytest.mark.parametrize("path", ["/", "/other/mcp/demo", "/mcpx/demo", "/MCP/demo", "/.well-known/x", ""])
def test_split_path_not_a_gateway_path(path):
    assert split_path(path) is None


@pytest.mark.parametrize("path", [
    "/mcp/demo/../other", "/mcp/demo/..", "/mcp/../demo", "/mcp/demo/./x", "/mcp/demo/.",
    "/mcp/demo/%2e%2e/other", "/mcp/demo/%2E%2E", "/mcp/%64emo", "/mcp/demo%2f..%2fother",
    "/mcp/demo%2F..%2Fother", "/mcp/demo%5c..%5cother", "/mcp//demo", "/mcp/demo//x", "//mcp/demo",
    "/mcp/demo\\..\\other", "/mcp/demo\\other", "/mcp/demo\x00", "/mcp/demo\t", "/mcp/demo x",
    "/mcp/demo\r\nX: y", "/mcp/demo\x7f", "/mcp/demo/%00",
])
def test_split_path_tricks_refused(path):
    parts = split_path(path)
    assert parts is None or parts[0] is None, path


def test_plain_query():
    assert plain_query("") and plain_query("session_id=ab12") and plain_query("session_id=ab&x=1")
    for q in ("session_id=a&session_id=b", "session_id=mine&sessionId=victim", "session_id=%61b",
              "session%5Fid=victim", "session_id=a+b", "session_id=a;x=1", "a", "session_id=a&",
              "&session_id=a", "session_id=a=b"):
        assert not plain_query(q), q


# --- rewrite_endpoint -------------------------------------------------------------------

def legacy_conns() -> dict[str, Connection]:
    return {"leg": Connection(name="leg", scheme="http", host="127.0.0.1", port=9000, path="/sse",
                              credential=None, transport="sse")}


def test_rewrite_endpoint_relative_and_absolute_same_origin():
    conns = legacy_conns()
    assert rewrite_endpoint("leg", "/messages/?session_id=abc", conns) == "/mcp/leg/messages/?session_id=abc"
    assert rewrite_endpoint("leg", " http://127.0.0.1:9000/m2?session_id=x\n", conns) == "/mcp/leg/m2?session_id=x"
    assert rewrite_endpoint("leg", "messages", conns) == "/mcp/leg/messages"
    assert list(conns["leg"].announced) == ["/messages/", "/m2", "/messages"]


@pytest.mark.parametrize("data", [
    "http://evil.example/messages/", "https://127.0.0.1:9000/messages/", "http://127.0.0.1:9001/messages/",
    "//evil.example/messages/", "http:/messages", "/", "", "?session_id=x", "/a/../b", "/a%2f..%2fb",
    "/a//b", "/a\\b", "/a b",
])
def test_rewrite_endpoint_refuses_other_origins_and_tricks(data):
    conns = legacy_conns()
    with pytest.raises(ValueError):
        rewrite_endpoint("leg", data, conns)
    assert not conns["leg"].announced


def test_announced_paths_are_bounded():
    conns = legacy_conns()
    for i in range(model.MAX_ANNOUNCED + 50):
        rewrite_endpoint("leg", f"/m/{i}", conns)
    ann = conns["leg"].announced
    assert len(ann) == model.MAX_ANNOUNCED
    assert "/m/0" not in ann and f"/m/{model.MAX_ANNOUNCED + 49}" in ann
    rewrite_endpoint("leg", "/m/60", conns)          # re-announcing refreshes it
    assert next(reversed(ann)) == "/m/60"


# --- Router addon -----------------------------------------------------------------------

@pytest.fixture
def rules(tmp_path, monkeypatch):
    monkeypatch.setenv("DEMO_TOKEN", SECRET)
    write_rules(tmp_path, """
        connections:
          demo:
            upstream: http://127.0.0.1:9100/mcp
            credential: env:DEMO_TOKEN
          leg:
            upstream: http://127.0.0.1:9200/sse
            transport: sse
            credential:
              from: env:DEMO_TOKEN
              header: X-Service-Token
    """)
    return tmp_path / "rules"


@pytest.fixture
def chain(rules):
    reg = ConnectionRegistry()
    router, injector = FailClosed(Router(reg)), FailClosed(Injector(reg, identity_required=False))
    with taddons.context(router, injector) as tctx:
        tctx.configure(router, bastion_rules=str(rules))
        yield router, injector, tctx


def mkflow(path="/mcp/demo", method="POST", headers=(), content=b"{}"):
    hdrs = http.Headers([(k.encode(), v.encode()) for k, v in (("host", "gw.example:8080"), *headers)])
    req = tutils.treq(method=method.encode(), path=path.encode(), headers=hdrs, content=content,
                      host="gw.example", port=8080)
    return tflow.tflow(req=req)


def error_body(f) -> dict:
    assert f.response.headers["content-type"] == "application/json"
    return json.loads(f.response.content)


def test_configure_loads_and_validates(chain, tmp_path):
    router, _, tctx = chain
    assert sorted(router.wrapped.connections) == ["demo", "leg"]
    with pytest.raises(exceptions.OptionsError, match="not a directory"):
        tctx.configure(router, bastion_rules=str(tmp_path / "nope"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "connections.yaml").write_text("connections:\n  demo:\n    upstream: ftp://x\n")
    with pytest.raises(exceptions.OptionsError, match="connections.yaml:3"):
        tctx.configure(router, bastion_rules=str(bad))
    with pytest.raises(exceptions.OptionsError, match="positive"):
        tctx.configure(router, bastion_max_body=0)


def test_known_connection_routed(chain):
    router, _, _ = chain
    f = mkflow()
    router.requestheaders(f)
    rec = get_record(f.metadata)
    assert f.response is None and rec.connection == "demo" and rec.upstream_path == "/mcp"
    f = mkflow("/mcp/demo/", method="GET", content=b"")
    router.requestheaders(f)
    assert f.response is None and get_record(f.metadata).upstream_path == "/mcp"


def test_unknown_connection_404_json(chain):
    router, _, _ = chain
    f = mkflow("/mcp/nope")
    router.requestheaders(f)
    assert f.response.status_code == 404 and error_body(f)["error"] == "unknown_connection"
    assert get_record(f.metadata).refusal.startswith("404")
    for path in ("/", "/admin", "/mcp"):
        f = mkflow(path)
        router.requestheaders(f)
        assert f.response.status_code == 404, path


@pytest.mark.parametrize("path", [
    "/mcp/demo/../leg", "/mcp/demo/%2e%2e/leg", "/mcp/demo%2f..%2fleg", "/mcp//demo", "/mcp/demo//",
    "/mcp/demo\\..\\leg", "/mcp/leg/..", "/mcp/%64emo",
])
def test_path_tricks_refused_400(chain, path):
    router, _, _ = chain
    f = mkflow(path)
    router.requestheaders(f)
    assert f.response.status_code == 400 and error_body(f)["error"] == "invalid_path"
    assert get_record(f.metadata).connection is None


def test_subpaths_and_queries_refused(chain):
    router, _, _ = chain
    for path, status in (("/mcp/demo/other", 404), ("/mcp/demo?x=1", 400), ("/mcp/demo/?session_id=a", 400),
                         ("/mcp/leg/messages/?session_id=a", 404)):   # not announced yet
        f = mkflow(path)
        router.requestheaders(f)
        assert f.response.status_code == status, path


def test_legacy_announced_path_routed_with_plain_query_only(chain):
    router, _, _ = chain
    rewrite_endpoint("leg", "/messages/?session_id=abc", router.wrapped.connections)
    f = mkflow("/mcp/leg/messages/?session_id=abc")
    router.requestheaders(f)
    assert f.response is None and get_record(f.metadata).upstream_path == "/messages/?session_id=abc"
    for q in ("session_id=mine&session_id=victim", "sessionId=mine&session_id=victim", "session_id=%76ictim"):
        f = mkflow(f"/mcp/leg/messages/?{q}")
        router.requestheaders(f)
        assert f.response.status_code == 400, q
    # a streamable connection never accepts announced sub-paths
    rewrite_endpoint("demo", "/messages/", router.wrapped.connections)
    f = mkflow("/mcp/demo/messages/")
    router.requestheaders(f)
    assert f.response.status_code == 404


def test_origin_checks(chain):
    router, _, tctx = chain
    # same origin = the listener the client connected to, never the (spoofable, and in
    # reverse mode rewritten) Host header
    for origin in ("http://evil.example", "null", "http://gw.example:8080.evil", "https://gw.example",
                   "http://gw.example:8080", "http://127.0.0.1:8081"):
        f = mkflow(headers=[("origin", origin)])
        f.client_conn.sockname = ("127.0.0.1", 8080)
        router.requestheaders(f)
        assert f.response.status_code == 403 and error_body(f)["error"] == "forbidden_origin", origin
    for origin in ("http://127.0.0.1:8080", "http://localhost:8080", "https://127.0.0.1:8080"):
        f = mkflow(headers=[("origin", origin)])
        f.client_conn.sockname = ("127.0.0.1", 8080)
        router.requestheaders(f)
        assert f.response is None, origin
    f = mkflow()          # no Origin at all (non-browser clients)
    router.requestheaders(f)
    assert f.response is None
    tctx.options.bastion_allowed_origins = "https://app.example, http://localhost:3000"
    f = mkflow(headers=[("origin", "https://app.example")])
    router.requestheaders(f)
    assert f.response is None
    f = mkflow(headers=[("origin", "https://app.example.evil")])
    router.requestheaders(f)
    assert f.response.status_code == 403


def test_content_length_limit(chain):
    router, _, tctx = chain
    tctx.options.bastion_max_body = 100
    for cl, status in (("101", 413), ("99999999999999999999", 413), ("-1", 413), ("1e3", 413), ("100", None),
                       ("0", None)):
        f = mkflow()
        f.request.headers["content-length"] = cl
        router.requestheaders(f)
        assert (f.response.status_code if f.response else None) == status, cl
    f = mkflow()
    f.request.headers["content-length"] = "101"
    router.requestheaders(f)
    assert error_body(f)["error"] == "body_too_large"
    # the limit is kept from configure: a later change applies to the next request
    tctx.options.bastion_max_body = 101
    f = mkflow()
    f.request.headers["content-length"] = "101"
    router.requestheaders(f)
    assert f.response is None


def test_methods(chain):
    router, _, _ = chain
    for m in ("PUT", "PATCH", "OPTIONS", "TRACE", "CONNECT"):
        f = mkflow(method=m)
        router.requestheaders(f)
        assert f.response.status_code == 405 and f.response.headers["allow"] == "POST, GET, DELETE", m
    for m in ("POST", "GET", "DELETE"):
        f = mkflow(method=m)
        router.requestheaders(f)
        assert f.response is None, m


def test_local_prefixes_left_to_other_addons(chain):
    router, _, _ = chain
    f = mkflow("/.well-known/oauth-protected-resource/mcp/demo", method="GET")
    router.requestheaders(f)
    assert f.response is None and get_record(f.metadata).connection is None


async def test_hot_reload_keeps_last_good_and_announcements(chain, rules, caplog):
    router, _, _ = chain
    r = router.wrapped
    rewrite_endpoint("leg", "/messages/", r.connections)
    r.running()
    try:
        await asyncio.sleep(0.05)
        text = (rules / "connections.yaml").read_text()
        (rules / "connections.yaml").write_text(text + "  extra:\n    upstream: http://127.0.0.1:9300/mcp\n")
        for _ in range(40):
            await asyncio.sleep(0.1)
            if "extra" in r.connections:
                break
        assert "extra" in r.connections and "/messages/" in r.connections["leg"].announced
        # broken in a way that is not a YAML error: keep the last good set, keep reloading
        (rules / "connections.yaml").write_text(text + "  extra:\n    upstream: http://x/mcp\n    roles: 5\n")
        await asyncio.sleep(1.2)
        assert "extra" in r.connections and "reload rejected" in caplog.text
        (rules / "connections.yaml").write_text(text)
        for _ in range(40):
            await asyncio.sleep(0.1)
            if "extra" not in r.connections:
                break
        assert "extra" not in r.connections
    finally:
        r.done()


# --- Injector ---------------------------------------------------------------------------

def checked_post(router, path="/mcp/demo", headers=(), body=None):
    obj = body or {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    f = mkflow(path, headers=headers, content=json.dumps(obj).encode())
    router.requestheaders(f)
    rec = get_record(f.metadata)
    rec.identity = Identity(sub="alice", roles=("analyst",))
    parsed = parse_body(f.request.content)
    rec.messages, rec.batch = parsed.messages, parsed.batch
    rec.decisions = [Decision("allow", "r", message_id=m.id) for m in parsed.messages]
    rec.checked = checked_snapshot(f.request)
    return f, rec


CLIENT_HEADERS = [
    ("Authorization", "Bearer caller-jwt"), ("authorization", "Basic second"), ("Cookie", "sid=1"),
    ("X-Api-Key", "k"), ("Forwarded", "for=1.2.3.4"), ("X-Forwarded-For", "1.2.3.4"), ("X-Real-IP", "1"),
    ("X-Forwarded-Host", "evil"), ("Proxy-Authorization", "Basic x"), ("Accept-Encoding", "gzip, br"),
    ("Connection", "keep-alive, x-foo"), ("TE", "trailers"), ("Upgrade", "h2c"), ("X-Original-URL", "/admin"),
    ("X-Forwarded-Prefix", "/other"), ("X-HTTP-Method-Override", "DELETE"),
    ("X-Service-Token", "client-supplied"),
    ("Mcp-Session-Id", "s1"), ("MCP-Protocol-Version", "2025-06-18"), ("Accept", "application/json, text/event-stream"),
    ("X-Foo", "hop-by-hop: named in Connection"),
]


async def test_injector_strips_client_credentials_and_injects(chain):
    router, injector, _ = chain
    f, rec = checked_post(router, headers=CLIENT_HEADERS)
    await injector.request(f)
    h = f.request.headers
    assert f.response is None
    # the credential waits on the record for the Forwarder; the flow never holds it
    assert "authorization" not in h and rec.credential == ("Authorization", f"Bearer {SECRET}")
    for name in ("cookie", "x-api-key", "forwarded", "x-forwarded-for", "x-real-ip", "x-forwarded-host",
                 "proxy-authorization", "accept-encoding", "connection", "te", "upgrade", "x-original-url",
                 "x-forwarded-prefix", "x-http-method-override", "x-foo"):
        assert name not in h, name
    assert "caller-jwt" not in str(f.request.headers)
    # MCP headers pass
    assert h["mcp-session-id"] == "s1" and h["mcp-protocol-version"] == "2025-06-18" and "accept" in h
    assert (f.request.scheme, f.request.host, f.request.port, f.request.path) == ("http", "127.0.0.1", 9100, "/mcp")
    assert h["host"] == "127.0.0.1:9100"
    assert rec.injected_header == "Authorization"


async def test_injector_points_an_http2_request_and_its_authority_at_the_upstream(chain):
    router, injector, _ = chain
    f, rec = checked_post(router)
    f.request.http_version = "HTTP/2.0"
    f.request.authority = "gw.example:443"
    rec.checked = checked_snapshot(f.request)
    await injector.request(f)
    assert f.response is None
    assert (f.request.host, f.request.port, f.request.authority) == ("127.0.0.1", 9100, "127.0.0.1:9100")
    assert f.request.headers.get_all("host") == ["127.0.0.1:9100"]


@pytest.mark.parametrize("fields", [
    [(b"Host", b"gw:8080"), (b"accept", b"*/*"), (b"cookie", b"a")],
    [(b"accept", b"*/*"), (b"HOST", b"a"), (b"x-foo", b"1"), (b"host", b"b")],
    [(b"accept", b"*/*")],
    [(b"host", b"gw"), (b"Cookie", b"a"), (b"cookie", b"b"), (b"x-foo", b"2")],
])
@pytest.mark.parametrize("version,authority", [("HTTP/1.1", ""), ("HTTP/2.0", "gw.example:443"), ("HTTP/2.0", "")])
@pytest.mark.parametrize("scheme,host,port", [("http", "127.0.0.1", 9100), ("https", "up.example", 443),
                                              ("http", "up.example", 80), ("https", "up.example", 80)])
def test_point_at_gives_what_the_mitmproxy_setters_give(fields, version, authority, scheme, host, port):
    from addons.hooks.connections import point_at
    drop = frozenset({b"cookie", b"x-foo"})
    conn = Connection("c", scheme, host, port, "/mcp", None)
    mine, theirs = (tutils.treq(headers=tuple(fields), http_version=version.encode()) for _ in range(2))
    for r in (mine, theirs):
        r.authority = authority
    point_at(mine, conn, drop)
    # the sequence point_at replaces
    theirs.headers.fields = tuple(f for f in theirs.headers.fields if f[0].lower() not in drop)
    theirs.scheme, theirs.host, theirs.port = scheme, host, port
    theirs.headers["host"] = host if port in (80, 443) else f"{host}:{port}"
    assert mine.get_state() == theirs.get_state()


async def test_connection_header_cannot_strip_framing_or_mcp_headers(chain):
    # Connection-listed names are hop-by-hop, but dropping Content-Length would make the
    # upstream read the body as a second request that the gateway never checked
    router, injector, _ = chain
    f, rec = checked_post(router, headers=[
        ("Connection", "content-length, transfer-encoding, host, content-type, mcp-session-id, x-bar"),
        ("Mcp-Session-Id", "s1"), ("X-Bar", "hop"), ("Content-Type", "application/json")])
    n = len(f.request.content)
    f.request.headers["content-length"] = str(n)
    await injector.request(f)
    h = f.request.headers
    assert f.response is None
    assert h["content-length"] == str(n) and h["mcp-session-id"] == "s1" and "content-type" in h
    assert "host" in h and "x-bar" not in h


async def test_injector_custom_header_credential(chain):
    router, injector, _ = chain
    rewrite_endpoint("leg", "/messages/?session_id=a", router.wrapped.connections)
    f, rec = checked_post(router, "/mcp/leg/messages/?session_id=a", headers=CLIENT_HEADERS)
    await injector.request(f)
    h = f.request.headers
    assert "x-service-token" not in h and rec.credential == ("X-Service-Token", SECRET)  # raw value, no scheme
    assert "authorization" not in h
    assert f.request.path == "/messages/?session_id=a" and f.request.port == 9200


async def test_forwarder_puts_the_credential_on_the_wire_only(chain):
    from mitmproxy.net.http.http1 import assemble_request_head
    from mitmproxy.tools.web.app import flow_to_json
    router, injector, _ = chain
    f, rec = checked_post(router, headers=CLIENT_HEADERS)
    await injector.request(f)
    await Forwarder().request(f)
    wire = assemble_request_head(f.request)           # what mitmproxy's HTTP/1 client writes
    assert wire.count(f"Authorization: Bearer {SECRET}".encode()) == 1 and b"caller-jwt" not in wire
    # what mitmweb shows and saves, and what a copy or replay starts from
    assert "authorization" not in f.request.headers and rec.credential is None
    assert SECRET not in json.dumps(flow_to_json(f)) and SECRET not in str(f.get_state())
    assert SECRET.encode() not in assemble_request_head(f.copy().request)
    f.response = tutils.tresp()
    Forwarder().responseheaders(f)                    # sent: plain headers again
    assert SECRET.encode() not in assemble_request_head(f.request)


async def test_forwarder_keeps_the_record_through_a_revert(chain):
    router, injector, _ = chain
    f, rec = checked_post(router)
    await injector.request(f)
    f.intercept()
    task = asyncio.create_task(Forwarder().request(f))
    await asyncio.sleep(0.01)
    f.backup()
    f.request.content = b"{}"
    f.revert()                            # mitmweb's Revert: state from a copy (no record)
    f.resume()
    await task
    assert f.response is None and get_record(f.metadata) is rec
    assert SECRET.encode() in bytes(f.request.headers)


async def test_forwarder_refuses_a_request_edited_after_the_injector(chain):
    router, injector, _ = chain
    f, rec = checked_post(router)
    await injector.request(f)
    f.intercept()                         # mitmweb's intercept filter holds it
    fw = Forwarder()
    task = asyncio.create_task(fw.request(f))
    await asyncio.sleep(0.01)
    assert not task.done()
    f.request.content = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"other"}}'
    f.resume()
    await task
    assert f.response.status_code == 409 and error_body(f)["error"] == "request_changed"
    assert rec.credential is None and rec.refusal_rule == "integrity:request-changed"
    assert SECRET.encode() not in bytes(f.request.headers)


@pytest.mark.parametrize("edit", [
    lambda r: setattr(r, "content", b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}}'),
    lambda r: setattr(r, "path", "/mcp/leg"),
    lambda r: r.headers.__setitem__("mcp-session-id", "other"),
    lambda r: r.headers.__setitem__("x-new", "1"),
    lambda r: setattr(r, "method", "DELETE"),
    lambda r: setattr(r, "port", 9999),
])
async def test_injector_refuses_a_request_changed_after_the_checks(chain, edit):
    router, injector, _ = chain
    f, rec = checked_post(router, headers=[("Mcp-Session-Id", "s1")])
    edit(f.request)
    await injector.request(f)
    # a changed method is already refused as an unchecked stream request (502)
    assert (f.response.status_code, error_body(f)["error"]) in ((409, "request_changed"), (502, "gateway_error"))
    assert rec.credential is None and rec.outgoing is None


async def test_injector_refuses_a_request_nobody_snapshotted(chain):
    router, injector, _ = chain
    f, rec = checked_post(router)
    rec.checked = None
    await injector.request(f)
    assert f.response.status_code == 409


async def test_record_is_left_out_of_flow_copies_and_files(chain):
    import io

    from mitmproxy import io as mio
    router, injector, _ = chain
    f, rec = checked_post(router)
    await injector.request(f)
    assert rec.credential is not None
    buf = io.BytesIO()
    mio.FlowWriter(buf).add(f)            # flow files / mitmweb's export: no error, no secret
    assert SECRET.encode() not in buf.getvalue()
    copy = f.copy()                       # duplicate / replay: starts without a record
    assert get_record(copy.metadata) is not rec and get_record(copy.metadata).identity is None


@pytest.mark.parametrize("tamper,reason", [
    (lambda rec: setattr(rec, "decisions", []), "not every message has a policy decision"),
    (lambda rec: setattr(rec, "messages", []), "body not parsed"),
    (lambda rec: setattr(rec, "decisions", [Decision("deny", "r")]), "decision deny"),
    (lambda rec: setattr(rec, "decisions", [Decision("approve", "r")]), "decision approve"),
    (lambda rec: setattr(rec, "identity", None), "caller not verified"),
])
async def test_injector_refuses_unchecked(chain, tamper, reason):
    router, injector, _ = chain
    f, rec = checked_post(router, headers=[("Authorization", "Bearer caller-jwt")])
    tamper(rec)
    assert reason in (unchecked_reason(rec, "POST") or "")
    if reason == "caller not verified":
        assert unchecked_reason(rec, "POST", identity_required=False) is None
        return  # the Injector requires identity only when the identity addon is loaded
    await injector.request(f)
    assert f.response.status_code == 502 and error_body(f)["error"] == "gateway_error"
    assert f.request.host == "gw.example" and "caller-jwt" in f.request.headers["authorization"]


def test_unchecked_reason_rules():
    rec = BastionRecord(identity=Identity("a"))
    assert unchecked_reason(rec, "GET") == "stream request not checked"
    rec.stream_checked = True
    assert unchecked_reason(rec, "GET") is None and unchecked_reason(rec, "DELETE") is None
    rec.messages = parse_body(b'{"jsonrpc":"2.0","id":1,"method":"ping"}').messages
    rec.decisions = [Decision("approve", "r")]
    assert unchecked_reason(rec, "POST")
    rec.approval = {"outcome": "denied"}
    assert unchecked_reason(rec, "POST")
    rec.approval = {"outcome": "approved"}
    assert unchecked_reason(rec, "POST") is None


async def test_injector_refuses_unrouted_and_get_without_check(chain):
    router, injector, _ = chain
    f = mkflow("/.well-known/x", method="GET")
    router.requestheaders(f)
    await injector.request(f)
    assert f.response.status_code == 404
    f = mkflow(method="GET", content=b"")
    router.requestheaders(f)
    get_record(f.metadata).identity = Identity("a")
    await injector.request(f)
    assert f.response.status_code == 502
    f = mkflow(method="GET", content=b"")
    router.requestheaders(f)
    get_record(f.metadata).stream_checked = True
    get_record(f.metadata).checked = checked_snapshot(f.request)
    await injector.request(f)
    assert f.response is None and f.request.host == "127.0.0.1"
    # a connection removed by a reload after routing: not forwarded
    f, rec = checked_post(router)
    rec.connection = "gone"
    await injector.request(f)
    assert f.response.status_code == 502


async def test_injector_leaves_refused_flows_alone(chain):
    router, injector, _ = chain
    f = mkflow("/mcp/nope")
    router.requestheaders(f)
    await injector.request(f)
    assert f.response.status_code == 404 and f.request.host == "gw.example"


async def test_injector_requires_identity_by_default(rules):
    reg = ConnectionRegistry()
    router, injector = FailClosed(Router(reg)), FailClosed(Injector(reg))
    with taddons.context(router, injector) as tctx:
        tctx.configure(router, bastion_rules=str(rules))
        f, rec = checked_post(router)
        rec.identity = None
        await injector.request(f)
        assert f.response.status_code == 502


async def test_injector_works_with_an_unwrapped_router(rules):
    reg = ConnectionRegistry()
    router, injector = Router(reg), Injector(reg, identity_required=False)
    with taddons.context(router, injector) as tctx:
        tctx.configure(router, bastion_rules=str(rules))
        f, rec = checked_post(router)
        await injector.request(f)
        assert f.response is None and rec.credential == ("Authorization", f"Bearer {SECRET}")
