"""Issue 18, sessions: one caller opening and closing many sessions cannot take over a
victim's session, an id the gateway did not issue is refused (404), and the limits refuse
(429 per identity, 503 in all) instead of evicting. Issue 19: the id is a sealed envelope
with an expiry, under keys that rotate live. Real mitmdump, real stateful demo server, raw
HTTP so the attacker can pick session ids."""
from __future__ import annotations

import time

import httpx

from tests.e2e.conftest import ALLOW_ALL_POLICY

INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}
CALL = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "get_customer", "arguments": {"id": 1}}}


def headers(token: str, sid: str | None = None) -> dict[str, str]:
    h = {"content-type": "application/json", "accept": "application/json, text/event-stream",
         "mcp-protocol-version": "2025-06-18", "authorization": f"Bearer {token}"}
    if sid:
        h["mcp-session-id"] = sid
    return h


def open_session(c: httpx.Client, url: str, token: str) -> httpx.Response:
    r = c.post(url, json=INIT, headers=headers(token))
    if r.status_code == 200:
        sid = r.headers["mcp-session-id"]
        assert c.post(url, json=INITIALIZED, headers=headers(token, sid)).status_code == 202
    return r


def test_open_close_churn_does_not_hand_a_victims_session_to_another_identity(demo_server, rules_dir, gateway):
    demo = demo_server("json")
    gw = gateway(rules_dir(demo, **{"policy.yaml": ALLOW_ALL_POLICY}),
                 extra_args=("--set", "bastion_session_limit=3", "--set", "bastion_session_max=5"))
    alice, mallory = gw.token("alice"), gw.token("mallory")
    url = gw.mcp_url()
    with httpx.Client(timeout=20) as c:
        victim = open_session(c, url, alice).headers["mcp-session-id"]
        for _ in range(12):                     # more than the whole table: churn never evicts
            r = open_session(c, url, mallory)
            assert r.status_code == 200, r.text
            assert c.delete(url, headers=headers(mallory, r.headers["mcp-session-id"])).status_code in (200, 204)
        demo.clear_received()
        stolen = c.post(url, json=CALL, headers=headers(mallory, victim))
        assert stolen.status_code == 404 and stolen.json()["error"] == "unknown_session"
        assert demo.received() == []
        own = c.post(url, json=CALL, headers=headers(alice, victim))
        assert own.status_code == 200 and "result" in own.text, own.text


def test_unknown_session_id_is_404_and_limits_refuse_with_429_and_503(demo_server, rules_dir, gateway):
    demo = demo_server("json")
    gw = gateway(rules_dir(demo, **{"policy.yaml": ALLOW_ALL_POLICY}),
                 extra_args=("--set", "bastion_session_limit=2", "--set", "bastion_session_max=3"))
    alice, mallory, bob = gw.token("alice"), gw.token("mallory"), gw.token("bob")
    url = gw.mcp_url()
    with httpx.Client(timeout=20) as c:
        demo.clear_received()
        r = c.post(url, json=CALL, headers=headers(mallory, "0123456789abcdef0123456789abcdef"))
        assert r.status_code == 404 and demo.received() == []
        a = open_session(c, url, alice).headers["mcp-session-id"]
        for _ in range(2):
            assert open_session(c, url, mallory).status_code == 200
        r = open_session(c, url, mallory)
        assert r.status_code == 429 and r.json()["error"] == "too_many_sessions", r.text
        r = open_session(c, url, bob)
        assert r.status_code == 503 and r.json()["error"] == "session_table_full", r.text
        # the sessions already open keep working; closing one makes room again
        assert c.post(url, json=CALL, headers=headers(alice, a)).status_code == 200
        assert c.delete(url, headers=headers(alice, a)).status_code in (200, 204)
        assert c.post(url, json=CALL, headers=headers(alice, a)).status_code == 404
        assert open_session(c, url, bob).status_code == 200


def test_session_id_expires_and_keys_rotate_without_a_restart(demo_server, rules_dir, gateway):
    """The envelope's expiry is sealed in it (bastion_session_ttl); a rotated keyring is
    picked up live: old envelopes open while their key is in the ring, not after."""
    from addons.core.sessionseal import KEY_FILE, rotate
    demo = demo_server("json")
    gw = gateway(rules_dir(demo, **{"policy.yaml": ALLOW_ALL_POLICY}), extra_args=("--set", "bastion_session_ttl=3"))
    alice = gw.token("alice")
    url = gw.mcp_url()
    keys = gw.key_dir / KEY_FILE
    assert keys.exists() and oct(keys.stat().st_mode & 0o777) == "0o600"
    with httpx.Client(timeout=20) as c:
        short = open_session(c, url, alice).headers["mcp-session-id"]
        assert c.post(url, json=CALL, headers=headers(alice, short)).status_code == 200
        time.sleep(3.2)
        demo.clear_received()
        r = c.post(url, json=CALL, headers=headers(alice, short))
        assert r.status_code == 404 and r.json()["error"] == "unknown_session" and demo.received() == []
    gw2 = gateway(gw.rules, key_dir=gw.key_dir)          # default ttl, same key dir
    with httpx.Client(timeout=20) as c:
        old = open_session(c, gw2.mcp_url(), alice).headers["mcp-session-id"]
        rotate(keys)                                      # new sealing key; the old one still opens
        time.sleep(1.5)                                   # the keyring is polled every ~0.5 s
        new = open_session(c, gw2.mcp_url(), alice).headers["mcp-session-id"]
        assert new[:7] != old[:7]                         # version + key id: sealed under the new key
        for sid in (old, new):
            assert c.post(gw2.mcp_url(), json=CALL, headers=headers(alice, sid)).status_code == 200
        rotate(keys)                                      # keep=2: the first key leaves the ring
        time.sleep(1.5)
        demo.clear_received()
        r = c.post(gw2.mcp_url(), json=CALL, headers=headers(alice, old))
        assert r.status_code == 404 and demo.received() == []
        assert c.post(gw2.mcp_url(), json=CALL, headers=headers(alice, new)).status_code == 200
    assert "session keyring reloaded" in gw2.log_text()
    for line in keys.read_text().splitlines():
        if not line.startswith("#"):
            assert line.split()[1] not in gw2.log_text()   # no key in the log
