"""addons/hooks/responses.py: response transforms over JSON bodies and SSE streams, legacy endpoint
rewriting, and fail-closed replacement of what cannot be checked."""
from __future__ import annotations

import gzip
import json

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from addons.core.connections import ConnectionRegistry
from addons.core import mcpwire
from addons.hooks.connections import Router
from addons.hooks.failclosed import FailClosed
from addons.core.record import get_record
from addons.hooks.responses import (ResponseRewriter, SSERewriter, TransformError, readonly, transform_json_body,
                              transform_message)

REQ = {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "get_customer", "arguments": {"id": 1}}}
RESULT = {"jsonrpc": "2.0", "id": 5, "result": {"content": [{"type": "text", "text": "ssn 123-45-6789"}]}}


def mask(msg: dict) -> dict:
    """A masking-like transform: mutates in place, as real transforms may."""
    if isinstance(msg.get("result"), dict):
        for c in msg["result"].get("content", []):
            c["text"] = c["text"].replace("123-45-6789", "[MASKED:ssn]")
    return msg


def boom(msg: dict) -> dict:
    raise RuntimeError("transform failed")


@pytest.fixture
def rules(tmp_path):
    d = tmp_path / "rules"
    d.mkdir()
    (d / "connections.yaml").write_text(
        "connections:\n"
        "  demo:\n    upstream: http://127.0.0.1:9100/mcp\n"
        "  leg:\n    upstream: http://127.0.0.1:9200/sse\n    transport: sse\n")
    return d


@pytest.fixture
def rw(rules):
    reg = ConnectionRegistry()
    router, rewriter = FailClosed(Router(reg)), FailClosed(ResponseRewriter(reg))
    with taddons.context(router, rewriter) as tctx:
        tctx.configure(router, bastion_rules=str(rules))
        yield rewriter, router.wrapped


def mkflow(body: bytes, ctype="application/json", conn="demo", transforms=(), mask_required=False,
           headers=(), req=REQ, method="POST"):
    f = tflow.tflow(req=tutils.treq(method=method.encode(), path=f"/mcp/{conn}".encode(),
                                    content=json.dumps(req).encode() if req else b""))
    hdrs = [(b"content-type", ctype.encode())] if ctype else []
    hdrs += [(k.encode(), v.encode()) for k, v in headers]
    f.response = tutils.tresp(headers=http.Headers(hdrs), content=body)
    rec = get_record(f.metadata)
    rec.connection = conn
    if req:
        rec.messages = mcpwire.parse_body(json.dumps(req).encode()).messages
    rec.response_transforms = list(transforms)
    rec.mask_required = mask_required
    return f, rec


def is_gateway_error(f, msg_id=5) -> bool:
    body = json.loads(f.response.content)
    return (f.response.status_code == 200 and body["id"] == msg_id
            and body["error"]["code"] == mcpwire.INTERNAL_ERROR and "123-45" not in f.response.text)


# --- pure helpers -------------------------------------------------------------------------

def test_transform_json_body():
    rec = get_record({})
    assert transform_json_body(rec, json.dumps(RESULT).encode()) is None
    rec.response_transforms = [readonly(lambda m: m)]
    assert transform_json_body(rec, json.dumps(RESULT).encode()) is None
    rec.response_transforms.append(mask)
    out = json.loads(transform_json_body(rec, json.dumps(RESULT).encode()))
    assert out["result"]["content"][0]["text"] == "ssn [MASKED:ssn]"
    batch = json.loads(transform_json_body(rec, json.dumps([RESULT, RESULT]).encode()))
    assert isinstance(batch, list) and all("MASKED" in m["result"]["content"][0]["text"] for m in batch)
    assert len(rec.response_messages) == 5


def test_transform_json_body_non_ascii_kept_readable():
    rec = get_record({})
    rec.response_transforms = [lambda m: m]
    out = transform_json_body(rec, json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"t": "Zürich"}}).encode())
    assert "Zürich".encode() in out


def test_transform_message_non_dict():
    rec = get_record({})
    assert transform_message(rec, 5) == (5, False)
    rec.mask_required = True
    with pytest.raises(TransformError):
        transform_message(rec, [1])


# --- JSON responses -------------------------------------------------------------------------

def test_json_body_transform_applied(rw):
    rewriter, _ = rw
    f, rec = mkflow(json.dumps(RESULT).encode(), transforms=[mask], mask_required=True)
    rewriter.response(f)
    assert "[MASKED:ssn]" in f.response.text and "123-45-6789" not in f.response.text
    assert rec.response_messages[0]["result"]["content"][0]["text"] == "ssn [MASKED:ssn]"


def test_unchanged_body_untouched_byte_for_byte(rw):
    rewriter, _ = rw
    raw = b'{ "jsonrpc" : "2.0",\n  "id": 5, "result": {"content": [], "x": 1.50, "u": "\\u00e9"} }  '
    seen = []
    f, rec = mkflow(raw, transforms=[readonly(lambda m: seen.append(m) or m)])
    rewriter.response(f)
    assert f.response.raw_content == raw and seen and seen[0]["result"]["u"] == "é"


def test_gzip_response_decoded_transformed_reencoded(rw):
    rewriter, _ = rw
    f, rec = mkflow(gzip.compress(json.dumps(RESULT).encode()), transforms=[mask], mask_required=True,
                    headers=[("content-encoding", "gzip")])
    rewriter.response(f)
    assert f.response.headers["content-encoding"] == "gzip"
    assert b"MASKED" in gzip.decompress(f.response.raw_content)


@pytest.mark.parametrize("body", [
    b"{not json", b'{"a":1,"a":2}', b"\xff\xfe", b'\xef\xbb\xbf{"jsonrpc":"2.0","id":5,"result":{}}',
    b'{"jsonrpc":"2.0","id":5,"result":{"n":1e999}}', b"[1, 2]", b'"text"',
])
def test_mask_required_and_unparsable_replaced(rw, body):
    rewriter, _ = rw
    f, rec = mkflow(body, transforms=[mask], mask_required=True)
    rewriter.response(f)
    assert is_gateway_error(f) and rec.refusal.startswith("unsafe response")


def test_mask_required_wrong_content_type_replaced(rw):
    rewriter, _ = rw
    f, rec = mkflow(json.dumps(RESULT).encode(), ctype="text/plain", transforms=[mask], mask_required=True)
    rewriter.response(f)
    assert is_gateway_error(f)


def test_json_like_content_type_is_transformed_like_the_client_reads_it(rw):
    # the SDK client parses any application/json* body: so must the gateway
    rewriter, _ = rw
    f, rec = mkflow(json.dumps(RESULT).encode(), ctype="application/json-rpc", transforms=[mask])
    rewriter.response(f)
    assert "123-45-6789" not in f.response.text


def test_undecodable_encoding_with_transforms_replaced(rw):
    rewriter, _ = rw
    hidden = gzip.compress(gzip.compress(json.dumps(RESULT).encode()))
    f, rec = mkflow(hidden, headers=[("content-encoding", "gzip, gzip")], transforms=[mask])
    rewriter.response(f)
    assert is_gateway_error(f)
    f, rec = mkflow(hidden, headers=[("content-encoding", "gzip, gzip")])
    rewriter.response(f)
    assert f.response.raw_content == hidden         # nothing to apply: untouched


def test_without_transforms_unparsable_passes_untouched(rw):
    rewriter, _ = rw
    f, rec = mkflow(b"{not json")
    rewriter.response(f)
    assert f.response.raw_content == b"{not json" and rec.refusal is None


def test_transform_raising_replaces_body(rw):
    rewriter, _ = rw
    f, rec = mkflow(json.dumps(RESULT).encode(), transforms=[boom])
    rewriter.response(f)
    assert is_gateway_error(f)


def test_empty_body_and_skips(rw):
    rewriter, _ = rw
    f, rec = mkflow(b"", ctype=None, transforms=[mask], mask_required=True)
    f.response.status_code = 202
    rewriter.response(f)
    assert f.response.status_code == 202 and f.response.raw_content == b""
    f, rec = mkflow(b"{not json", transforms=[mask], mask_required=True)
    rec.refuse("already refused")
    rewriter.response(f)
    assert f.response.raw_content == b"{not json"
    f, rec = mkflow(b"{not json", conn=None, transforms=[mask], mask_required=True)
    rec.connection = None
    rewriter.response(f)
    assert f.response.raw_content == b"{not json"


def test_batch_error_id_is_null(rw):
    rewriter, _ = rw
    f, rec = mkflow(b"{not json", transforms=[mask], mask_required=True,
                    req=[{"jsonrpc": "2.0", "id": 1, "method": "ping"}, {"jsonrpc": "2.0", "id": 2, "method": "ping"}])
    rewriter.response(f)
    assert json.loads(f.response.content)["id"] is None


# --- SSE responses --------------------------------------------------------------------------

def ev(obj, **fields) -> bytes:
    head = "".join(f"{k}: {v}\n" for k, v in fields.items())
    return (head + "data: " + json.dumps(obj) + "\n\n").encode()


def sse_flow(rw, transforms=(), mask_required=False, conn="demo", ctype="text/event-stream", headers=()):
    rewriter, _ = rw
    f, rec = mkflow(b"", ctype=ctype, conn=conn, transforms=transforms, mask_required=mask_required,
                    headers=[("content-length", "1234"), *headers])
    f.response.content = None
    rewriter.responseheaders(f)
    return f, rec


def run_stream(stream, chunks: list[bytes]) -> bytes:
    """What the client receives; no chunk the rewriter returns may be empty (on a chunked
    response an empty chunk is the end of the body)."""
    out = [c for data in chunks if data for c in stream(data)] + list(stream(b""))
    assert all(out), out
    return b"".join(out)


def events_of(data: bytes) -> list[mcpwire.SSEEvent]:
    p = mcpwire.SSEParser()
    return p.feed(data) + p.feed(b"", final=True)


def test_sse_stream_set_up(rw):
    f, rec = sse_flow(rw)
    assert callable(f.response.stream) and isinstance(f.response.stream, SSERewriter)
    assert f.response.headers["x-accel-buffering"] == "no" and "content-length" not in f.response.headers
    for ctype in ("text/event-stream; charset=utf-8", "TEXT/EVENT-STREAM", "text/event-streamx"):
        f, _ = sse_flow(rw, ctype=ctype)
        assert callable(f.response.stream), ctype
    f, _ = sse_flow(rw, ctype="application/json")
    assert not f.response.stream


def test_sse_not_set_up_for_refused_flows(rw):
    rewriter, _ = rw
    f, rec = mkflow(b"", ctype="text/event-stream")
    rec.refuse("x")
    rewriter.responseheaders(f)
    assert not f.response.stream


def test_compressed_sse_refused(rw):
    rewriter, _ = rw
    f, rec = mkflow(b"", ctype="text/event-stream", headers=[("content-encoding", "gzip")])
    with pytest.raises(TransformError):
        rewriter.wrapped.responseheaders(f)
    f, rec = mkflow(b"", ctype="text/event-stream", headers=[("content-encoding", "gzip")])
    rewriter.responseheaders(f)                    # wrapped: fail closed
    assert f.response.status_code == 502 and rec.refusal
    # whatever the upstream then sends is discarded; the client gets the 502 body
    body = b"".join(f.response.stream(gzip.compress(ev(RESULT))) + f.response.stream(b"more") + f.response.stream(b""))
    assert json.loads(body)["error"] == "gateway_error"


STREAM = (b": keep-alive\n\n" + ev({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"p": 1}})
          + b"id: prime\ndata:\n\n" + ev(RESULT, id="e1") + b"retry: 100\n\n")


def test_sse_transform_per_event_any_split(rw):
    for i in range(len(STREAM) + 1):
        f, rec = sse_flow(rw, transforms=[mask], mask_required=True)
        out = run_stream(f.response.stream, [STREAM[:i], STREAM[i:]])
        assert b"123-45-6789" not in out and b"[MASKED:ssn]" in out, i
        evs = events_of(out)
        assert [e.id for e in evs if e.data is not None] == [None, "prime", "e1"], i
        assert rec.refusal is None


def test_sse_byte_by_byte(rw):
    f, rec = sse_flow(rw, transforms=[mask], mask_required=True)
    out = run_stream(f.response.stream, [bytes([b]) for b in STREAM])
    assert b"123-45-6789" not in out and b"[MASKED:ssn]" in out


def test_sse_unchanged_events_forwarded_byte_for_byte(rw):
    odd = b'id: 9\r\nevent: message\r\ndata:{"jsonrpc":"2.0", "id":5,\r\n\r\n'   # odd spacing, CRLF
    f, rec = sse_flow(rw, transforms=[readonly(lambda m: m)])
    assert run_stream(f.response.stream, [STREAM]) == STREAM
    f, rec = sse_flow(rw)
    assert run_stream(f.response.stream, [STREAM + odd]) == STREAM + odd   # no transforms: unparsable is fine


def test_sse_transform_raising_ends_stream_with_error_event(rw):
    calls = []

    def fails_second(m):
        calls.append(m)
        if len(calls) == 2:
            raise RuntimeError("nope")
        return m
    f, rec = sse_flow(rw, transforms=[fails_second], mask_required=True)
    s = f.response.stream
    first = s(ev({"jsonrpc": "2.0", "method": "notifications/progress", "params": {}}))
    err = b"".join(s(ev(RESULT)))
    assert b"123-45-6789" not in err
    errs = events_of(err)
    assert len(errs) == 1 and json.loads(errs[0].data)["error"]["code"] == mcpwire.INTERNAL_ERROR
    assert json.loads(errs[0].data)["id"] == 5
    assert s(ev(RESULT)) == [] and s(b"") == []          # stream closed: nothing more passes
    assert rec.refusal and first


@pytest.mark.parametrize("bad", [
    b"data: {not json\n\n", b'data: {"a":1,"a":2}\n\n', b"data: \xff\n\n",
    b"event: other\ndata: " + json.dumps(RESULT).encode() + b"\n\n",
    b"event: endpoint\ndata: /messages/\n\n",
])
def test_sse_uncheckable_event_with_masking_ends_stream(rw, bad):
    f, rec = sse_flow(rw, transforms=[mask], mask_required=True)
    out = run_stream(f.response.stream, [bad, ev(RESULT)])
    assert b"123-45-6789" not in out and rec.refusal
    assert json.loads(events_of(out)[0].data)["error"]["code"] == mcpwire.INTERNAL_ERROR


def test_sse_other_event_types_pass_without_masking(rw):
    data = b"event: other\ndata: x\n\n"
    f, rec = sse_flow(rw, transforms=[readonly(lambda m: m)])
    assert run_stream(f.response.stream, [data]) == data


def test_sse_event_split_secret_never_leaks(rw):
    data = ev(RESULT)
    cut = data.index(b"45-67")
    for i in range(cut - 3, cut + 5):
        f, rec = sse_flow(rw, transforms=[mask], mask_required=True)
        s = f.response.stream
        first = s(data[:i])
        assert first == []          # nothing of an unfinished event leaves, not even an empty chunk
        assert b"123-45-6789" not in b"".join(first + s(data[i:]) + s(b""))


def test_legacy_endpoint_event_rewritten(rw):
    rewriter, router = rw
    bound = []

    def seal(sid: str) -> str:
        bound.append(sid)
        return "SEALED-" + sid[::-1]
    stream = b": hi\n\nevent: endpoint\ndata: /messages/?x=1&session_id=abc123\n\n" + ev(RESULT)
    for i in range(len(stream) + 1):
        f, rec = sse_flow(rw, conn="leg")
        rec.bind_session = seal
        out = run_stream(f.response.stream, [stream[:i], stream[i:]])
        evs = [e for e in events_of(out) if e.data]
        assert evs[0].type == "endpoint" and evs[0].data == "/mcp/leg/messages/?x=1&session_id=SEALED-321cba", i
        assert evs[1].data == json.dumps(RESULT) and b"abc123" not in out
    assert "/messages/" in router.connections["leg"].announced
    assert set(bound) == {"abc123"}


@pytest.mark.parametrize("endpoint,binder", [
    (b"/messages/?session_id=abc123", None),                      # nobody to seal it
    (b"/messages/?session_id=abc123", lambda sid: None),           # not this caller's session
    (b"/messages/?session_id=ab%2F12", lambda sid: "SEALED"),      # not a plain value
])
def test_legacy_endpoint_session_never_passes_raw(rw, endpoint, binder):
    f, rec = sse_flow(rw, conn="leg")
    if binder is not None:
        rec.bind_session = binder
    out = run_stream(f.response.stream, [b"event: endpoint\ndata: " + endpoint + b"\n\n", ev(RESULT)])
    assert rec.refusal and b"abc123" not in out and b"ab%2F12" not in out and b"SEALED" not in out


def test_legacy_endpoint_to_another_origin_ends_stream(rw):
    _, router = rw
    f, rec = sse_flow(rw, conn="leg")
    out = run_stream(f.response.stream, [b"event: endpoint\ndata: http://evil.example/messages/\n\n", ev(RESULT)])
    assert b"evil" not in out and rec.refusal and b"123-45" not in out
    assert not router.connections["leg"].announced


def test_endpoint_event_on_streamable_connection_ends_stream(rw):
    f, rec = sse_flow(rw, conn="demo")
    out = run_stream(f.response.stream, [b"event: endpoint\ndata: /messages/\n\n"])
    assert rec.refusal and b"/mcp/demo/messages" not in out


def test_get_stream_applies_transforms_of_the_originating_request(rw):
    f, rec = sse_flow(rw, transforms=[])
    rec.messages = []
    rec.pending_lookup = lambda msg_id: {5: [mask], 6: []}.get(msg_id)
    out = run_stream(f.response.stream, [ev(RESULT), ev({**RESULT, "id": 6}), ev({**RESULT, "id": 7})])
    evs = events_of(out)
    assert "MASKED" in evs[0].data and "123-45-6789" in evs[1].data   # id 6 came from an unmasked request
    # id 7: no request this gateway checked (posted through another replica): not passed
    assert json.loads(evs[2].data)["error"]["code"] == -32603 and "123-45" not in evs[2].data
    assert rec.refusal is None                                        # the stream goes on


def test_masked_stream_drops_comments_unknown_fields_and_ids_the_rules_would_change(rw):
    data = (b": ssn 123-45-6789\n\n"                                    # comment-only block
            + b": note 123-45-6789\nfoo: 123-45-6789\n" + ev(RESULT, id="ok-1")   # comment + unknown field
            + ev(RESULT, id="123-45-6789")                             # id holding a secret
            + b"retry: 123-45-6789\nretry: 250\n\n")                   # retry must be digits
    for cut in range(len(data) + 1):
        f, rec = sse_flow(rw, transforms=[mask], mask_required=True)
        rec.mask_text = lambda t: t.replace("123-45-6789", "[MASKED:ssn]")
        out = run_stream(f.response.stream, [data[:cut], data[cut:]])
        assert b"123-45-6789" not in out, cut
        evs = events_of(out)
        assert [(e.data is not None, e.id, e.retry) for e in evs] == [
            (False, None, None), (True, "ok-1", None), (True, None, None), (False, None, "250")], cut
        assert out.startswith(b":\n\n") and rec.refusal is None


def test_unmasked_stream_keeps_comments_and_ids_byte_for_byte(rw):
    data = b": hello\n\n" + ev(RESULT, id="abc") + b"retry: 250\n\n"
    f, rec = sse_flow(rw)
    assert run_stream(f.response.stream, [bytes([b]) for b in data]) == data


def test_masked_stream_cr_only_byte_by_byte_each_event_leaves_on_its_last_byte(rw):
    one = ev(RESULT).replace(b"\n", b"\r")
    data = one * 3
    f, rec = sse_flow(rw, transforms=[mask], mask_required=True)
    sent_at = []
    for i in range(len(data)):
        if f.response.stream(data[i:i + 1]):
            sent_at.append(i)
    assert sent_at == [len(one) - 1, 2 * len(one) - 1, 3 * len(one) - 1]
    assert f.response.stream(b"") == []
