"""addons/core/mcpwire.py: strict JSON, JSON-RPC/MCP message parsing, 2026-07-28 routing headers.

Every refusal has an attack case and a legitimate-use case next to it. Routing-header
behaviour is compared with the SDK's own server-side checks on the same inputs.
"""
from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, strategies as st
from mcp.shared import inbound as sdk

from addons.core import mcpwire
from addons.core.mcpwire import (HEADER_MISMATCH, INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR,
                        McpParseError, check_param_headers, check_routing_headers, decode_header_value,
                        param_header_map, parse_body, parse_message, strict_loads)

META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {}}


def req(method="tools/call", params=None, msg_id=1, **extra) -> dict:
    if params is None:
        params = {"name": "query_sql", "arguments": {"sql": "select 1"}}
    return {"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params, **extra}


def body(obj) -> bytes:
    return json.dumps(obj).encode()


def code_of(data: bytes) -> int:
    with pytest.raises(McpParseError) as ei:
        parse_body(data)
    return ei.value.code


# --- strict_loads -------------------------------------------------------------------------

def test_strict_loads_accepts_plain_json():
    assert strict_loads(b'{"a": [1, 2.5, "x", true, null]}') == {"a": [1, 2.5, "x", True, None]}
    assert strict_loads('{"a": "\u00e9"}') == {"a": "é"}


@pytest.mark.parametrize("data", [
    b"", b"{", b"{'a': 1}", b'{"a": 1,}', b"[1,]", b'{"a": 1} x', b"not json", b'{"a":"\x01"}',
])
def test_invalid_json_is_parse_error(data):
    assert code_of(data) == PARSE_ERROR


@pytest.mark.parametrize("data", [
    b'{"name": 1, "name": 2}',
    b'{"n\\u0061me": "a", "name": "b"}',                   # same key spelled with an escape
    b'{"name": "a", "\\u006e\\u0061\\u006d\\u0065": "b"}',
    b'{"a": {"x": 1, "\\u0078": 2}}',                       # nested object
    b'[{"a": 1}, {"b": 1, "b": 1}]',                        # inside a batch
])
def test_duplicate_keys_refused_even_when_escaped(data):
    with pytest.raises(McpParseError, match="duplicate") as ei:
        strict_loads(data)
    assert ei.value.code == PARSE_ERROR


def test_distinct_keys_that_only_look_alike_pass():
    assert strict_loads(b'{"name": 1, "Name": 2, "name ": 3}') == {"name": 1, "Name": 2, "name ": 3}


@pytest.mark.parametrize("data", [
    b'{"a": "\xff"}', b'{"a": "\xc3"}', b'{"a": "\xed\xa0\x80"}',  # CESU surrogate bytes
    '{"a": "é"}'.encode("latin-1"), '{"a": 1}'.encode("utf-16"),
])
def test_non_utf8_refused(data):
    with pytest.raises(McpParseError) as ei:
        strict_loads(data)
    assert ei.value.code == PARSE_ERROR


def test_utf8_bom_refused_bytes_and_str():
    with pytest.raises(McpParseError, match="byte order mark"):
        strict_loads(b'\xef\xbb\xbf{"a": 1}')
    with pytest.raises(McpParseError, match="byte order mark"):
        strict_loads('\ufeff{"a": 1}')
    # a BOM character inside a string value is just a character
    assert strict_loads('{"a": "\ufeff"}'.encode()) == {"a": "\ufeff"}


@pytest.mark.parametrize("data", [
    b'{"a": NaN}', b'{"a": Infinity}', b'{"a": -Infinity}', b"[NaN]",
    b'{"a": 1e999}', b'{"a": -1e400}',                      # overflow to inf: not representable JSON
])
def test_non_finite_numbers_refused(data):
    with pytest.raises(McpParseError) as ei:
        strict_loads(data)
    assert ei.value.code == PARSE_ERROR


def test_large_but_finite_numbers_pass():
    assert strict_loads(b"[1e308, -1.5e-300, 123456789012345678901234567890]")[2] == 123456789012345678901234567890


@pytest.mark.parametrize("data", [
    b'{"a": "\\ud800"}', b'{"a": "\\udfff x"}', b'{"\\ud800": 1}', b'["ok", ["\\udc00"]]',
    b'{"a": "\\ude00\\ud83d"}',                              # reversed pair = two lone halves
])
def test_lone_surrogates_refused(data):
    with pytest.raises(McpParseError, match="surrogate"):
        strict_loads(data)


def test_escaped_surrogate_pair_is_a_real_character():
    assert strict_loads(b'{"a": "\\ud83d\\ude00"}') == {"a": "\U0001F600"}


def test_depth_limit():
    ok = "[" * mcpwire.MAX_DEPTH + "]" * mcpwire.MAX_DEPTH
    strict_loads(ok)
    too_deep = "[" * (mcpwire.MAX_DEPTH + 1) + "]" * (mcpwire.MAX_DEPTH + 1)
    with pytest.raises(McpParseError, match="deeper"):
        strict_loads(too_deep)
    nested = '{"a":' * (mcpwire.MAX_DEPTH + 1) + "1" + "}" * (mcpwire.MAX_DEPTH + 1)
    with pytest.raises(McpParseError):
        strict_loads(nested)


def test_extreme_depth_does_not_crash():
    for n in (10_000, 200_000):
        with pytest.raises(McpParseError) as ei:
            strict_loads("[" * n + "]" * n)
        assert ei.value.code == PARSE_ERROR


def test_huge_integer_literal_refused_not_crash():
    with pytest.raises(McpParseError):
        strict_loads(b"[" + b"9" * 10_000 + b"]")


# --- parse_body / parse_message ----------------------------------------------------------

def test_tools_call_parsed():
    p = parse_body(body(req(params={"name": "query_sql", "arguments": {"sql": "select 1"}, "_meta": META})))
    assert not p.batch and len(p.messages) == 1
    m = p.messages[0]
    assert (m.kind, m.id, m.method, m.tool_name, m.target) == ("request", 1, "tools/call", "query_sql", "query_sql")
    assert m.arguments == {"sql": "select 1"}
    assert m.protocol_version == "2026-07-28"


def test_other_message_kinds():
    n = parse_body(body({"jsonrpc": "2.0", "method": "notifications/initialized"})).messages[0]
    assert n.kind == "notification" and n.id is None
    r = parse_body(body({"jsonrpc": "2.0", "id": "s1", "result": {}})).messages[0]
    assert r.kind == "response" and r.id == "s1" and r.method is None
    e = parse_body(body({"jsonrpc": "2.0", "id": 3, "error": {"code": -1, "message": "x"}})).messages[0]
    assert e.kind == "error" and e.error == {"code": -1, "message": "x"}
    i = parse_body(body(req("initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                           "clientInfo": {"name": "c", "version": "1"}}))).messages[0]
    assert i.protocol_version == "2025-06-18"
    rr = parse_body(body(req("resources/read", {"uri": "file:///x"}))).messages[0]
    assert rr.target == "file:///x" and rr.tool_name is None
    pg = parse_body(body(req("prompts/get", {"name": "p", "arguments": {"a": "b"}}))).messages[0]
    assert pg.target == "p" and pg.arguments == {"a": "b"}
    assert parse_body(body({"jsonrpc": "2.0", "id": 1, "method": "ping"})).messages[0].params == {}


@pytest.mark.parametrize("obj", [
    1, "x", None, True, {}, {"id": 1, "method": "ping"},                        # no jsonrpc
    {"jsonrpc": "1.0", "id": 1, "method": "ping"}, {"jsonrpc": 2.0, "id": 1, "method": "ping"},
    {"jsonrpc": "2.0", "id": 1}, {"jsonrpc": "2.0", "id": 1, "result": 1, "error": {"code": 1, "message": "m"}},
    {"jsonrpc": "2.0", "result": {}},                                           # response without id
    {"jsonrpc": "2.0", "id": 1, "method": ""}, {"jsonrpc": "2.0", "id": 1, "method": 5},
    {"jsonrpc": "2.0", "id": 1, "method": ["tools/call"]},
    {"jsonrpc": "2.0", "id": 1, "method": "ping", "result": {}},
    {"jsonrpc": "2.0", "id": 1, "error": "boom"}, {"jsonrpc": "2.0", "id": 1, "error": {"code": "1", "message": "m"}},
])
def test_non_jsonrpc_is_invalid_request(obj):
    assert code_of(body(obj)) == INVALID_REQUEST


@pytest.mark.parametrize("bad_id", [True, False, 1.5, 1.0, None, [1], {"a": 1}])
def test_request_id_types_refused(bad_id):
    assert code_of(body(req("ping", {}, msg_id=bad_id))) == INVALID_REQUEST


@pytest.mark.parametrize("good_id", [0, -1, 2**53, "", "abc", "1"])
def test_request_id_types_accepted(good_id):
    assert parse_body(body(req("ping", {}, msg_id=good_id))).messages[0].id == good_id


def test_error_carries_the_valid_id_back():
    with pytest.raises(McpParseError) as ei:
        parse_body(body(req("Tools/call", msg_id="abc")))
    assert ei.value.msg_id == "abc"
    with pytest.raises(McpParseError) as ei:
        parse_body(body(req("ping", {}, msg_id=True)))
    assert ei.value.msg_id is None   # a bool is not an id we may echo


@pytest.mark.parametrize("method", [
    "Tools/call", "TOOLS/CALL", "tools/call ", " tools/call", "tools/call\n", "tools/call\u0000",
    "tools//call", "tools/Call", "tools\\/call-", "tool/call", "tools/call/", "shell/exec", "rpc.discover",
    "tools/\u0441all",                                           # Cyrillic 'с'
    "sampling/createMessage",                                    # server->client method sent by a client
])
def test_unknown_or_wrongly_cased_methods_refused(method):
    assert code_of(body(req(method))) == METHOD_NOT_FOUND


def test_unknown_notification_refused_but_known_passes():
    assert code_of(body({"jsonrpc": "2.0", "method": "notifications/evil"})) == METHOD_NOT_FOUND
    assert code_of(body({"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "x"}})) == METHOD_NOT_FOUND
    parse_body(body({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}}))


def test_server_direction_accepts_server_requests():
    m = parse_message({"jsonrpc": "2.0", "id": 1, "method": "sampling/createMessage", "params": {}},
                      direction="s2c")
    assert m.method == "sampling/createMessage"


def test_unicode_escaped_method_is_the_real_method():
    raw = b'{"jsonrpc":"2.0","id":1,"method":"tools\\/c\\u0061ll","params":{"n\\u0061me":"run_c\\u006fmmand",' \
          b'"arguments":{"c\\u006fmmand":"id"}}}'
    m = parse_body(raw).messages[0]
    assert m.method == "tools/call" and m.tool_name == "run_command" and m.arguments == {"command": "id"}
    # ...and is treated as that method: an escaped *wrong-cased* method is still refused
    assert code_of(b'{"jsonrpc":"2.0","id":1,"method":"\\u0054ools/call","params":{"name":"x"}}') == METHOD_NOT_FOUND


@pytest.mark.parametrize("params", [
    {"name": "query_sql", "arguments": "{\"sql\": \"drop table x\"}"},
    {"name": "query_sql", "arguments": ["select 1"]},
    {"name": "query_sql", "arguments": None},
    {"name": 5, "arguments": {}},
    {"name": None},
    {"arguments": {"sql": "x"}},
    {"name": ["query_sql"], "arguments": {}},
    {"name": "query_sql", "_meta": "x"},
])
def test_bad_tools_call_params_are_invalid_params(params):
    assert code_of(body(req("tools/call", params))) == INVALID_PARAMS


def test_params_must_be_an_object():
    assert code_of(body(req("ping", ["a"]))) == INVALID_PARAMS
    assert code_of(body(req("tools/call", "x"))) == INVALID_PARAMS


@pytest.mark.parametrize("method,params", [
    ("resources/read", {"uri": 1}), ("resources/read", {}), ("prompts/get", {"name": {"a": 1}}),
    ("prompts/get", {"name": "p", "arguments": "x"}),
])
def test_name_bearing_methods_need_string_targets(method, params):
    assert code_of(body(req(method, params))) == INVALID_PARAMS


def test_batches():
    assert code_of(b"[]") == INVALID_REQUEST
    ok = parse_body(body([req("ping", {}, 1), {"jsonrpc": "2.0", "method": "notifications/initialized"},
                          req("tools/list", {}, 2)]))
    assert ok.batch and [m.method for m in ok.messages] == ["ping", "notifications/initialized", "tools/list"]
    single = parse_body(body([req("ping", {}, 1)]))
    assert single.batch and len(single.messages) == 1
    # mixed: one bad element refuses the whole batch
    assert code_of(body([req("ping", {}, 1), req("Tools/call", msg_id=2)])) == METHOD_NOT_FOUND
    assert code_of(body([req("ping", {}, 1), 5])) == INVALID_REQUEST
    assert code_of(body([req("ping", {}, 1), [req("ping", {}, 2)]])) == INVALID_REQUEST   # nested batch
    assert code_of(body([req("ping", {}, 1), req("tools/call", {"name": "x", "arguments": "s"}, 2)])) == INVALID_PARAMS


def test_message_properties_are_defensive():
    m = mcpwire.Message(kind="request", raw={"params": {"arguments": "s", "_meta": 1}}, id=1, method="tools/call")
    assert m.arguments == {} and m.meta == {} and m.tool_name is None and m.protocol_version is None


def test_jsonrpc_error_shape():
    assert mcpwire.jsonrpc_error(1, -32600, "m") == {"jsonrpc": "2.0", "id": 1, "error": {"code": -32600, "message": "m"}}
    assert mcpwire.jsonrpc_error(None, 1, "m", {"x": 1})["error"]["data"] == {"x": 1}


# --- routing headers (2026-07-28) --------------------------------------------------------

def modern_call(name="query_sql", arguments=None, method="tools/call", msg_id=1):
    params = {"_meta": dict(META)}
    key = mcpwire.NAME_BEARING_METHODS.get(method)
    if key:
        params[key] = name
    if method == "tools/call":
        params["arguments"] = {"sql": "select 1"} if arguments is None else arguments
    return {"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params}


def good_headers(obj) -> list[tuple[str, str]]:
    h = [("MCP-Protocol-Version", "2026-07-28"), ("Mcp-Method", obj["method"])]
    key = mcpwire.NAME_BEARING_METHODS.get(obj["method"])
    if key:
        h.append(("Mcp-Name", sdk.encode_header_value(obj["params"][key])))
    return h


def gw_routing(fields, obj) -> McpParseError | None:
    return check_routing_headers(fields, parse_body(body(obj)))


def sdk_routing(fields, obj):
    if sdk.find_duplicated_routing_header(fields):
        return "duplicate"
    r = sdk.classify_inbound_request(obj, headers={k.lower(): v for k, v in fields})
    return r if isinstance(r, sdk.InboundLadderRejection) else None


@pytest.mark.parametrize("obj", [
    modern_call(), modern_call("a tool with spaces "), modern_call("café"), modern_call("x?=base64?y"),
    modern_call("file:///tmp/x", method="resources/read"), modern_call("p", method="prompts/get"),
    modern_call(method="tools/list"), modern_call(method="server/discover"),
])
def test_matching_routing_headers_pass_like_the_sdk(obj):
    h = good_headers(obj)
    assert gw_routing(h, obj) is None
    assert sdk_routing(h, obj) is None


def _mutations(obj):
    h = good_headers(obj)
    yield "method differs", [(k, "tools/list") if k == "Mcp-Method" else (k, v) for k, v in h]
    yield "method case", [(k, "Tools/call") if k == "Mcp-Method" else (k, v) for k, v in h]
    yield "method whitespace", [(k, "tools/call ") if k == "Mcp-Method" else (k, v) for k, v in h]
    yield "method missing", [(k, v) for k, v in h if k != "Mcp-Method"]
    yield "name differs", [(k, "read_file") if k == "Mcp-Name" else (k, v) for k, v in h]
    yield "name case", [(k, "Query_sql") if k == "Mcp-Name" else (k, v) for k, v in h]
    yield "name missing", [(k, v) for k, v in h if k != "Mcp-Name"]
    yield "name b64 of other", [(k, "=?base64?cmVhZF9maWxl?=") if k == "Mcp-Name" else (k, v) for k, v in h]
    yield "name bad b64", [(k, "=?base64?!!!?=") if k == "Mcp-Name" else (k, v) for k, v in h]
    yield "name non-canonical b64", [(k, "=?base64?cXVlcnlfc3FM?=") if k == "Mcp-Name" else (k, v) for k, v in h]
    yield "version differs", [(k, "2025-11-25") if k == "MCP-Protocol-Version" else (k, v) for k, v in h]
    yield "version missing", [(k, v) for k, v in h if k != "MCP-Protocol-Version"]
    yield "dup method", h + [("mcp-method", "tools/call")]
    yield "dup method other", h + [("MCP-METHOD", "tools/list")]
    yield "dup name", h + [("mcp-name", "query_sql")]
    yield "dup version", h + [("mcp-protocol-version", "2026-07-28")]


@pytest.mark.parametrize("label,fields", list(_mutations(modern_call())))
def test_routing_header_attacks_refused_like_the_sdk(label, fields):
    obj = modern_call()
    err = gw_routing(fields, obj)
    assert err is not None and err.code == HEADER_MISMATCH, label
    assert err.msg_id in (1, None)
    assert sdk_routing(fields, obj) is not None, label   # the SDK server refuses the same input


def test_name_header_base64_sentinel_matches():
    obj = modern_call("query_sql")
    h = [("MCP-Protocol-Version", "2026-07-28"), ("Mcp-Method", "tools/call"),
         ("Mcp-Name", "=?base64?" + base64.b64encode(b"query_sql").decode() + "?=")]
    assert gw_routing(h, obj) is None and sdk_routing(h, obj) is None
    assert decode_header_value("=?base64?Y2Fmw6k=?=") == "café"
    assert decode_header_value("=?base64?/w==?=") is None               # not UTF-8
    assert decode_header_value("=?base64?Y2Fmw6k?=") is None             # missing padding
    assert decode_header_value("plain") == "plain" and decode_header_value(None) is None
    for v in ("plain", "=?base64?Y2Fmw6k=?=", "=?base64?/w==?=", "=?base64?x?=", "=?base64??="):
        assert decode_header_value(v) == sdk.decode_header_value(v), v


def test_no_routing_headers_is_handshake_era_and_passes():
    obj = req("tools/call")
    assert check_routing_headers([("Content-Type", "application/json")], parse_body(body(obj))) is None
    assert check_routing_headers([("MCP-Protocol-Version", "2025-06-18")], parse_body(body(obj))) is None


def test_duplicate_version_header_refused_even_without_routing_headers():
    err = check_routing_headers([("MCP-Protocol-Version", "2025-06-18"), ("mcp-protocol-version", "2025-06-18")],
                                parse_body(body(req("ping", {}))))
    assert err is not None and err.code == HEADER_MISMATCH


def test_routing_headers_on_a_batch_refused():
    p = parse_body(body([req("ping", {}, 1), req("tools/list", {}, 2)]))
    assert check_routing_headers([("Mcp-Method", "ping")], p).code == HEADER_MISMATCH


def test_name_header_on_a_method_that_names_nothing_refused():
    obj = modern_call(method="tools/list")
    err = gw_routing(good_headers(obj) + [("Mcp-Name", "x")], obj)
    assert err.code == HEADER_MISMATCH


def test_name_header_alone_refused():
    # Mcp-Name without Mcp-Method: no header may steer the upstream unchecked
    obj = modern_call()
    assert gw_routing([("Mcp-Name", "query_sql")], obj).code == HEADER_MISMATCH


def test_param_headers_only_on_tools_call():
    obj = modern_call(method="tools/list")
    assert gw_routing(good_headers(obj) + [("Mcp-Param-X", "1")], obj).code == HEADER_MISMATCH


def test_duplicate_param_header_refused_case_insensitively():
    obj = modern_call(arguments={"region": "eu"})
    fields = good_headers(obj) + [("Mcp-Param-Region", "eu"), ("mcp-param-region", "us")]
    assert gw_routing(fields, obj).code == HEADER_MISMATCH


# --- Mcp-Param-* against the tool schema ------------------------------------------------

SCHEMA = {"type": "object", "properties": {
    "region": {"type": "string", "x-mcp-header": "Region"},
    "limit": {"type": "integer", "x-mcp-header": "Limit"},
    "dry": {"type": "boolean", "x-mcp-header": "Dry-Run"},
    "target": {"type": "object", "properties": {"env": {"type": "string", "x-mcp-header": "Env"}}},
    "sql": {"type": "string"},
}}
# an annotation off the pure `properties` chain: the SDK treats the whole schema as invalid
BAD_SCHEMA = {"type": "object", "properties": {
    **SCHEMA["properties"], "alt": {"anyOf": [{"type": "string", "x-mcp-header": "Alt"}]}}}


def test_param_header_map_matches_sdk():
    assert sdk.find_invalid_x_mcp_header(SCHEMA) is None
    assert sdk.find_invalid_x_mcp_header(BAD_SCHEMA) is not None
    assert param_header_map(BAD_SCHEMA) == param_header_map(SCHEMA)
    m = param_header_map(SCHEMA)
    assert m == {"mcp-param-region": ("region",), "mcp-param-limit": ("limit",),
                 "mcp-param-dry-run": ("dry",), "mcp-param-env": ("target", "env")}
    assert {("mcp-param-" + t.lower()): p for p, t in sdk.x_mcp_header_map(SCHEMA).items()} == m
    assert param_header_map(None) == {} and param_header_map({"properties": []}) == {}


def gw_params(args, headers, schema=SCHEMA):
    msg = parse_body(body(modern_call(arguments=args))).messages[0]
    return check_param_headers(list(headers.items()), msg, None if schema is None else param_header_map(schema))


def sdk_params(args, headers, schema=SCHEMA):
    return sdk.validate_mcp_param_headers(schema, args, headers)


ARGS = {"region": "eu-west", "limit": 10, "dry": True, "target": {"env": "prod"}, "sql": "select 1"}


def legit_headers(args=ARGS):
    return sdk.mcp_param_headers(sdk.x_mcp_header_map(SCHEMA), args)


@pytest.mark.parametrize("args", [
    ARGS, {"sql": "x"}, {"region": "Zürich", "sql": "x"}, {"region": " padded ", "limit": 0, "dry": False},
    {"region": "=?base64?looks-like-sentinel?=", "limit": -5}, {"target": {"env": "dev"}},
])
def test_legit_param_headers_pass_like_the_sdk(args):
    h = legit_headers(args)
    assert gw_params(args, h) is None
    assert sdk_params(args, h) is None


@pytest.mark.parametrize("label,args,headers", [
    ("value differs", ARGS, {**legit_headers(), "Mcp-Param-Region": "us-east"}),
    ("value case", ARGS, {**legit_headers(), "Mcp-Param-Region": "EU-WEST"}),
    ("int differs", ARGS, {**legit_headers(), "Mcp-Param-Limit": "1000"}),
    ("bool differs", ARGS, {**legit_headers(), "Mcp-Param-Dry-Run": "false"}),
    ("bool spelled", ARGS, {**legit_headers(), "Mcp-Param-Dry-Run": "True"}),
    ("nested differs", ARGS, {**legit_headers(), "Mcp-Param-Env": "dev"}),
    ("b64 differs", ARGS, {**legit_headers(), "Mcp-Param-Region": "=?base64?dXMtZWFzdA==?="}),
    ("b64 malformed", ARGS, {**legit_headers(), "Mcp-Param-Region": "=?base64?%%?="}),
    ("header without argument", {"sql": "x"}, {"Mcp-Param-Region": "eu-west"}),
    ("header for non-scalar", {"region": ["eu"], "sql": "x"}, {"Mcp-Param-Region": "eu"}),
    ("header for null", {"region": None, "sql": "x"}, {"Mcp-Param-Region": "None"}),
])
def test_param_header_attacks_refused_like_the_sdk(label, args, headers):
    err = gw_params(args, headers)
    assert err is not None and err.code == HEADER_MISMATCH, label
    assert sdk_params(args, headers) is not None, label


def test_undeclared_param_header_refused():
    # stricter than the SDK (which ignores it): nothing the gateway did not check may reach a router
    h = {**legit_headers(), "Mcp-Param-Sql": "select 1"}
    assert gw_params(ARGS, h).code == HEADER_MISMATCH
    h = {**legit_headers(), "Mcp-Param-Alt": "x"}        # annotation off the properties chain
    assert gw_params({**ARGS, "alt": "x"}, h, schema=BAD_SCHEMA).code == HEADER_MISMATCH
    assert gw_params(ARGS, legit_headers(), schema=BAD_SCHEMA) is None


def test_unknown_schema_with_param_headers_refused_without_headers_passes():
    assert gw_params(ARGS, legit_headers(), schema=None).code == HEADER_MISMATCH
    assert gw_params(ARGS, {}, schema=None) is None
    assert gw_params(ARGS, {"Mcp-Method": "tools/call"}, schema=None) is None


def test_param_header_names_are_case_insensitive():
    h = {k.upper(): v for k, v in legit_headers().items()}
    assert gw_params(ARGS, h) is None
    h = {k.lower(): v for k, v in legit_headers().items()}
    assert gw_params(ARGS, h) is None


def test_missing_param_header_left_to_the_upstream():
    # omitted header: nothing to route on; the modern upstream refuses it itself
    assert gw_params(ARGS, {}) is None
    assert sdk_params(ARGS, {}) is not None


def test_integral_float_argument_matches_the_sdk_client_rendering():
    # the SDK client renders 10.0 as "10.0"; the SDK server compares integers numerically
    args = {**ARGS, "limit": 10.0}
    h = legit_headers(args)
    assert sdk_params(args, h) is None
    assert gw_params(args, h) is None
    assert gw_params(args, {**h, "Mcp-Param-Limit": "10"}) is None
    assert gw_params(args, {**h, "Mcp-Param-Limit": "10.5"}).code == HEADER_MISMATCH
    assert gw_params(args, {**h, "Mcp-Param-Limit": "11"}).code == HEADER_MISMATCH
    assert gw_params(args, {**h, "Mcp-Param-Limit": "1e1"}).code == HEADER_MISMATCH
    assert gw_params(args, {**h, "Mcp-Param-Limit": "9" * 5000}).code == HEADER_MISMATCH
    assert gw_params(ARGS, {**legit_headers(), "Mcp-Param-Limit": "10.00"}) is None     # int body, SDK agrees
    assert sdk_params(ARGS, {**legit_headers(), "Mcp-Param-Limit": "10.00"}) is None
    # a string argument compares as a string: "10.0" does not mirror "10"
    assert gw_params({**ARGS, "region": "10"}, {**legit_headers({**ARGS, "region": "10"}),
                                                 "Mcp-Param-Region": "10.0"}).code == HEADER_MISMATCH


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20)


@given(_json_values)
def test_dumps_is_the_compact_stdlib_serialisation_read_back(obj):
    """mcpwire.dumps (orjson, stdlib fallback) decodes to the same value as the stdlib's compact
    output; strings are escaped identically (redaction searches the text for escaped secrets)."""
    out = mcpwire.dumps(obj)
    assert json.loads(out) == json.loads(json.dumps(obj, ensure_ascii=False, separators=(",", ":")))


def test_dumps_escapes_strings_like_the_stdlib():
    s = "".join(chr(i) for i in range(0x80)) + "é\u2028\u2029\U0001f600"
    assert mcpwire.dumps({"k": s, "big": 2**70}) == json.dumps({"k": s, "big": 2**70}, ensure_ascii=False,
                                                                separators=(",", ":")).encode()


def test_sse_parser_pending_says_whether_part_of_an_event_is_buffered():
    p = mcpwire.SSEParser()
    assert not p.pending
    assert p.feed(b"event: message\ndata: {}\n\n") and not p.pending
    assert p.feed(b"data: {\"a\"") == [] and p.pending
    assert p.feed(b":1}\n\n") and not p.pending


def _outcome(fn, data):
    try:
        v = fn(data)
    except McpParseError as e:
        return ("refused", e.code)
    return ("ok", json.dumps(v, sort_keys=True), repr(v))


_keys = st.sampled_from(["a", "b", "\\u0061", "a:b", "\\u003a", "\\u003A", "é", "\\ud83d\\ude00", "\\ud800"])
_atoms = st.sampled_from(["1", "-0", "1.5e3", "1e400", "18446744073709551616", "-9223372036854775809",
                          "123456789012345678901234567890", "0.1", "true", "null", "NaN", '"x:y"', '"\\u003a"',
                          '"\\ud800"', '"\\ud83d\\ude00"', '"\\u0000"', "[]", "{}"])


@st.composite
def _json_texts(draw, depth=0):
    if depth > 3 or draw(st.booleans()):
        return draw(_atoms)
    if draw(st.booleans()):
        items = draw(st.lists(_json_texts(depth + 1), max_size=3))
        return "[" + ",".join(items) + "]"
    members = draw(st.lists(st.tuples(_keys, _json_texts(depth + 1)), max_size=3))
    return "{" + ",".join(f'"{k}":{v}' for k, v in members) + "}"


@given(_json_texts(), st.sampled_from(["", " ", "\n"]), st.sampled_from(["bytes", "str"]))
def test_fast_strict_loads_decides_exactly_like_the_stdlib_path(text, ws, kind):
    """The orjson fast path accepts, refuses and returns exactly what the stdlib path does:
    duplicate keys (also spelled with escapes or colons in keys), big integers, lone
    surrogates, constants, infinities."""
    from addons.core.mcpwire import _stdlib_strict_loads
    data = (ws + text + ws)
    data = data.encode() if kind == "bytes" else data
    assert _outcome(strict_loads, data) == _outcome(_stdlib_strict_loads, data)


@pytest.mark.parametrize("depth", [62, 63, 64, 65, 200, 2000])
@pytest.mark.parametrize("shape", ["[", '{"k":'])
def test_fast_strict_loads_depth_limit_matches_the_stdlib_path(depth, shape):
    from addons.core.mcpwire import _stdlib_strict_loads
    close = "]" if shape == "[" else "}"
    data = (shape * depth + "1" + close * depth).encode()
    assert _outcome(strict_loads, data) == _outcome(_stdlib_strict_loads, data)
