"""Known-secret redaction (addons/core/masking/secretscan.py): every encoding, fragments, streams, URLs."""
from __future__ import annotations

import base64
import json
import secrets
import urllib.parse

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from addons.core.masking.secretscan import (
    MIN_FRAGMENT, REDACTED, Secret, SecretIndex, StreamRedactor, TokenIndexCache, pem_secrets, redact_bytes,
    redact_obj, redact_str, redact_url,
)

SECRET = "demo-svc-" + secrets.token_urlsafe(32)


def encodings(v: str) -> dict[str, str]:
    b = v.encode()
    return {
        "raw": v,
        "base64": base64.b64encode(b).decode(),
        "base64-unaligned": base64.b64encode(b"ab" + b + b"z").decode(),
        "base64url": base64.urlsafe_b64encode(b"q" + b).decode().rstrip("="),
        "hex": b.hex(),
        "HEX": b.hex().upper(),
        "url": urllib.parse.quote(v, safe=""),
        "json_u": "".join(f"\\u{ord(c):04x}" for c in v),
        "reversed": v[::-1],
        "nosep": "".join(c for c in v if c.isalnum()),
    }


@pytest.fixture(scope="module")
def idx() -> SecretIndex:
    return SecretIndex([Secret("svc", SECRET)])


@pytest.mark.parametrize("enc", list(encodings("x" * 40)))
def test_every_encoding_is_redacted_inside_text(idx, enc):
    leaked = encodings(SECRET)[enc]
    out, labels = redact_str([idx], f"before {leaked} after")
    assert labels == {"svc"}
    assert out.startswith("before ") and out.endswith(" after") and REDACTED in out
    assert leaked not in out
    # no fragment of MIN_FRAGMENT characters survives
    for i in range(len(leaked) - MIN_FRAGMENT + 1):
        assert leaked[i:i + MIN_FRAGMENT] not in out


def test_fragments_of_a_split_secret_are_redacted_each(idx):
    half = len(SECRET) // 2
    a, _ = redact_str([idx], f"part one: {SECRET[:half]}")
    b, _ = redact_str([idx], f"{SECRET[half:]} was part two")
    assert SECRET[:half] not in a and SECRET[half:] not in b


def test_ordinary_text_is_untouched(idx):
    text = "the demo-svc prefix alone, a JWT eyJhbGciOi..., hex 00ff and base64 aGVsbG8="
    assert redact_str([idx], text) == (text, set())
    doc = {"k": [1, "two", {"three": None}]}
    assert redact_obj([idx], doc) is doc


def test_json_values_and_keys_are_walked(idx):
    labels: set[str] = set()
    out = redact_obj([idx], {"content": [{"text": f"tok={SECRET}"}], SECRET: 1}, labels)
    assert SECRET not in json.dumps(out) and labels == {"svc"}


def test_bytes_and_non_ascii_neighbours(idx):
    data = f"é {SECRET} ü".encode()
    out, labels = redact_bytes([idx], data)
    assert out.decode() == f"é {REDACTED} ü" and labels == {"svc"}
    s, _ = redact_str([idx], f"é {SECRET} ü")
    assert s == f"é {REDACTED} ü"


def test_stream_redactor_across_every_chunk_boundary(idx):
    payload = f"data: {{\"text\": \"x {SECRET} y\"}}\n\n".encode()
    for cut in range(1, len(payload)):
        sr = StreamRedactor([idx], idx.longest - 1)
        out = sr.feed(payload[:cut]) + sr.feed(payload[cut:]) + sr.feed(b"", final=True)
        assert SECRET.encode() not in out and REDACTED.encode() in out, cut


def test_short_values_are_not_registered():
    idx = SecretIndex([Secret("short", "abc")])
    assert not idx
    assert redact_str([idx], "abc abc") == ("abc abc", set())


def test_pem_key_body_lines_and_private_value():
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    idx = SecretIndex(pem_secrets("issuer", pem))
    d = key.private_numbers().private_value.to_bytes(32, "big")
    jwk_d = base64.urlsafe_b64encode(d).decode().rstrip("=")
    for leaked in (pem, json.dumps(pem), pem.splitlines()[1], jwk_d, d.hex()):
        out, labels = redact_str([idx], f"key: {leaked}")
        assert leaked not in out and labels, leaked
    # a different key's public part is not touched
    other = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    assert redact_str([idx], other)[1] == set()


def test_caller_jwt_signature_fragments_but_not_shared_header():
    jwt_ = "eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSJ9." + secrets.token_urlsafe(64)
    idx = TokenIndexCache().get(jwt_)
    assert redact_str([idx], f"Bearer {jwt_}")[0] == f"Bearer {REDACTED}"
    sig = jwt_.rsplit(".", 1)[1]
    assert sig[5:40] not in redact_str([idx], sig[5:40])[0]
    other = "eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSJ9." + secrets.token_urlsafe(64)
    assert redact_str([idx], other) == (other, set())


def test_token_cache_reuses_indexes():
    c = TokenIndexCache(size=2)
    a = c.get("token-aaaaaaaaaaaaaaaa")
    assert c.get("token-aaaaaaaaaaaaaaaa") is a
    c.get("token-bbbbbbbbbbbbbbbb")
    c.get("token-cccccccccccccccc")
    assert c.get("token-aaaaaaaaaaaaaaaa") is not a      # evicted (bounded)


JWT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"


@pytest.mark.parametrize("path,want", [
    ("/mcp/demo?access_token=abc", "/mcp/demo?access_token=[redacted]"),
    ("/mcp/demo?token=abc&x=1", "/mcp/demo?token=[redacted]&x=1"),
    ("/mcp/demo?jwt=abc", "/mcp/demo?jwt=[redacted]"),
    ("/mcp/demo?api_key=abc", "/mcp/demo?api_key=[redacted]"),
    ("/mcp/demo?key=abc", "/mcp/demo?key=[redacted]"),
    (f"/mcp/demo?q={JWT}", "/mcp/demo?q=[redacted]"),
    (f"/mcp/demo/{JWT}/x", "/mcp/demo/[redacted]/x"),
    (f"/mcp/demo/{urllib.parse.quote(JWT + '==')}", "/mcp/demo/[redacted]"),
    ("/mcp/demo?page=2&sort=name", "/mcp/demo?page=2&sort=name"),
    ("/mcp/demo/messages/", "/mcp/demo/messages/"),
])
def test_tokens_in_urls(path, want):
    assert redact_url(path) == want


def test_known_secret_in_url_path(idx):
    assert SECRET not in redact_url(f"/mcp/demo/{SECRET}?x={urllib.parse.quote(SECRET)}", [idx])


def test_index_survives_flow_copy_and_never_serialises_secrets(idx):
    import copy
    import pickle
    assert copy.deepcopy(idx) is idx
    blob = pickle.dumps(idx)
    assert SECRET.encode() not in blob and not pickle.loads(blob)


@pytest.mark.parametrize("size", [1, 3, 5, 16, 17])
def test_stream_redactor_small_chunks_replace_the_secret_whole(idx, size):
    payload = f"a {SECRET} b {SECRET[::-1]} c".encode()
    sr = StreamRedactor([idx], idx.longest - 1)
    out = b"".join(sr.feed(payload[i:i + size]) for i in range(0, len(payload), size)) + sr.feed(b"", final=True)
    assert out == f"a {REDACTED} b {REDACTED} c".encode() and sr.labels == {"svc"}
