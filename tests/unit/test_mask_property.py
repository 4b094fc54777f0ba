"""Property tests: whatever the upstream sends and however the stream is chunked, the
caller gets valid JSON-RPC and none of the seeded secrets (hypothesis)."""
from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings, strategies as st

from addons.core import mcpwire

from addons.hooks import responses
from addons.core.masking.engine import DETECTORS, Profile, Rule, load_masking, mask_message
from addons.hooks.masking import MaskTransform
from addons.core.record import BastionRecord
from tests.fuzzing import examples

KEY = b"property-test-key-0123456789abcdef"


def luhn_complete(prefix: str) -> str:
    digits = [int(c) for c in prefix]
    for check in range(10):
        total = 0
        for i, d in enumerate(reversed(digits + [check])):
            if i % 2:
                d *= 2
                d -= 9 if d > 9 else 0
            total += d
        if total % 10 == 0:
            return prefix + str(check)
    raise AssertionError


cards = st.builds(lambda body: luhn_complete("4" + body), st.text("0123456789", min_size=14, max_size=14))
ssns = st.builds(lambda a, g, s: f"{a:03d}-{g:02d}-{s:04d}",
                 st.integers(1, 665), st.integers(1, 99), st.integers(1, 9999))
emails = st.builds(lambda u, d: f"{u}@{d}.com", st.text("abcdefghij.", min_size=1, max_size=8).filter(
    lambda u: u[0] != "." and u[-1] != "."), st.text("abcdefghij", min_size=2, max_size=8))
aws = st.builds(lambda s: "AKIA" + s, st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", min_size=16, max_size=16))
ghp = st.builds(lambda s: "ghp_" + s, st.text("abcdefABCDEF0123456789", min_size=36, max_size=36))
opaque = st.builds(lambda s: "tok_" + s, st.text("abcdef0123456789", min_size=10, max_size=16))
# a text secret: the detector must find it in prose
text_secret = st.one_of(cards, ssns, emails, aws, ghp)
filler = st.text(st.sampled_from(list("abcdefghijklmnopqrstuvwxyz ,.;!?ABCXYZ")), max_size=30)
keys = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8).filter(
    lambda k: not any(w in k for w in ("ssn", "card", "token", "secret", "pass", "key", "mail", "cred", "iban",
                                       "pan", "cvv", "cvc", "pwd")))


@st.composite
def prose(draw):
    secrets = draw(st.lists(text_secret, max_size=3))
    parts = [draw(filler)]
    for s in secrets:
        parts += [" ", s, " ", draw(filler)]
    return "".join(parts), secrets


@st.composite
def documents(draw, depth=0):
    """A JSON document with secrets under masked field names and inside prose."""
    secrets: list[str] = []
    doc: dict = {}
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["prose", "ssn", "api_token", "card_number", "nested", "list", "plain"]))
        k = draw(keys)
        if kind == "prose":
            text, found = draw(prose())
            doc[k] = text
            secrets += found
        elif kind in ("ssn", "card_number"):
            v = draw(ssns if kind == "ssn" else cards)
            doc[kind] = v
            secrets.append(v)
        elif kind == "api_token":
            v = draw(opaque)
            doc.setdefault("billing", {})["api_token"] = v
            secrets.append(v)
        elif kind in ("nested", "list") and depth < 3:
            sub, found = draw(documents(depth + 1))
            doc[k] = sub if kind == "nested" else [sub, draw(st.integers())]
            secrets += found
        else:
            doc[k] = draw(st.one_of(st.integers(), st.booleans(), st.none(), filler))
    return doc, secrets


@st.composite
def messages(draw, msg_id):
    doc, secrets = draw(documents())
    form = draw(st.sampled_from(["structured", "json_text", "prose_text", "error", "notification", "resource"]))
    if form == "structured":
        msg = {"jsonrpc": "2.0", "id": msg_id, "result": {"content": [{"type": "text", "text": json.dumps(doc)}],
                                                          "structuredContent": doc}}
    elif form == "json_text":
        indent = draw(st.sampled_from([None, 2]))
        msg = {"jsonrpc": "2.0", "id": msg_id,
               "result": {"content": [{"type": "text", "text": json.dumps([doc], indent=indent)}]}}
    elif form == "prose_text":
        text, secrets = draw(prose())
        msg = {"jsonrpc": "2.0", "id": msg_id, "result": {"content": [{"type": "text", "text": text}]}}
    elif form == "error":
        text, found = draw(prose())
        secrets = secrets + found
        msg = {"jsonrpc": "2.0", "id": msg_id, "error": {"code": -32000, "message": text, "data": doc}}
    elif form == "resource":
        msg = {"jsonrpc": "2.0", "id": msg_id, "result": {"contents": [{"uri": "x:/", "text": json.dumps(doc)}]}}
    else:
        text, secrets = draw(prose())
        msg = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": text}}
    return msg, secrets


PROFILE = Profile("strict", [Rule("ids", "redact", fields=("ssn", "card_number")),
                             Rule("tok", "redact", paths=("$..api_token",))],
                  {d: "redact" for d in DETECTORS}, KEY)
SHIPPED = load_masking("rules", KEY)


def valid_jsonrpc(msg: dict) -> bool:
    if msg.get("jsonrpc") != "2.0":
        return False
    if "method" in msg:
        return isinstance(msg["method"], str)
    return ("result" in msg) != ("error" in msg) and "id" in msg


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages(1))
def test_masked_message_is_valid_and_leaks_nothing(case):
    msg, secrets = case
    before = json.dumps(msg)
    out, events = mask_message(PROFILE, msg)
    assert json.dumps(msg) == before                       # input untouched
    dumped = json.dumps(out, ensure_ascii=False)
    assert valid_jsonrpc(json.loads(dumped))
    for s in secrets:
        assert s not in dumped, s
    assert (out is msg) == (not events)
    for s in secrets:
        assert s not in repr(events)


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(messages(1), min_size=1, max_size=4), st.lists(st.integers(0, 10_000), max_size=12),
       st.sampled_from(["analyst", "dev", "auditor"]))
def test_sse_stream_any_chunking_valid_and_no_secret_survives(cases, cut_points, role):
    """The lead's incremental SSE parser + this masker: every chunking of the stream."""
    prof = SHIPPED.select("demo", "get_customer", [role])
    rec = BastionRecord(connection="demo", mask_required=True)
    rec.response_transforms.append(MaskTransform(rec, prof, {}))
    stream = b"".join(b"event: message\ndata: " + json.dumps(m).encode() + b"\n\n" for m, _ in cases)
    rw = responses.SSERewriter(rec, None, 1)
    out, prev = [], 0
    for c in sorted({c % (len(stream) + 1) for c in cut_points}) + [len(stream)]:
        out += rw(stream[prev:c])
        prev = c
    out += rw(b"")
    assert all(out)                  # an empty chunk would end a chunked body
    data = b"".join(out)
    text = data.decode("utf-8")
    events = [e for e in mcpwire.SSEParser().feed(data, final=True) if e.data]
    assert len(events) == len(cases)
    for e in events:
        assert valid_jsonrpc(mcpwire.strict_loads(e.data))
    for _, secrets in cases:
        for s in secrets:
            assert s not in text, s
