"""Parser differentials: escapes, duplicate keys, casing, whitespace, odd JSON. The gateway
decides on what the upstream will read, or refuses what two parsers could read differently."""
from __future__ import annotations

import json

import pytest

from tests.adversarial.conftest import call, jsonrpc_error

DENIED, PARSE, INVALID_REQ, NO_METHOD, BAD_PARAMS = -32030, -32700, -32600, -32601, -32602

DUMPED = json.dumps(call("run_command", {"command": "id"}))

# (case, raw body, HTTP status, JSON-RPC code)
CASES = [
    ("unicode-escaped method", DUMPED.replace('"tools/call"', '"\\u0074ools/call"'), 200, DENIED),
    ("unicode-escaped tool name", DUMPED.replace('"run_command"', '"run_\\u0063ommand"'), 200, DENIED),
    ("all-escaped tool name", DUMPED.replace('"run_command"', '"' + "".join(f"\\u{ord(c):04x}" for c in "run_command") + '"'),
     200, DENIED),
    ("escaped key 'name'", DUMPED.replace('"name"', '"n\\u0061me"'), 200, DENIED),
    ("duplicate name, allowed last",
     '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"run_command","name":"get_customer","arguments":{"id":1}}}',
     400, PARSE),
    ("duplicate name, allowed first",
     '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_customer","name":"run_command","arguments":{"command":"id"}}}',
     400, PARSE),
    ("duplicate method", '{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call","params":{"name":"run_command","arguments":{"command":"id"}}}',
     400, PARSE),
    ("duplicate arguments", '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"query_sql","arguments":{"sql":"SELECT 1"},"arguments":{"sql":"DROP TABLE customers"}}}',
     400, PARSE),
    ("duplicate key inside arguments", '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"query_sql","arguments":{"sql":"SELECT 1","sql":"DROP TABLE customers"}}}',
     400, PARSE),
    ("duplicate key via escape", '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"query_sql","arguments":{"sql":"SELECT 1","s\\u0071l":"DROP TABLE customers"}}}',
     400, PARSE),
    ("method casing", DUMPED.replace('"tools/call"', '"Tools/Call"'), 404, NO_METHOD),
    ("method with trailing space", DUMPED.replace('"tools/call"', '"tools/call "'), 404, NO_METHOD),
    ("tool name casing", DUMPED.replace('"run_command"', '"Run_Command"'), 200, DENIED),
    ("allowed tool name with trailing space", json.dumps(call("get_customer ", {"id": 1})), 200, DENIED),
    ("allowed tool name with zero-width space", json.dumps(call("get\u200bcustomer", {"id": 1})), 200, DENIED),
    ("allowed tool name, fullwidth letters", json.dumps(call("ｇｅｔ_customer", {"id": 1})), 200, DENIED),
    ("arguments as a JSON string", json.dumps({**call("query_sql"), "params": {"name": "query_sql", "arguments": '{"sql": "DROP TABLE customers"}'}}),
     400, BAD_PARAMS),
    ("arguments as a list", json.dumps({**call("query_sql"), "params": {"name": "query_sql", "arguments": ["DROP TABLE customers"]}}),
     400, BAD_PARAMS),
    ("name as a list", json.dumps({**call("x"), "params": {"name": ["get_customer", "run_command"], "arguments": {}}}), 400, BAD_PARAMS),
    ("UTF-8 byte order mark", "\ufeff" + DUMPED, 400, PARSE),
    ("lone surrogate in tool name", DUMPED.replace('"run_command"', '"get_customer\\ud800"'), 400, PARSE),
    ("NaN", '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_customer","arguments":{"id":NaN}}}', 400, PARSE),
    ("number overflowing to infinity", '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_customer","arguments":{"id":1e999}}}', 400, PARSE),
    ("nesting 200 deep", json.dumps(call("get_customer", {"id": 1, "x": json.loads("[" * 200 + "]" * 200)})), 400, PARSE),
    ("trailing garbage after the object", DUMPED + ' {"x": 1}', 400, PARSE),
    ("id is an object", json.dumps(call("get_customer", {"id": 1}, msg_id={"a": 1})), 400, INVALID_REQ),
    ("id is an array", json.dumps(call("get_customer", {"id": 1}, msg_id=[1])), 400, INVALID_REQ),
    ("id is a float", json.dumps(call("get_customer", {"id": 1}, msg_id=1.5)), 400, INVALID_REQ),
    ("jsonrpc version 1.0", DUMPED.replace('"2.0"', '"1.0"'), 400, INVALID_REQ),
    ("server-side method sent by the client", json.dumps({"jsonrpc": "2.0", "id": 1, "method": "sampling/createMessage",
                                                         "params": {"messages": [], "maxTokens": 1}}), 404, NO_METHOD),
]


@pytest.mark.parametrize("case,body,status,code", CASES, ids=[c[0] for c in CASES])
def test_refused_and_upstream_untouched(adv, upstream, case, body, status, code):
    r = adv.post(body.encode("utf-8", "surrogatepass"))
    assert r.status_code == status, (case, r.status_code, r.text)
    assert jsonrpc_error(r)["code"] == code, (case, r.text)
    upstream.nothing()


def test_non_utf8_body(adv, upstream):
    r = adv.post(DUMPED.replace("id", "\xe9").encode("latin-1"))
    assert r.status_code == 400 and jsonrpc_error(r)["code"] == PARSE
    upstream.nothing()


def test_utf16_body(adv, upstream):
    r = adv.post(DUMPED.encode("utf-16"), headers=adv.headers(content_type="application/json; charset=utf-16"))
    assert r.status_code == 400
    upstream.nothing()


def test_tools_call_as_a_notification(adv, upstream):
    """No id: a notification the server might still act on; policy decides it like a call."""
    body = {k: v for k, v in call("run_command", {"command": "touch /tmp/pwned"}).items() if k != "id"}
    r = adv.post(body)
    assert r.status_code in (202, 400, 404), r.text
    upstream.nothing()


def test_escaped_forms_of_an_allowed_call_still_work(adv, upstream):
    """Legitimate: escapes the upstream decodes to an allowed call are decided as that call."""
    r = adv.post(json.dumps(call("get_customer", {"id": 2})).replace('"get_customer"', '"get\\u005fcustomer"'))
    assert r.status_code == 200 and "result" in r.text, r.text
    assert "get_customer" in upstream.bodies() or "get\\u005fcustomer" in upstream.bodies()
