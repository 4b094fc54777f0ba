"""Issue 20 with real processes: delegated identity upstream.

- Token exchange (RFC 8693) against a real authorisation server (authlib, tests/e2e/oauth_as.py):
  two users call the same tool through the gateway; the demo server, verifying the exchanged
  JWTs against the AS's JWKS (`--verify-jwt-jwks`), sees two different tokens with the right
  sub, aud and act; the callers' tokens never reach it; one exchange per user (counted at the
  AS); a token endpoint that is down or refuses -> refusal, nothing forwarded.
- Per-user vault credentials set with the real `mcp-bastion creds` CLI: each user reaches the
  upstream with their own key; no entry -> a JSON-RPC error naming the consent URL (URL
  elicitation -32042 on 2025-11-25); a revoked entry -> refused before the upstream.
- The audit store names the credential kind of every call, never its value.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from addons.core.identity import jwtverify as jv
from demo.client import connect
from tests.e2e.conftest import ALLOW_ALL_POLICY, BIN, ROOT, Proc, free_port

HDRS = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
CLIENT_ID, AUDIENCE = "mcp-bastion-gateway", "demo-api"
CONSENT_URL = "https://consent.example/authorize/demo"


def init(version: str = "2025-06-18") -> dict:
    return {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": version, "capabilities": {"elicitation": {"url": {}}},
                       "clientInfo": {"name": "raw", "version": "1"}}}


def fp(value: str) -> str:
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:16]


def sql(store: Path, query: str) -> list[dict]:
    p = subprocess.run([str(BIN / "mcp-bastion"), "sql", query, "--format", "json", "--store", str(store)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def upstream_auth(demo) -> list[str]:
    return [v for r in demo.received() for k, v in r["headers"] if k.lower() == "authorization"]


def start_auth_server(tmp_path: Path, procs: list, *extra: str) -> tuple[Path, Path, str]:
    """The authlib authorisation server, trusting the gateway's embedded issuer key (created
    here, before the gateway). -> (key_dir, client secret file, AS URL)"""
    key_dir = tmp_path / "keys"
    jv.local_key_source(str(key_dir))
    secret = tmp_path / "as-client-secret"
    secret.write_text("as-client-secret-0123456789\n")
    as_port = free_port()
    auth_server = Proc("oauth-as", [sys.executable, "-m", "tests.e2e.oauth_as", "--port", str(as_port),
                                    "--subject-key", str(key_dir / jv.LOCAL_KEY_FILE), "--client-id", CLIENT_ID,
                                    "--client-secret-file", str(secret), "--audience", AUDIENCE, *extra],
                       tmp_path / "oauth-as.log").start()
    procs.append(auth_server)
    auth_server.wait_port(as_port, marker="READY")
    return key_dir, secret, f"http://127.0.0.1:{as_port}"


def jwt_demo(demo_server, as_url: str):
    """The demo server accepting only JWTs of the AS with the upstream's audience."""
    return demo_server("json", args=("--verify-jwt-jwks", f"{as_url}/jwks", "--audience", AUDIENCE,
                                     "--issuer", as_url))


@pytest.fixture
def exchange_stack(tmp_path, procs, demo_server, rules_dir, gateway):
    """AS (authlib) + demo server verifying its JWTs + gateway exchanging callers' tokens."""
    key_dir, secret, as_url = start_auth_server(tmp_path, procs, "--deny-sub", "mallory")
    demo = jwt_demo(demo_server, as_url)
    dead = f"http://127.0.0.1:{free_port()}/token"     # nothing listens there

    def conn(endpoint: str) -> dict:
        return {"upstream": demo.url, "credential": {"exchange": {
            "token_endpoint": endpoint, "audience": AUDIENCE, "scope": "demo.read",
            "client_auth": {"client_id": CLIENT_ID, "client_secret": {"from": f"file:{secret}"}}}}}
    conns = {"connections": {"demo": conn(f"{as_url}/token"), "dead": conn(dead)}}
    rules = rules_dir(demo, **{"policy.yaml": ALLOW_ALL_POLICY, "connections.yaml": json.dumps(conns)})
    gw = gateway(rules, key_dir=key_dir)
    return demo, gw, as_url


async def test_two_users_get_their_own_exchanged_tokens(exchange_stack):
    demo, gw, as_url = exchange_stack
    callers = {sub: gw.token(sub, ["e2e-all"]) for sub in ("alice", "bob")}
    for sub, token in callers.items():
        async with connect(gw.mcp_url(), token) as c:
            await c.list_tools()         # per-user credentials: the gateway learns schemas from the caller's list
            for _ in range(3):
                res = await c.call_tool("whoami", {})
                assert not res.is_error, res
                assert res.structured_content == {"sub": sub, "aud": AUDIENCE, "act": {"sub": CLIENT_ID},
                                                  "iss": as_url}
    stats = httpx.get(f"{as_url}/stats").json()
    # cached: one exchange per user for the token's lifetime (initialize, list, 3 calls each)
    assert stats["by_sub"] == {"alice": 1, "bob": 1} and stats["token_requests"] == 2
    seen = set(upstream_auth(demo))
    assert len(seen) == 2                                        # two different exchanged tokens
    received = json.dumps(demo.received())
    for token in callers.values():                               # callers' tokens never reached it
        assert fp(f"Bearer {token}") not in seen and token not in received
        assert token not in gw.log_text()
    # the upstream really verifies: a caller's own token, sent to it directly, is refused
    r = httpx.post(demo.url, json=init(), headers={**HDRS, "authorization": f"Bearer {callers['alice']}"})
    assert r.status_code == 401
    rows = sql(gw.recordings, "SELECT DISTINCT sub, credential FROM exchanges WHERE connection = 'demo' ORDER BY sub")
    assert rows == [{"sub": "alice", "credential": "exchange"}, {"sub": "bob", "credential": "exchange"}]
    events = "\n".join(p.read_text() for p in gw.recordings.rglob("journal-*.jsonl"))
    for token in callers.values():
        assert token not in events


async def test_token_endpoint_down_or_refusing_is_refused_and_nothing_forwarded(exchange_stack):
    demo, gw, _ = exchange_stack
    async with httpx.AsyncClient(timeout=20) as h:
        r = await h.post(gw.mcp_url("dead"), json=init(),
                         headers={**HDRS, "authorization": f"Bearer {gw.token('alice', ['e2e-all'])}"})
        assert r.status_code == 503 and r.json()["error"] == "temporarily_unavailable"
        assert r.headers["retry-after"] == "5"
        # the AS refuses to delegate mallory: 403, and the legitimate caller still works
        r = await h.post(gw.mcp_url(), json=init(),
                         headers={**HDRS, "authorization": f"Bearer {gw.token('mallory', ['e2e-all'])}"})
        assert r.status_code == 403 and r.json()["error"] == "access_denied"
        assert demo.received() == []                             # the upstream saw nothing
        r = await h.post(gw.mcp_url(), json=init(),
                         headers={**HDRS, "authorization": f"Bearer {gw.token('alice', ['e2e-all'])}"})
        assert r.status_code == 200 and "result" in r.json()
    assert len(demo.received()) == 1
    refusals = sql(gw.recordings, "SELECT connection, sub, rule, reason, status, credential FROM refusals ORDER BY time")
    assert [(x["connection"], x["sub"], x["rule"], x["status"], x["credential"]) for x in refusals] == [
        ("dead", "alice", "credential:exchange-unavailable", 503, "exchange"),
        ("demo", "mallory", "credential:exchange-denied", 403, "exchange")]
    assert "unreachable" in refusals[0]["reason"] and "access_denied" in refusals[1]["reason"]


# ---------------------------------------------------------------- per-user vault

def creds_cli(vault: Path, key: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "mcp-bastion"), "creds", "--vault", str(vault), "--key", f"file:{key}", *args],
                          input=stdin, capture_output=True, text=True, timeout=30, cwd=ROOT)


@pytest.fixture
def vault_stack(tmp_path, demo_server, rules_dir, gateway):
    keys = {"alice": "alice-upstream-key-7f3a9c", "bob": "bob-upstream-key-2b8e41"}
    users = tmp_path / "user-tokens.json"
    users.write_text(json.dumps({v: k for k, v in keys.items()}))
    demo = demo_server("json", args=("--user-tokens", str(users)))
    vault, key = tmp_path / "vault" / "creds.vault", tmp_path / "vault" / "vault.key"
    for sub, secret in keys.items():
        p = creds_cli(vault, key, "set", "--connection", "demo", "--subject", sub, stdin=secret + "\n")
        assert p.returncode == 0 and secret not in p.stdout + p.stderr, p.stderr
    conns = {"connections": {"demo": {"upstream": demo.url,
                                      "credential": {"vault": {"authorize_url": CONSENT_URL}}}}}
    rules = rules_dir(demo, **{"policy.yaml": ALLOW_ALL_POLICY, "connections.yaml": json.dumps(conns)})
    gw = gateway(rules, extra_args=("--set", f"bastion_vault={vault}", "--set", f"bastion_vault_key=file:{key}"))
    return demo, gw, vault, key, keys


async def test_vault_per_user_credentials_consent_and_revocation(vault_stack):
    demo, gw, vault, key, keys = vault_stack
    for sub in ("alice", "bob"):
        async with connect(gw.mcp_url(), gw.token(sub, ["e2e-all"])) as c:
            await c.list_tools()
            res = await c.call_tool("whoami", {})
            assert not res.is_error and res.structured_content == {"sub": sub}
    assert set(upstream_auth(demo)) == {fp(f"Bearer {keys['alice']}"), fp(f"Bearer {keys['bob']}")}
    listing = creds_cli(vault, key, "list")
    assert listing.returncode == 0 and "alice" in listing.stdout and "bob" in listing.stdout
    assert not any(s in listing.stdout for s in keys.values())
    assert not any(s.encode() in vault.read_bytes() for s in keys.values())     # encrypted at rest

    demo.clear_received()
    carol = gw.token("carol", ["e2e-all"])
    async with httpx.AsyncClient(timeout=20) as h:
        # no entry, 2025-11-25 session: URLElicitationRequiredError with the consent URL
        r = await h.post(gw.mcp_url(), json=init("2025-11-25"), headers={**HDRS, "authorization": f"Bearer {carol}"})
        body = r.json()
        assert r.status_code == 200 and body["id"] == 1 and body["error"]["code"] == -32042
        (elicitation,) = body["error"]["data"]["elicitations"]
        assert elicitation["mode"] == "url" and elicitation["url"] == CONSENT_URL and elicitation["elicitationId"]
        # older revisions have no URL elicitation: a gateway error code with the URL in data
        r = await h.post(gw.mcp_url(), json=init("2025-06-18"), headers={**HDRS, "authorization": f"Bearer {carol}"})
        assert r.json()["error"]["code"] == -32038 and r.json()["error"]["data"]["authorize_url"] == CONSENT_URL
        assert demo.received() == []

        # revoke alice while the gateway runs: refused within the reload interval, bob unaffected
        alice = gw.token("alice", ["e2e-all"])
        p = creds_cli(vault, key, "revoke", "--connection", "demo", "--subject", "alice")
        assert p.returncode == 0, p.stderr
        deadline = time.monotonic() + 5
        while True:
            r = await h.post(gw.mcp_url(), json=init(), headers={**HDRS, "authorization": f"Bearer {alice}"})
            if "error" in r.json() or time.monotonic() > deadline:
                break
            demo.clear_received()
            await asyncio.sleep(0.2)
        assert r.json()["error"]["code"] == -32038 and "revoked" in r.json()["error"]["message"]
        demo.clear_received()
        r = await h.post(gw.mcp_url(), json=init(), headers={**HDRS, "authorization": f"Bearer {alice}"})
        assert r.json()["error"]["code"] == -32038
        assert demo.received() == []
        r = await h.post(gw.mcp_url(), json=init(),
                         headers={**HDRS, "authorization": f"Bearer {gw.token('bob', ['e2e-all'])}"})
        assert "result" in r.json()
    assert upstream_auth(demo) == [fp(f"Bearer {keys['bob']}")]
    rules = {x["rule"] for x in sql(gw.recordings, "SELECT rule FROM refusals WHERE credential = 'vault'")}
    assert rules == {"credential:vault-missing", "credential:vault-revoked"}
    listing = creds_cli(vault, key, "list")
    alice_row = next(line for line in listing.stdout.splitlines() if "alice" in line)
    assert alice_row.split()[-1] != "-"                            # shown as revoked


async def test_oauth_vault_entry_refreshed_with_rotation(tmp_path, procs, demo_server, rules_dir, gateway):
    key_dir, secret, as_url = start_auth_server(tmp_path, procs, "--refresh-token", "alice=rt-alice-1")
    demo = jwt_demo(demo_server, as_url)
    vault, key = tmp_path / "vault" / "creds.vault", tmp_path / "vault" / "vault.key"
    (tmp_path / "rt").write_text("rt-alice-1\n")
    # an access token about to expire (inside the 30 s refresh margin) and its refresh token
    p = creds_cli(vault, key, "set", "--connection", "demo", "--subject", "alice", "--kind", "oauth",
                  "--refresh-token-file", str(tmp_path / "rt"), "--expires-in", "5", stdin="stale-access-token\n")
    assert p.returncode == 0, p.stderr
    conns = {"connections": {"demo": {"upstream": demo.url, "credential": {"vault": {
        "authorize_url": CONSENT_URL,
        "refresh": {"token_endpoint": f"{as_url}/token",
                    "client_auth": {"client_id": CLIENT_ID, "client_secret": {"from": f"file:{secret}"}}}}}}}}
    rules = rules_dir(demo, **{"policy.yaml": ALLOW_ALL_POLICY, "connections.yaml": json.dumps(conns)})
    gw = gateway(rules, key_dir=key_dir,
                 extra_args=("--set", f"bastion_vault={vault}", "--set", f"bastion_vault_key=file:{key}"))
    async with connect(gw.mcp_url(), gw.token("alice", ["e2e-all"])) as c:
        await c.list_tools()
        for _ in range(3):
            res = await c.call_tool("whoami", {})
            assert not res.is_error and res.structured_content["sub"] == "alice"
            assert res.structured_content["aud"] == AUDIENCE
    stats = httpx.get(f"{as_url}/stats").json()
    assert stats["refreshed"] == {"alice": 1}                   # one refresh, then the fresh token is reused
    assert fp("Bearer stale-access-token") not in upstream_auth(demo) and len(set(upstream_auth(demo))) == 1
    # rotation: the old refresh token is spent at the AS, and the vault holds the new one
    r = httpx.post(f"{as_url}/token", data={"grant_type": "refresh_token", "refresh_token": "rt-alice-1"},
                   auth=(CLIENT_ID, secret.read_text().strip()))
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
    from addons.core.identity.vault import Vault, load_key
    stored = Vault.load(vault, load_key(f"file:{key}")).refresh_token("demo", "alice")
    assert stored and stored != "rt-alice-1" and stored.encode() not in vault.read_bytes()
    r = httpx.post(f"{as_url}/token", data={"grant_type": "refresh_token", "refresh_token": stored},
                   auth=(CLIENT_ID, secret.read_text().strip()))
    assert r.status_code == 200                                 # the rotated token the gateway stored works
    row = next(line for line in creds_cli(vault, key, "list").stdout.splitlines() if "alice" in line)
    assert "oauth" in row
    assert {x["credential"] for x in sql(gw.recordings, "SELECT credential FROM exchanges")} == {"vault"}
