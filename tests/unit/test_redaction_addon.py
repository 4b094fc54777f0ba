"""The redaction addon's hooks on real mitmproxy flows (no network): bodies of any type,
headers (a secret as session id), SSE events, raw streams, refused flows' paths."""
from __future__ import annotations

import json
import secrets

from mitmproxy.test import tflow

from addons.core.record import get_record
from addons.hooks.redaction import ChunkStreamRedactor, EventStreamRedactor, SecretRedaction
from addons.core.masking.secretscan import REDACTED, Secret, SecretIndex, StreamRedactor

SECRET = "svc-" + secrets.token_urlsafe(30)


def addon() -> SecretRedaction:
    r = SecretRedaction()
    r.index = SecretIndex([Secret("credential of connection demo", SECRET)])
    return r


def flow(body: bytes = b"", ctype: str = "application/json"):
    f = tflow.tflow(resp=True)
    f.response.headers["content-type"] = ctype
    f.response.content = body
    return f


def test_text_error_body_and_session_header_redacted():
    a = addon()
    f = flow(f"upstream crashed: token {SECRET}".encode(), "text/plain")
    f.response.headers["mcp-session-id"] = SECRET
    a.requestheaders(f)
    a.response(f)
    assert SECRET.encode() not in f.response.content and REDACTED.encode() in f.response.content
    assert f.response.headers["mcp-session-id"] == REDACTED
    masks = get_record(f.metadata).masks
    assert {m.path for m in masks} == {"response body", "response headers"} and all(
        m.type == "known-secret" for m in masks)


def test_gzip_body_is_redacted_after_decoding():
    a = addon()
    f = flow()
    f.response.headers["content-encoding"] = "gzip"
    f.response.content = json.dumps({"result": {"content": [{"text": SECRET}]}}).encode()   # encoded by mitmproxy
    a.requestheaders(f)
    a.response(f)
    assert SECRET.encode() not in f.response.get_content()


def test_clean_response_untouched():
    a = addon()
    f = flow(b'{"jsonrpc":"2.0","id":1,"result":{}}')
    a.requestheaders(f)
    a.response(f)
    assert f.response.content == b'{"jsonrpc":"2.0","id":1,"result":{}}' and not get_record(f.metadata).masks
    assert get_record(f.metadata).response_body_clean          # the recorder need not scan it again


def test_a_body_with_a_secret_is_never_marked_clean():
    a = addon()
    f = flow(json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"t": SECRET}}).encode())
    a.requestheaders(f)
    a.response(f)
    assert SECRET.encode() not in f.response.content and not get_record(f.metadata).response_body_clean


def test_message_transform_registered_and_sees_through_escapes():
    a = addon()
    f = flow()
    rec = get_record(f.metadata)
    rec.connection = "demo"
    f.response = None
    a.requestheaders(f)
    a.request(f)
    (t,) = rec.response_transforms
    msg = json.loads('{"result": {"content": [{"text": "' + "".join(f"\\u{ord(c):04x}" for c in SECRET) + '"}]}}')
    out = t(msg)
    assert SECRET not in json.dumps(out) and t.readonly is False
    clean = {"result": {"content": [{"text": "fine"}]}}
    assert t(clean) is clean and t.readonly is True


def test_sse_events_and_raw_streams():
    a = addon()
    f = flow(ctype="text/event-stream")
    a.requestheaders(f)
    rec = get_record(f.metadata)
    ev = EventStreamRedactor(lambda d: d, rec)
    assert SECRET.encode() not in ev(f"event: message\ndata: {json.dumps({'x': SECRET})}\n\n".encode())
    raw = ChunkStreamRedactor(StreamRedactor(rec.known_secrets, a.index.longest - 1), rec)
    data = f"prefix {SECRET} suffix".encode()
    out = b"".join(raw(data[i:i + 5]) for i in range(0, len(data), 5)) + raw(b"")
    assert out == f"prefix {REDACTED} suffix".encode()


def test_refused_flow_path_is_cleaned_before_logging():
    a = addon()
    f = tflow.tflow(resp=True)
    f.request.path = f"/mcp/demo/{SECRET}?access_token=abc&x=1"
    a.requestheaders(f)
    a.request(f)            # refused: a response is already set
    assert SECRET not in f.request.path and f.request.path.endswith("?access_token=[redacted]&x=1")


def test_a_body_identical_to_the_scanned_message_text_is_not_scanned_twice_and_any_other_is():
    from addons.core import mcpwire
    from addons.hooks.redaction import MessageRedactor
    a = addon()
    msg = {"jsonrpc": "2.0", "id": 1, "result": {"t": "clean"}}
    f = flow(mcpwire.dumps(msg))
    a.requestheaders(f)
    rec = get_record(f.metadata)
    assert MessageRedactor(rec)(msg) is msg and rec.clean_json_text == mcpwire.dumps(msg)
    a.response(f)
    assert rec.response_body_clean
    # a body that is not byte for byte the scanned text (a secret added after the transform)
    g = flow(json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"t": "clean", "u": SECRET}}).encode())
    a.requestheaders(g)
    grec = get_record(g.metadata)
    MessageRedactor(grec)(msg)
    a.response(g)
    assert SECRET.encode() not in g.response.content and not grec.response_body_clean


def test_the_state_engine_key_and_password_are_known_secrets(tmp_path):
    """The shared state engine's seal key (<key_dir>/state.key or bastion_state_key) and a
    password in the bastion_state URL are redacted like every other secret the gateway holds."""
    from addons.hooks.redaction import gather_secrets
    key_dir = tmp_path / "keys"
    key_dir.mkdir()
    key = secrets.token_hex(32)
    (key_dir / "state.key").write_text(key)
    found, files = gather_secrets(str(tmp_path), str(key_dir), str(tmp_path / "mask-key"),
                                  state_url="redis://:p%40ss-w0rd-longer@127.0.0.1:6379/0")
    values = {s.label: s.value for s in found}
    assert values["state engine key"] == key and values["state engine password"] == "p@ss-w0rd-longer"
    assert key_dir / "state.key" in files                       # watched: a new key is picked up
    other = tmp_path / "elsewhere.key"
    other.write_text(secrets.token_hex(32))
    found, _ = gather_secrets(str(tmp_path), str(key_dir), str(tmp_path / "mask-key"), state_key_file=str(other))
    assert {s.value for s in found if s.label == "state engine key"} == {other.read_text()}
    found, _ = gather_secrets(str(tmp_path), str(key_dir), str(tmp_path / "mask-key"), state_url="redis://127.0.0.1/0")
    assert not [s for s in found if s.label == "state engine password"]
