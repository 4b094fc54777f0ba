"""Upstream credential kinds (addons/core/identity/credentials.py): RFC 8693 token exchange client and
cache, vault lookups, consent errors, rules parsing, and the Injector's use of them."""
from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.parse

import httpx
import jwt
import pytest

from addons.core.connections import ConnectionRegistry
from addons.core.identity import credentials as creds
from addons.core.connections import parse_connections
from addons.hooks.connections import Injector, Router
from addons.hooks.httputil import checked_snapshot
from addons.core.mcpwire import parse_body
from addons.core.record import Decision, Identity, Transient, get_record
from addons.core.rules import RulesError
from addons.core.identity.vault import Vault

EXCHANGE = creds.ExchangeCredential(token_endpoint="https://as.example/token", audience="api", scope="read",
                                    client_id="gw id", client_secret="s3cr:et&", client_secret_source="env:X")
OK_BODY = {"access_token": "exchanged-1", "issued_token_type": creds.TOKEN_TYPE_URNS["access_token"],
           "token_type": "Bearer", "expires_in": 300}


# ---------------------------------------------------------------- token endpoint answers

def test_parse_token_response_ok_and_expiry_sources():
    now = 1000.0
    assert creds.parse_token_response(200, json.dumps(OK_BODY).encode(), now) == ("exchanged-1", 1300.0, None)
    at = jwt.encode({"sub": "a", "exp": 5000}, "k" * 32, algorithm="HS256")
    body = {**OK_BODY, "access_token": at}
    del body["expires_in"]
    assert creds.parse_token_response(200, json.dumps(body).encode(), now) == (at, 5000.0, None)
    body["access_token"] = "opaque"
    assert creds.parse_token_response(200, json.dumps(body).encode(), now) == ("opaque", None, None)  # not cached


@pytest.mark.parametrize("status,body,rule", [
    (503, b"down", "credential:exchange-unavailable"),
    (500, json.dumps({"error": "server_error"}).encode(), "credential:exchange-unavailable"),
    (400, b"<html>bad</html>", "credential:exchange-unavailable"),
    (400, json.dumps({"error": "invalid_grant"}).encode(), "credential:exchange-denied"),
    (401, json.dumps({"error": "invalid_client"}).encode(), "credential:exchange-denied"),
    (200, b"not json", "credential:exchange-unavailable"),
    (200, json.dumps({**OK_BODY, "access_token": ""}).encode(), "credential:exchange-unavailable"),
    # a token endpoint (or whoever answers for it) must not smuggle a header into the upstream request
    (200, json.dumps({**OK_BODY, "access_token": "tok\r\nX-Admin: 1"}).encode(), "credential:exchange-unavailable"),
    (200, json.dumps({**OK_BODY, "token_type": "N_A"}).encode(), "credential:exchange-unavailable"),
    (200, json.dumps({k: v for k, v in OK_BODY.items() if k != "issued_token_type"}).encode(),
     "credential:exchange-unavailable"),
    (302, b"", "credential:exchange-unavailable"),
])
def test_parse_token_response_failures_fail_closed(status, body, rule):
    with pytest.raises(creds.CredentialRefused) as e:
        creds.parse_token_response(status, body, 0.0)
    assert e.value.rule == rule
    assert e.value.status == (403 if rule.endswith("denied") else 503)


def test_denied_reason_names_only_a_clean_error_code():
    with pytest.raises(creds.CredentialRefused) as e:
        creds.parse_token_response(400, json.dumps({"error": "bad\nsecret-ish value", "error_description": "x"}).encode(), 0)
    assert e.value.reason.endswith("unknown") and "secret" not in e.value.reason


# ---------------------------------------------------------------- exchanger

class FakeAS:
    def __init__(self, status=200, body=None, delay=0.0):
        self.requests: list[httpx.Request] = []
        self.status, self.body, self.delay = status, body, delay
        self.n = 0

    async def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.n += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        body = self.body if self.body is not None else {**OK_BODY, "access_token": f"exchanged-{self.n}"}
        return httpx.Response(self.status, json=body)

    def exchanger(self, clock=time.time) -> creds.TokenExchanger:
        return creds.TokenExchanger(httpx.AsyncClient(transport=httpx.MockTransport(self.handler)), clock=clock)


async def test_exchange_request_is_rfc8693_with_client_secret_basic():
    fake = FakeAS()
    ex = fake.exchanger()
    assert await ex.token(EXCHANGE, "demo", "iss", "alice", "caller.jwt.value") == "exchanged-1"
    (req,) = fake.requests
    form = dict(urllib.parse.parse_qsl(req.content.decode()))
    assert form == {"grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                    "subject_token": "caller.jwt.value",
                    "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
                    "requested_token_type": "urn:ietf:params:oauth:token-type:access_token",
                    "audience": "api", "scope": "read"}
    user, _, pw = base64.b64decode(req.headers["authorization"].split()[1]).decode().partition(":")
    # RFC 6749 2.3.1: both parts form-urlencoded before Basic
    assert (urllib.parse.unquote_plus(user), urllib.parse.unquote_plus(pw)) == ("gw id", "s3cr:et&")
    assert "client_secret" not in form and "s3cr" not in repr(EXCHANGE)


async def test_exchange_cached_per_subject_connection_and_settings_until_expiry():
    now = [1000.0]
    fake = FakeAS()
    ex = fake.exchanger(clock=lambda: now[0])
    a1 = await ex.token(EXCHANGE, "demo", "iss", "alice", "t-a")
    assert await ex.token(EXCHANGE, "demo", "iss", "alice", "t-a2") == a1        # cached for alice
    b1 = await ex.token(EXCHANGE, "demo", "iss", "bob", "t-b")
    assert b1 != a1
    # same sub from another issuer, another connection, other settings: never shared
    assert await ex.token(EXCHANGE, "demo", "other-iss", "alice", "t") not in (a1, b1)
    assert await ex.token(EXCHANGE, "demo2", "iss", "alice", "t") not in (a1, b1)
    other = creds.ExchangeCredential(**{**EXCHANGE.__dict__, "audience": "api2"})
    assert await ex.token(other, "demo", "iss", "alice", "t") not in (a1, b1)
    assert fake.n == 5
    now[0] += 300 - creds.CACHE_MARGIN + 1                                       # within the margin of expiry
    assert await ex.token(EXCHANGE, "demo", "iss", "alice", "t-a") != a1
    assert fake.n == 6


async def test_concurrent_calls_share_one_exchange_and_failures_are_not_cached():
    fake = FakeAS(delay=0.05)
    ex = fake.exchanger()
    got = await asyncio.gather(*(ex.token(EXCHANGE, "demo", "iss", "alice", "t") for _ in range(10)))
    assert len(set(got)) == 1 and fake.n == 1
    bad = FakeAS(status=503, body={"error": "temporarily_unavailable"})
    ex = bad.exchanger()
    for _ in range(2):
        with pytest.raises(creds.CredentialRefused):
            await ex.token(EXCHANGE, "demo", "iss", "alice", "t")
    assert bad.n == 2


async def test_unreachable_endpoint_and_redirect_fail_closed():
    ex = creds.TokenExchanger()
    cred = creds.ExchangeCredential(token_endpoint="http://127.0.0.1:9/token", audience="api", timeout=2)
    with pytest.raises(creds.CredentialRefused) as e:
        await ex.token(cred, "demo", "iss", "alice", "secret-subject-token")
    assert e.value.status == 503 and "secret-subject-token" not in str(e.value)
    await ex.aclose()
    seen = []

    async def redirecting(request):
        seen.append(str(request.url))
        return httpx.Response(307, headers={"location": "https://evil.example/steal"})
    ex = creds.TokenExchanger(httpx.AsyncClient(transport=httpx.MockTransport(redirecting), follow_redirects=False))
    with pytest.raises(creds.CredentialRefused):
        await ex.token(EXCHANGE, "demo", "iss", "alice", "t")
    assert seen == ["https://as.example/token"]          # the subject token never followed the redirect


# ---------------------------------------------------------------- choosing the credential

def vault_with(tmp_path, **entries) -> Vault:
    v = Vault(tmp_path / "v", b"k" * 32)
    for sub, secret in entries.items():
        v.put("demo", sub, secret)
    return v


async def test_for_call_by_kind(tmp_path):
    fake = FakeAS()
    v = vault_with(tmp_path, alice="alice-key")
    up = creds.UpstreamCredentials(fake.exchanger(), lambda: v)
    got = await up.for_call("demo", EXCHANGE, None, "alice", "iss", "caller")
    assert (got.header, got.value, got.kind) == ("Authorization", "Bearer exchanged-1", "exchange")
    assert "exchanged" not in repr(got)
    with pytest.raises(creds.CredentialRefused) as e:           # no subject token (identity skipped)
        await up.for_call("demo", EXCHANGE, None, "alice", "iss", None)
    assert e.value.status == 403
    vc = creds.VaultCredential(header="X-Api-Key", scheme=None, authorize_url="https://consent.example/a")
    got = await up.for_call("demo", vc, None, "alice", "iss", None)
    assert (got.header, got.value, got.kind) == ("X-Api-Key", "alice-key", "vault")
    with pytest.raises(creds.CredentialRefused) as e:
        await up.for_call("demo", vc, None, "bob", "iss", None)
    assert (e.value.rule, e.value.authorize_url, e.value.status) == ("credential:vault-missing",
                                                                     "https://consent.example/a", 403)
    v.revoke("demo", "alice")
    with pytest.raises(creds.CredentialRefused) as e:
        await up.for_call("demo", vc, None, "alice", "iss", None)
    assert e.value.rule == "credential:vault-revoked"

    def broken():
        from addons.core.identity.vault import VaultError
        raise VaultError("no vault key")
    with pytest.raises(creds.CredentialRefused) as e:
        await creds.UpstreamCredentials(fake.exchanger(), broken).for_call("demo", vc, None, "alice", "iss", None)
    assert e.value.status == 503 and e.value.rule == "credential:vault-unavailable"
    from addons.core.connections import Credential
    svc = await up.for_call("demo", Credential("env:X"), "Bearer svc", "alice", "iss", None)
    assert (svc.header, svc.value, svc.kind) == ("Authorization", "Bearer svc", "service")
    assert await up.for_call("demo", None, None, "alice", "iss", None) is None


def test_consent_errors_by_protocol_revision():
    e = creds.CredentialRefused("vault", "r", status=403, error="credential_required", description="authorise",
                                rule="credential:vault-missing", authorize_url="https://consent.example/a")
    msgs = parse_body(b'[{"jsonrpc":"2.0","id":7,"method":"tools/list"},'
                      b'{"jsonrpc":"2.0","method":"notifications/initialized"}]').messages
    (err,) = creds.consent_errors(e, msgs, "2025-11-25")
    assert err["id"] == 7 and err["error"]["code"] == -32042
    (el,) = err["error"]["data"]["elicitations"]
    assert el["mode"] == "url" and el["url"] == "https://consent.example/a" and el["elicitationId"]
    (err,) = creds.consent_errors(e, msgs, "2026-07-28")      # -32042 was retired there
    assert err["error"]["code"] == creds.CREDENTIAL_REQUIRED
    assert err["error"]["data"] == {"authorize_url": "https://consent.example/a", "rule": "credential:vault-missing"}
    assert creds.consent_errors(e, msgs[1:], "2025-11-25") is None        # nothing to answer: HTTP 403
    down = creds.CredentialRefused("exchange", "r", status=503, error="temporarily_unavailable", description="d",
                                   rule="credential:exchange-unavailable")
    assert creds.consent_errors(down, msgs, "2025-11-25") is None


# ---------------------------------------------------------------- rules

def parse(tmp_path, credential: dict, env=None):
    doc = {"connections": {"api": {"upstream": "http://127.0.0.1:9100/mcp", "credential": credential}}}
    return parse_connections(tmp_path / "connections.yaml", doc)["api"]


def test_exchange_and_vault_rules(tmp_path, monkeypatch):
    monkeypatch.setenv("AS_SECRET", "client-secret-value")
    c = parse(tmp_path, {"exchange": {"token_endpoint": "https://as.example/token", "audience": "api",
                                      "scope": "read write", "subject_token_type": "jwt",
                                      "client_auth": {"client_id": "gw", "client_secret": {"from": "env:AS_SECRET"}}}})
    cred = c.credential
    assert isinstance(cred, creds.ExchangeCredential) and c.secret is None
    assert (cred.client_secret, cred.subject_token_type, cred.header, cred.scheme) == (
        "client-secret-value", creds.TOKEN_TYPE_URNS["jwt"], "Authorization", "Bearer")
    assert "client-secret-value" not in repr(c)
    v = parse(tmp_path, {"vault": {"authorize_url": "https://consent.example/x"}, "header": "X-Api-Key"}).credential
    assert isinstance(v, creds.VaultCredential) and v.header == "X-Api-Key" and v.scheme is None
    assert isinstance(parse(tmp_path, {"vault": True}).credential, creds.VaultCredential)


@pytest.mark.parametrize("credential,msg", [
    ({"exchange": {"token_endpoint": "https://as.example/token"}}, "needs an audience"),
    ({"exchange": {"token_endpoint": "ftp://as.example/token", "audience": "a"}}, "http(s) URL"),
    ({"exchange": {"token_endpoint": "https://u:p@as.example/token", "audience": "a"}}, "http(s) URL"),
    ({"exchange": {"token_endpoint": "https://as.example/t", "audience": "a", "secret": "x"}}, "unknown key"),
    ({"exchange": {"token_endpoint": "https://as.example/t", "audience": "a",
                   "client_auth": {"client_id": "gw", "client_secret": "inline-secret"}}}, "client_secret must be"),
    ({"exchange": {"token_endpoint": "https://as.example/t", "audience": "a",
                   "client_auth": {"client_id": "gw", "client_secret": {"from": "env:NOPE_UNSET_X"}}}}, "not set"),
    ({"exchange": {"token_endpoint": "https://as.example/t", "audience": "a", "subject_token_type": "saml"}},
     "subject_token_type"),
    ({"from": "env:X", "vault": True}, "one of from / exchange / vault"),
    ({"vault": {"authorize_url": "javascript:alert(1)"}}, "authorize_url"),
    ({"vault": True, "extra": 1}, "unknown key"),
])
def test_bad_delegated_credentials_are_rules_errors(tmp_path, credential, msg):
    with pytest.raises(RulesError) as e:
        parse(tmp_path, credential)
    assert msg in str(e.value) and "inline-secret" not in str(e.value)


# ---------------------------------------------------------------- Injector

@pytest.fixture
def injector_chain(tmp_path):
    from mitmproxy.test import taddons
    from addons.hooks.failclosed import FailClosed
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "connections.yaml").write_text(
        "connections:\n"
        "  ex:\n    upstream: http://127.0.0.1:9100/mcp\n"
        "    credential: {exchange: {token_endpoint: 'https://as.example/token', audience: api}}\n"
        "  vlt:\n    upstream: http://127.0.0.1:9101/mcp\n"
        "    credential: {vault: {authorize_url: 'https://consent.example/v'}}\n")
    reg = ConnectionRegistry()
    router, injector = FailClosed(Router(reg)), FailClosed(Injector(reg, identity_required=False))
    with taddons.context(router, injector) as tctx:
        tctx.configure(router, bastion_rules=str(tmp_path / "rules"))
        tctx.configure(injector, bastion_vault=str(tmp_path / "none.vault"))
        yield router, injector


def routed(router, conn: str, sub="alice", token="caller.jwt", version="2025-06-18"):
    from mitmproxy.test import tflow, tutils
    body = json.dumps({"jsonrpc": "2.0", "id": 3, "method": "tools/list"}).encode()
    f = tflow.tflow(req=tutils.treq(method=b"POST", path=f"/mcp/{conn}".encode(), host="gw.example", port=8080,
                                    headers=((b"content-type", b"application/json"),), content=body))
    f.request.headers["authorization"] = "Bearer [redacted]"
    router.requestheaders(f)
    rec = get_record(f.metadata)
    rec.identity, rec.subject_token, rec.protocol_version = Identity(sub, issuer="iss"), Transient(token), version
    parsed = parse_body(body)
    rec.messages, rec.batch = parsed.messages, parsed.batch
    rec.decisions = [Decision("allow", "r", message_id=m.id) for m in parsed.messages]
    rec.checked = checked_snapshot(f.request)
    return f, rec


async def test_injector_sends_exchanged_token_and_drops_the_subject_token(injector_chain):
    router, injector = injector_chain
    fake = FakeAS()
    injector.wrapped.exchanger._client = httpx.AsyncClient(transport=httpx.MockTransport(fake.handler))
    f, rec = routed(router, "ex")
    await injector.request(f)
    assert f.response is None and rec.credential == ("Authorization", "Bearer exchanged-1")
    assert rec.subject_token is None and rec.credential_kind == "exchange"
    assert dict(urllib.parse.parse_qsl(fake.requests[0].content.decode()))["subject_token"] == "caller.jwt"
    # a refused flow also drops the subject token
    f, rec = routed(router, "ex")
    from mitmproxy.test import tutils
    f.response = tutils.tresp()
    await injector.request(f)
    assert rec.subject_token is None and fake.n == 1


async def test_injector_refuses_vault_miss_with_consent_and_down_exchange_with_503(injector_chain):
    router, injector = injector_chain
    f, rec = routed(router, "vlt", version="2025-11-25")
    await injector.request(f)
    body = json.loads(f.response.content)
    assert f.response.status_code == 200 and body["id"] == 3 and body["error"]["code"] == -32042
    assert rec.refusal_rule == "credential:vault-missing" and rec.credential_kind == "vault"
    assert f.request.host == "gw.example"                                  # not pointed upstream

    async def down(request):
        raise httpx.ConnectError("refused")
    injector.wrapped.exchanger._client = httpx.AsyncClient(transport=httpx.MockTransport(down))
    f, rec = routed(router, "ex")
    await injector.request(f)
    assert f.response.status_code == 503 and json.loads(f.response.content)["error"] == "temporarily_unavailable"
    assert rec.refusal_rule == "credential:exchange-unavailable" and f.request.host == "gw.example"
    assert "caller.jwt" not in f.response.text and "caller.jwt" not in (rec.refusal or "")


def test_subject_token_never_survives_a_copy_of_the_flow(injector_chain):
    import copy
    import pickle
    router, _ = injector_chain
    f, rec = routed(router, "ex", token="caller.jwt.secret")
    assert "caller.jwt.secret" not in repr(rec)
    assert get_record(f.copy().metadata).subject_token is None           # mitmweb "duplicate"
    assert "caller.jwt.secret" not in str(f.get_state())
    assert copy.deepcopy(rec) is None and copy.deepcopy(rec.subject_token) is None and b"caller.jwt.secret" not in pickle.dumps(rec.subject_token)
    assert rec.subject_token.value == "caller.jwt.secret"                 # the live flow still has it


async def test_identity_keeps_the_caller_token_only_for_exchange_connections(tmp_path, monkeypatch):
    from mitmproxy.test import taddons, tflow, tutils
    from addons.core.identity import jwtverify as jv
    from addons.hooks.identity import Identity as IdentityAddon
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "connections.yaml").write_text(
        "connections:\n"
        "  ex:\n    upstream: http://127.0.0.1:9100/mcp\n"
        "    credential: {exchange: {token_endpoint: 'https://as.example/token', audience: api}}\n"
        "  plain:\n    upstream: http://127.0.0.1:9101/mcp\n")
    reg = ConnectionRegistry()
    router, ident = Router(reg), IdentityAddon(reg)
    with taddons.context(router, ident) as tctx:
        tctx.configure(router, bastion_rules=str(tmp_path / "rules"))
        tctx.configure(ident, bastion_key_dir=str(tmp_path / "keys"))
        token = jv.mint_token(tmp_path / "keys", "alice")
        for conn, kept in (("ex", True), ("plain", False)):
            f = tflow.tflow(req=tutils.treq(method=b"POST", path=f"/mcp/{conn}".encode(), content=b"{}"))
            f.request.headers["authorization"] = f"Bearer {token}"
            router.requestheaders(f)
            await ident.request(f)
            rec = get_record(f.metadata)
            assert f.response is None and rec.identity.sub == "alice"
            assert (rec.subject_token.value if rec.subject_token else None) == (token if kept else None)
            assert token not in str(f.request.headers)          # redacted from the flow either way


# ---------------------------------------------------------------- oauth vault entries: refresh with rotation

REFRESH = creds.RefreshConfig("https://as.example/token", client_id="gw", client_secret="cs")


def oauth_setup(tmp_path, fake: FakeAS, expires_in: float = 5):
    v = Vault(tmp_path / "v", b"k" * 32)
    v.put("demo", "alice", "stale-access", "oauth", time.time() + expires_in, refresh_token="rt-1")
    stored = []

    async def store(connection, sub, access, refresh, expires):
        stored.append((connection, sub, access, refresh))
        v.put(connection, sub, access, "oauth", expires, refresh_token=refresh)
    up = creds.UpstreamCredentials(fake.exchanger(), lambda: v, store)
    cred = creds.VaultCredential(authorize_url="https://consent.example/a", refresh=REFRESH)
    return v, up, cred, stored


async def test_expiring_oauth_entry_is_refreshed_once_and_the_rotated_token_stored(tmp_path):
    fake = FakeAS(body={"access_token": "fresh-access", "token_type": "Bearer", "expires_in": 3600,
                        "refresh_token": "rt-2"}, delay=0.05)
    v, up, cred, stored = oauth_setup(tmp_path, fake)       # expires within the 30 s margin
    got = await asyncio.gather(*(up.for_call("demo", cred, None, "alice", "iss", None) for _ in range(5)))
    assert {g.value for g in got} == {"Bearer fresh-access"} and fake.n == 1     # one refresh for all
    form = dict(urllib.parse.parse_qsl(fake.requests[0].content.decode()))
    assert form == {"grant_type": "refresh_token", "refresh_token": "rt-1"}
    assert fake.requests[0].headers["authorization"].startswith("Basic ")
    assert stored == [("demo", "alice", "fresh-access", "rt-2")] and v.refresh_token("demo", "alice") == "rt-2"
    assert (await up.for_call("demo", cred, None, "alice", "iss", None)).value == "Bearer fresh-access"
    assert fake.n == 1                                        # fresh entry used as is


async def test_refresh_without_rotation_keeps_the_old_refresh_token(tmp_path):
    fake = FakeAS(body={"access_token": "fresh", "token_type": "bearer", "expires_in": 600})
    v, up, cred, stored = oauth_setup(tmp_path, fake)
    await up.for_call("demo", cred, None, "alice", "iss", None)
    assert stored[0][3] == "rt-1"


@pytest.mark.parametrize("status,body,rule,code", [
    (400, {"error": "invalid_grant"}, "credential:vault-refresh-denied", 403),
    (503, {"error": "temporarily_unavailable"}, "credential:vault-refresh-unavailable", 503),
])
async def test_failed_refresh_is_refused_before_the_upstream(tmp_path, status, body, rule, code):
    v, up, cred, stored = oauth_setup(tmp_path, FakeAS(status=status, body=body))
    with pytest.raises(creds.CredentialRefused) as e:
        await up.for_call("demo", cred, None, "alice", "iss", None)
    assert (e.value.rule, e.value.status) == (rule, code) and stored == []
    if code == 403:
        assert e.value.authorize_url == "https://consent.example/a"     # authorise again


async def test_expired_entry_without_refresh_config_needs_consent(tmp_path):
    fake = FakeAS()
    v, up, _, _ = oauth_setup(tmp_path, fake)
    with pytest.raises(creds.CredentialRefused) as e:
        await up.for_call("demo", creds.VaultCredential(), None, "alice", "iss", None)
    assert e.value.rule == "credential:vault-expired" and fake.n == 0


def test_vault_refresh_rules(tmp_path, monkeypatch):
    monkeypatch.setenv("RS", "refresh-client-secret")
    v = parse(tmp_path, {"vault": {"refresh": {"token_endpoint": "https://as.example/token",
                                               "client_auth": {"client_id": "gw", "client_secret": {"from": "env:RS"}}}}})
    r = v.credential.refresh
    assert (r.token_endpoint, r.client_id, r.client_secret) == ("https://as.example/token", "gw", "refresh-client-secret")
    for bad in ({"refresh": {"token_endpoint": "nope"}}, {"refresh": {"token_endpoint": "https://a/t", "x": 1}},
                {"refresh": {"token_endpoint": "https://a/t", "client_auth": {"client_id": "gw", "client_secret": "inline"}}}):
        with pytest.raises(RulesError):
            parse(tmp_path, {"vault": bad})
