"""Fuzzing the pure parts the gateway decides with (hypothesis): whatever the input, the
MCP parser either parses or raises its own error, the policy never lets an unlisted tool
through, the blocklist scan terminates within its bounds, and a response that cannot be
parsed is never passed on raw when masking is required.

Quick in the suite; `./run.sh fuzz` runs the same properties with 20,000 examples each."""
from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings, strategies as st

from addons.core import mcpwire

from addons.hooks import responses

from addons.core.shell import guard as shellguard
from addons.core.policy.rules import evaluate, load_policy
from addons.core.record import BastionRecord, Identity
from tests.fuzzing import examples

ROOT = Path(__file__).resolve().parents[2]
POLICY = load_policy(ROOT / "rules")
ROLES = st.lists(st.sampled_from(["analyst", "dev", "dba", "approver", "nobody", "ANALYST", ""]), max_size=3)

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63), st.floats(allow_nan=False,
                                                                                       allow_infinity=False),
                         st.text(max_size=40))
json_values = st.recursive(json_scalars, lambda c: st.one_of(st.lists(c, max_size=5),
                                                             st.dictionaries(st.text(max_size=10), c, max_size=5)),
                           max_leaves=30)
methods = st.one_of(st.sampled_from(sorted(mcpwire.CLIENT_REQUEST_METHODS | mcpwire.CLIENT_NOTIFICATION_METHODS)),
                    st.text(max_size=20))
messages = st.fixed_dictionaries({"jsonrpc": st.sampled_from(["2.0", "1.0", 2]), "method": methods},
                                 optional={"id": st.one_of(st.integers(), st.text(max_size=8), st.none(), json_values),
                                           "params": json_values})


@settings(max_examples=examples(300))
@given(st.binary(max_size=2000))
def test_parser_on_arbitrary_bytes(data):
    try:
        parsed = mcpwire.parse_body(data)
    except mcpwire.McpParseError as e:
        assert e.code in (mcpwire.PARSE_ERROR, mcpwire.INVALID_REQUEST, mcpwire.INVALID_PARAMS, mcpwire.METHOD_NOT_FOUND)
        return
    assert parsed.messages


@settings(max_examples=examples(300))
@given(st.one_of(messages, st.lists(messages, max_size=4)))
def test_parser_on_structured_messages(obj):
    data = json.dumps(obj).encode()
    try:
        parsed = mcpwire.parse_body(data)
    except mcpwire.McpParseError:
        return
    for m in parsed.messages:               # what the policy sees is what the upstream reads
        assert m.method is None or isinstance(m.method, str)
        if m.kind == "request":
            assert isinstance(m.id, (int, str)) and not isinstance(m.id, bool)


@settings(max_examples=examples(300))
@given(st.text(max_size=30), json_values, ROLES, st.text(max_size=10))
def test_policy_default_deny_for_unlisted_tools(tool, args, roles, sub):
    known = {"query_sql", "get_customer", "stream_report", "run_command", "read_file", "launch_container"}
    msg = mcpwire.parse_message({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                             "params": {"name": tool, "arguments": args if isinstance(args, dict) else {}}})
    d = evaluate(POLICY, Identity(sub or "x", tuple(roles)), "demo", msg)
    assert d.action in ("allow", "deny", "approve")
    if tool not in known:
        assert d.action == "deny"


@settings(max_examples=examples(300))
@given(st.text(max_size=300))
def test_blocklist_scan_terminates_and_bounds_views(s):
    assert len(shellguard.views(s)) <= shellguard.MAX_VIEWS
    shellguard.scan({"command": s}, POLICY.blocklist)
    info = shellguard.shell_info(s)
    assert isinstance(info.programs, tuple)


@settings(max_examples=examples(300))
@given(st.binary(max_size=500), st.booleans())
def test_unparsable_response_never_passes_raw_when_masking_required(body, planted):
    secret = b"123-45-6789"
    data = body + (secret if planted else b"")
    rec = BastionRecord(mask_required=True)
    rec.response_transforms.append(lambda m: m)
    try:
        out = responses.transform_json_body(rec, data)
    except (responses.TransformError, mcpwire.McpParseError):
        return                                  # the addon replaces the response with an error
    # it parsed as JSON-RPC: only then may it go on (and the masking transform ran on it)
    json.loads(data)
    assert out is None or isinstance(out, bytes)
