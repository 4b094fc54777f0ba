"""Issue 18, sessions: one caller opening and closing many sessions cannot push a victim's
session binding out of the gateway, an id the gateway does not know is refused (404), and
the limits refuse (429 per identity, 503 in all) instead of evicting. Real mitmdump, real
stateful demo server, raw HTTP so the attacker can pick session ids."""
from __future__ import annotations

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
