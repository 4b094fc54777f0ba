"""Sealed session ids (addons/core/sessionseal.py) against a real gateway and a stateful upstream
reachable under two connection names: a stolen, altered, swapped, made-up or oversized
session id is refused with 404 (unknown session: the client starts a new one) and the
upstream receives nothing; the owner's own id keeps working."""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass

import httpx
import pytest

from tests.adversarial.conftest import call

INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "adv", "version": "1"}}}
ALLOWED = call("get_customer", {"id": 1})


@dataclass
class Session:
    envelope: str
    upstream_id: str
    token: str


def open_session(adv, token: str, conn: str = "demo") -> str:
    with httpx.Client(timeout=20) as c:
        r = c.post(adv.gw.mcp_url(conn), json=INIT, headers=adv.headers(token))
        assert r.status_code == 200, r.text
        env = r.headers["mcp-session-id"]
        r = c.post(adv.gw.mcp_url(conn), json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                   headers=adv.headers(token, mcp_session_id=env))
        assert r.status_code == 202, r.text
    return env


@pytest.fixture(scope="module")
def alice(adv_sessions) -> Session:
    token = adv_sessions.gw.token("alice", ["e2e-user"])
    adv_sessions.demo.clear_received()
    env = open_session(adv_sessions, token)
    ids = {v for r in adv_sessions.demo.received() for k, v in r.get("headers", []) if k.lower() == "mcp-session-id"}
    assert len(ids) == 1 and env not in ids, ids      # the upstream saw its own id, never the envelope
    return Session(env, ids.pop(), token)


def send(adv, method: str, token: str, sid: str, conn: str = "demo") -> httpx.Response:
    with httpx.Client(timeout=20) as c:
        h = adv.headers(token, mcp_session_id=sid)
        if method == "POST":
            return c.post(adv.gw.mcp_url(conn), json=ALLOWED, headers=h)
        return c.request(method, adv.gw.mcp_url(conn), headers=h)


def refused(r: httpx.Response) -> None:
    assert r.status_code == 404 and r.json()["error"] == "unknown_session", (r.status_code, r.text[:200])


def owner_still_works(adv, alice: Session) -> None:
    r = send(adv, "POST", alice.token, alice.envelope)
    assert r.status_code == 200 and '"id":1' in r.text.replace(" ", ""), r.text[:300]
    assert r.headers["mcp-session-id"] == alice.envelope     # the server's echo, sealed again


@pytest.mark.parametrize("method", ["POST", "GET", "DELETE"])
def test_another_identity_presenting_a_valid_envelope(adv_sessions, alice, upstream, method):
    refused(send(adv_sessions, method, adv_sessions.token, alice.envelope))
    upstream.nothing()
    owner_still_works(adv_sessions, alice)                   # mallory's DELETE closed nothing


def test_envelope_swapped_to_another_connection_of_the_same_upstream(adv_sessions, alice, upstream):
    refused(send(adv_sessions, "POST", alice.token, alice.envelope, conn="crm"))
    upstream.nothing()
    own = open_session(adv_sessions, alice.token, "crm")    # and crm's own session stays on crm
    adv_sessions.demo.clear_received()
    refused(send(adv_sessions, "POST", alice.token, own, conn="demo"))
    upstream.nothing()


def flips(env: str) -> list[str]:
    raw = bytearray(base64.urlsafe_b64decode(env + "=" * (-len(env) % 4)))
    out = []
    for i in (0, 1, 4, 5, 16, 17, len(raw) // 2, len(raw) - 17, len(raw) - 1):
        b = bytearray(raw)
        b[i] ^= 0x01
        out.append(base64.urlsafe_b64encode(bytes(b)).rstrip(b"=").decode())
    return out


def test_tampered_envelopes(adv_sessions, alice, upstream):
    env = alice.envelope
    for forged in flips(env) + [env[:-1], env[:-8], env + "A", env + "AAAA", env[::-1], env.swapcase()]:
        refused(send(adv_sessions, "POST", alice.token, forged))
    upstream.nothing()
    owner_still_works(adv_sessions, alice)


def test_the_raw_upstream_session_id_is_not_a_session_id_here(adv_sessions, alice, upstream):
    for token in (alice.token, adv_sessions.token):
        refused(send(adv_sessions, "POST", token, alice.upstream_id))
    upstream.nothing()


@pytest.mark.parametrize("sid", ["0" * 32, "A" * 900, "A" * 7000, "ÿþ" * 10, "abc def", "a,b", "=" * 40])
def test_made_up_and_oversized_ids(adv_sessions, alice, upstream, sid):
    with httpx.Client(timeout=20) as c:
        h = {**adv_sessions.headers(alice.token), "mcp-session-id": sid.encode("latin-1")}
        r = c.post(adv_sessions.gw.mcp_url(), content=json.dumps(ALLOWED).encode(), headers=h)
    assert r.status_code in (400, 404, 431), (r.status_code, r.text[:200])
    if r.status_code == 404:
        refused(r)
    upstream.nothing()


def test_legacy_sse_session_id_is_sealed_and_bound_to_its_owner(adv_legacy, upstream):
    """2024-11-05 HTTP+SSE: the endpoint event's session_id is the envelope; the messages
    endpoint opens it for the owner only."""
    alice = adv_legacy.gw.token("alice", ["e2e-user"])
    with httpx.Client(timeout=20) as c, c.stream("GET", adv_legacy.url, headers=adv_legacy.headers(alice)) as s:
        assert s.status_code == 200
        endpoint, lines = None, s.iter_lines()             # (held: closing the iterator ends the stream)
        while endpoint is None:
            line = next(lines)
            if line.startswith("data: ") and "session_id=" in line:
                endpoint = line[len("data: "):].strip()
        assert endpoint and endpoint.startswith("/mcp/demo/messages/")
        env = endpoint.partition("session_id=")[2]
        adv_legacy.demo.clear_received()
        url = f"{adv_legacy.gw.url}{endpoint}"
        init = {**INIT, "params": {**INIT["params"], "protocolVersion": "2024-11-05"}}
        for token, target in ((adv_legacy.token, url), (alice, url[:-2] + ("AA" if url[-2:] != "AA" else "BB")),
                              (alice, url.replace(env, "0123456789abcdef0123456789abcdef"))):
            r = c.post(target, json=init, headers=adv_legacy.headers(token))
            refused(r)
        upstream.nothing()
        r = c.post(url, json=init, headers=adv_legacy.headers(alice))
        assert r.status_code == 202, r.text
        (got,) = upstream.received()
        sid = got["query"].partition("session_id=")[2]
        assert sid and sid != env and sid not in endpoint       # the upstream's own id, never shown
        r = c.post(url.replace(env, sid), json=init, headers=adv_legacy.headers(alice))
        refused(r)                                              # and not usable at the gateway
