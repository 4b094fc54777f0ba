"""Identity addon: every bad-token case is refused (401/403/400) with the right
WWW-Authenticate, logged without the token, and leaves no identity; legitimate tokens
pass and set rec.identity. Embedded issuer, local PEM, per-connection audience/roles,
RFC 9728 metadata, revocation reload."""
from __future__ import annotations

import base64
import json
import logging
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow, tutils

from addons.core.connections import ConnectionRegistry
from addons.core.identity import jwtverify as jv
from addons.hooks.connections import Router
from addons.hooks.identity import Identity
from addons.core.record import get_record

HOST = "gw.test:8080"


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    # the addon creates its default key dir (.secrets) relative to the working directory
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def key_dir(tmp_path):
    return tmp_path / "keys"


@pytest.fixture
def ident(key_dir):
    a = Identity()
    with taddons.context(a) as tctx:
        tctx.configure(a, bastion_key_dir=str(key_dir))
        yield a, tctx


def flow(auth: str | list[str] | None = None, path: str = "/mcp/demo", connection: str | None = "demo",
         method: str = "POST"):
    f = tflow.tflow(req=tutils.treq(method=method.encode(), path=path.encode(), content=b"{}",
                                    headers=((b"host", HOST.encode()), (b"content-type", b"application/json"))))
    f.client_conn.timestamp_tls_setup = None  # plain http listener
    for v in ([auth] if isinstance(auth, str) else auth or []):
        f.request.headers.add("Authorization", v)
    get_record(f.metadata).connection = connection
    return f


def b64(obj) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def assert_refused(f, status: int, error: str | None = "invalid_token"):
    assert f.response is not None, "request was not refused"
    assert f.response.status_code == status
    rec = get_record(f.metadata)
    assert rec.identity is None
    assert rec.refusal
    body = json.loads(f.response.content)
    assert set(body) == {"error", "error_description"}
    if status in (400, 401):
        www = f.response.headers["www-authenticate"]
        assert www.startswith("Bearer ")
        assert f'resource_metadata="http://{HOST}/.well-known/oauth-protected-resource/mcp/demo"' in www
        if error:
            assert f'error="{error}"' in www
        else:
            assert "error=" not in www
    return body


# ------------------------------------------------------------------ legitimate use

async def test_valid_token_sets_identity(ident, key_dir):
    a, _ = ident
    tok = jv.mint_token(key_dir, "alice", roles=("analyst", "ops"), client_id="ci-job-7")
    f = flow(f"Bearer {tok}")
    await a.request(f)
    assert f.response is None
    i = get_record(f.metadata).identity
    assert i.sub == "alice" and i.roles == ("analyst", "ops") and i.client_id == "ci-job-7"
    assert i.issuer == jv.LOCAL_ISSUER and i.token_id and len(i.token_id) == 32
    # the token is consumed: nothing after identity (mitmweb, flow files, upstream) sees it
    assert f.request.headers["authorization"] == "Bearer [redacted]"
    assert tok not in str(f.get_state())


@pytest.mark.parametrize("fields,left", [
    ([(b"Authorization", b"Bearer abc")], [b"Bearer [redacted]"]),
    ([(b"host", b"x"), (b"AUTHORIZATION", b"Bearer a b  c"), (b"accept", b"*/*"), (b"authorization", b"tok")],
     [b"Bearer [redacted]", b"[redacted]"]),
    ([(b"authorization", b"Basic \xff\xfe secret"), (b"authorization", b"")], [b"Basic [redacted]", b"[redacted]"]),
    ([(b"authorization", b"eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhIn0.sig")], [b"[redacted]"]),      # a bare token
    ([(b"authorization", b"eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhIn0.sig extra")], [b"[redacted]"]),
    ([(b"accept", b"*/*")], []),
])
def test_authorization_taken_and_redacted_in_place(fields, left):
    """What the identity stage takes is what mitmproxy's Headers.get_all reads; every
    Authorization field stays in place with its own name, and keeps at most its scheme: a
    token sent without one leaves nothing of itself."""
    from addons.hooks.identity import redact_authorization
    req = tutils.treq(headers=tuple(fields))
    expected = tutils.treq(headers=tuple(fields))
    values = expected.headers.get_all("authorization")
    assert redact_authorization(req) == tuple(values)
    assert [k for k, _ in req.headers.fields] == [k for k, _ in fields]
    assert [v for k, v in req.headers.fields if k.lower() == b"authorization"] == left
    assert all(b"abc" not in v and b"secret" not in v and b"tok" not in v and b"eyJ" not in v
               for _, v in req.headers.fields)


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "BeArEr"])
async def test_scheme_is_case_insensitive(ident, key_dir, scheme):
    a, _ = ident
    f = flow(f"{scheme} {jv.mint_token(key_dir, 'bob')}")
    await a.request(f)
    assert f.response is None and get_record(f.metadata).identity.sub == "bob"


async def test_key_created_with_private_modes(ident, key_dir):
    assert (key_dir / jv.LOCAL_KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert key_dir.stat().st_mode & 0o777 == 0o700


async def test_already_answered_flow_is_left_alone(ident):
    a, _ = ident
    f = flow(None)
    f.response = tutils.tresp(status_code=404)
    await a.request(f)
    assert f.response.status_code == 404


async def test_non_mcp_path_not_authenticated(ident):
    a, _ = ident
    f = flow(None, path="/something", connection=None)
    await a.request(f)
    assert f.response is None  # the Router / Injector answer unrouted paths


# ------------------------------------------------------------------ bad input

async def test_missing_token_401_without_error(ident, caplog):
    a, _ = ident
    f = flow(None)
    with caplog.at_level(logging.WARNING, "bastion.identity"):
        await a.request(f)
    assert_refused(f, 401, error=None)
    assert "no Authorization header" in caplog.text


async def test_expired(ident, key_dir, caplog):
    a, _ = ident
    tok = jv.mint_token(key_dir, "alice", iat=int(time.time()) - 7200, exp=int(time.time()) - 600)
    f = flow(f"Bearer {tok}")
    with caplog.at_level(logging.WARNING, "bastion.identity"):
        await a.request(f)
    assert_refused(f, 401)
    assert "token expired" in caplog.text
    assert tok not in caplog.text and tok.split(".")[2] not in caplog.text


async def test_expired_within_leeway_accepted(ident, key_dir):
    a, _ = ident
    tok = jv.mint_token(key_dir, "alice", exp=int(time.time()) - 5)
    f = flow(f"Bearer {tok}")
    await a.request(f)
    assert f.response is None


async def test_leeway_option(ident, key_dir):
    a, tctx = ident
    tctx.configure(a, bastion_leeway=0)
    f = flow(f"Bearer {jv.mint_token(key_dir, 'alice', exp=int(time.time()) - 5)}")
    await a.request(f)
    assert_refused(f, 401)


async def test_nbf_in_future(ident, key_dir):
    a, _ = ident
    f = flow(f"Bearer {jv.mint_token(key_dir, 'alice', nbf=int(time.time()) + 600)}")
    await a.request(f)
    assert_refused(f, 401)


async def test_iat_in_future(ident, key_dir):
    a, _ = ident
    f = flow(f"Bearer {jv.mint_token(key_dir, 'alice', iat=int(time.time()) + 600)}")
    await a.request(f)
    assert_refused(f, 401)


async def test_wrong_issuer(ident, key_dir, caplog):
    a, _ = ident
    f = flow(f"Bearer {jv.mint_token(key_dir, 'alice', iss='https://evil.example')}")
    with caplog.at_level(logging.WARNING, "bastion.identity"):
        await a.request(f)
    body = assert_refused(f, 401)
    assert "wrong issuer" in caplog.text
    assert "issuer" not in body["error_description"]  # no detail leaks to the caller


async def test_wrong_audience(ident, key_dir):
    a, _ = ident
    f = flow(f"Bearer {jv.mint_token(key_dir, 'alice', aud='some-other-api')}")
    await a.request(f)
    assert_refused(f, 401)


@pytest.mark.parametrize("claim", ["exp", "iat", "sub", "iss"])
async def test_required_claims(ident, key_dir, claim):
    a, _ = ident
    key = serialization.load_pem_private_key((key_dir / jv.LOCAL_KEY_FILE).read_bytes(), None)
    now = int(time.time())
    claims = {"iss": jv.LOCAL_ISSUER, "sub": "alice", "aud": jv.DEFAULT_AUDIENCE, "iat": now, "exp": now + 60}
    del claims[claim]
    tok = jwt.encode(claims, key, "ES256", headers={"kid": jv.jwk_thumbprint(key.public_key())})
    f = flow(f"Bearer {tok}")
    await a.request(f)
    assert_refused(f, 401)


async def test_unknown_kid(ident, key_dir):
    a, _ = ident
    tok = jv.mint_token(key_dir, "alice")
    key = serialization.load_pem_private_key((key_dir / jv.LOCAL_KEY_FILE).read_bytes(), None)
    forged = jwt.encode(jwt.decode(tok, options={"verify_signature": False}), key, "ES256",
                        headers={"kid": "someone-elses-key"})
    f = flow(f"Bearer {forged}")
    await a.request(f)
    assert_refused(f, 401)


async def test_signed_by_another_key(ident, key_dir, tmp_path):
    a, _ = ident
    other = tmp_path / "other"
    tok = jv.mint_token(other, "alice")  # same issuer name, different key
    f = flow(f"Bearer {tok}")
    await a.request(f)
    assert_refused(f, 401)


async def test_alg_none(ident, key_dir):
    a, _ = ident
    now = int(time.time())
    claims = {"iss": jv.LOCAL_ISSUER, "sub": "root", "aud": jv.DEFAULT_AUDIENCE, "iat": now, "exp": now + 60,
              "roles": ["admin"]}
    for alg in ("none", "None", "NONE"):
        tok = f"{b64({'alg': alg, 'typ': 'JWT'})}.{b64(claims)}."
        f = flow(f"Bearer {tok}")
        await a.request(f)
        assert_refused(f, 401)


async def test_hs256_with_public_key_as_secret(key_dir, tmp_path, caplog):
    """Classic key confusion: the attacker signs HS256 with the (public) RSA key PEM."""
    priv = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub_pem = priv.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "rsa.pub").write_bytes(pub_pem)
    a = Identity()
    with taddons.context(a) as tctx:
        tctx.configure(a, bastion_public_key=str(tmp_path / "rsa.pub"), bastion_issuer="https://idp.test")
        now = int(time.time())
        claims = {"iss": "https://idp.test", "sub": "mallory", "aud": jv.DEFAULT_AUDIENCE, "iat": now, "exp": now + 60}
        import hmac, hashlib
        signing_input = f"{b64({'alg': 'HS256', 'typ': 'JWT'})}.{b64(claims)}"
        sig = base64.urlsafe_b64encode(hmac.new(pub_pem, signing_input.encode(), hashlib.sha256).digest()).rstrip(b"=").decode()
        f = flow(f"Bearer {signing_input}.{sig}")
        with caplog.at_level(logging.WARNING, "bastion.identity"):
            await a.request(f)
        assert_refused(f, 401)
        assert "not allowed" in caplog.text
        # the legitimate RS256 token for that key passes
        good = jwt.encode(claims, priv, "RS256")
        f = flow(f"Bearer {good}")
        await a.request(f)
        assert f.response is None and get_record(f.metadata).identity.sub == "mallory"


async def test_rsa_key_does_not_verify_ec_alg(tmp_path):
    """The allow-list follows the key type: an ES256 header against an RSA key is refused."""
    priv = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "rsa.pub").write_bytes(priv.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    a = Identity()
    with taddons.context(a) as tctx:
        tctx.configure(a, bastion_public_key=str(tmp_path / "rsa.pub"), bastion_issuer="https://idp.test")
        now = int(time.time())
        eck = ec.generate_private_key(ec.SECP256R1())
        tok = jwt.encode({"iss": "https://idp.test", "sub": "x", "aud": jv.DEFAULT_AUDIENCE, "iat": now,
                          "exp": now + 60}, eck, "ES256")
        f = flow(f"Bearer {tok}")
        await a.request(f)
        assert_refused(f, 401)


@pytest.mark.parametrize("tok", [
    "not-a-jwt",
    "a.b.c",
    "eyJhbGciOiJFUzI1NiJ9.!!!.abc",
    "eyJhbGciOiJFUzI1NiJ9..",
    "e30.e30.e30",
    "x" * 50 + ".." + "y",
    "Zm9v.YmFy",
])
async def test_malformed(ident, tok):
    a, _ = ident
    f = flow(f"Bearer {tok}")
    await a.request(f)
    assert_refused(f, 401)


async def test_malformed_payload_base64(ident, key_dir):
    a, _ = ident
    h, p, s = jv.mint_token(key_dir, "alice").split(".")
    f = flow(f"Bearer {h}.{p[:-3]}%%%.{s}")
    await a.request(f)
    assert_refused(f, 401)
    f = flow(f"Bearer {h}.{p[:-2]}.{s}")  # tampered payload: bad signature
    await a.request(f)
    assert_refused(f, 401)


async def test_100kb_token(ident, key_dir, caplog):
    a, _ = ident
    tok = jv.mint_token(key_dir, "alice", padding="A" * 100_000)
    f = flow(f"Bearer {tok}")
    with caplog.at_level(logging.WARNING, "bastion.identity"):
        await a.request(f)
    assert_refused(f, 401)
    assert "too large" in caplog.text


async def test_two_authorization_headers(ident, key_dir):
    a, _ = ident
    tok = jv.mint_token(key_dir, "alice")
    f = flow([f"Bearer {tok}", f"Bearer {tok}"])
    await a.request(f)
    assert_refused(f, 401, error="invalid_request")


async def test_other_scheme(ident):
    a, _ = ident
    f = flow("Basic YWxpY2U6cGFzcw==")
    await a.request(f)
    assert_refused(f, 401, error=None)


async def test_token_in_query_refused(ident, key_dir):
    a, _ = ident
    tok = jv.mint_token(key_dir, "alice")
    f = flow(path=f"/mcp/demo/messages/?session_id=1&access_token={tok}")
    await a.request(f)
    assert_refused(f, 400, error="invalid_request")
    assert tok not in f.request.path and f.request.path.endswith("access_token=[redacted]")
    # even together with a valid header: a token in the URL ends up in logs, refuse it
    f = flow(f"Bearer {tok}", path=f"/mcp/demo?access_token={tok}")
    await a.request(f)
    assert_refused(f, 400, error="invalid_request")
    # scrubbed even when an earlier addon (the Router) already refused the request
    f = flow(f"Bearer {tok}", path=f"/mcp/demo?x=1&access_token={tok}")
    f.response = tutils.tresp(status_code=400)
    await a.request(f)
    assert tok not in f.request.path and f.response.status_code == 400
    # a query without a token is fine (legacy SSE message endpoint)
    f = flow(f"Bearer {tok}", path="/mcp/demo/messages/?session_id=1")
    await a.request(f)
    assert f.response is None


async def test_roles_claim_path(ident, key_dir):
    a, tctx = ident
    tctx.configure(a, bastion_roles_claim="realm_access.roles")
    tok = jv.mint_token(key_dir, "alice", realm_access={"roles": ["dba", "reader"]})
    f = flow(f"Bearer {tok}")
    await a.request(f)
    assert get_record(f.metadata).identity.roles == ("dba", "reader")
    tctx.configure(a, bastion_roles_claim="scope")
    f = flow(f"Bearer {jv.mint_token(key_dir, 'alice', scope='mcp:read mcp:write')}")
    await a.request(f)
    assert get_record(f.metadata).identity.roles == ("mcp:read", "mcp:write")
    f = flow(f"Bearer {jv.mint_token(key_dir, 'alice', scope={'not': 'roles'})}")
    await a.request(f)
    assert_refused(f, 401)


async def test_azp_is_client_id(ident, key_dir):
    a, _ = ident
    f = flow(f"Bearer {jv.mint_token(key_dir, 'alice', azp='agent-x')}")
    await a.request(f)
    assert get_record(f.metadata).identity.client_id == "agent-x"


# ------------------------------------------------------------------ options

@pytest.mark.parametrize("opts, msg", [
    ({"bastion_algorithms": "none"}, "never none or HMAC"),
    ({"bastion_algorithms": "HS256"}, "never none or HMAC"),
    ({"bastion_leeway": 3600}, "bastion_leeway"),
    ({"bastion_jwks_url": "file:///etc/passwd", "bastion_issuer": "x"}, "http(s) URL"),
    ({"bastion_jwks_url": "http://127.0.0.1:1/jwks"}, "bastion_issuer is required"),
    ({"bastion_jwks_url": "http://127.0.0.1:1/j", "bastion_oidc_issuer": "http://127.0.0.1:1"}, "only one key source"),
    ({"bastion_public_key": "/nonexistent.pem", "bastion_issuer": "x"}, "cannot load"),
    ({"bastion_roles_claim": "a..b"}, "claim path"),
    ({"bastion_audience": ""}, "audience"),
    ({"bastion_resource_url": "ftp://x"}, "http(s) URL"),
])
def test_options_validated(ident, opts, msg):
    a, tctx = ident
    with pytest.raises(exceptions.OptionsError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        tctx.configure(a, **opts)


async def test_algorithms_option_refuses_other_alg(ident, key_dir):
    a, tctx = ident
    tctx.configure(a, bastion_algorithms="RS256")
    f = flow(f"Bearer {jv.mint_token(key_dir, 'alice')}")
    await a.request(f)
    assert_refused(f, 401)


# ------------------------------------------------------------------ per-connection audience / roles

CONNECTIONS = """\
connections:
  demo:
    upstream: http://127.0.0.1:9/mcp
  finance:
    upstream: http://127.0.0.1:9/mcp
    audience: https://gw.test/mcp/finance
    roles: [finance, admin]
"""


@pytest.fixture
def routed(tmp_path, key_dir):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "connections.yaml").write_text(CONNECTIONS)
    reg = ConnectionRegistry()
    router, a = Router(reg), Identity(reg)
    with taddons.context(router, a) as tctx:
        tctx.configure(router, bastion_rules=str(rules))
        tctx.configure(a, bastion_key_dir=str(key_dir))
        yield router, a, tctx


async def through(router, a, f):
    router.requestheaders(f)
    if f.response is None:
        await a.request(f)
    return f


async def test_connection_roles(routed, key_dir):
    router, a, _ = routed
    f = await through(router, a, flow(f"Bearer {jv.mint_token(key_dir, 'bob', roles=['analyst'], aud='https://gw.test/mcp/finance')}",
                                      path="/mcp/finance", connection=None))
    assert f.response.status_code == 403
    www = f.response.headers["www-authenticate"]
    assert 'error="insufficient_scope"' in www
    assert f'resource_metadata="http://{HOST}/.well-known/oauth-protected-resource/mcp/finance"' in www
    assert json.loads(f.response.content)["error"] == "insufficient_scope"
    assert get_record(f.metadata).identity.sub == "bob"  # attributable in the audit
    f = await through(router, a, flow(f"Bearer {jv.mint_token(key_dir, 'carol', roles=['finance'], aud='https://gw.test/mcp/finance')}",
                                      path="/mcp/finance", connection=None))
    assert f.response is None and get_record(f.metadata).identity.sub == "carol"


async def test_connection_audience(routed, key_dir):
    router, a, _ = routed
    # a token for the gateway's default audience does not open the finance connection
    f = await through(router, a, flow(f"Bearer {jv.mint_token(key_dir, 'carol', roles=['finance'])}",
                                      path="/mcp/finance", connection=None))
    assert f.response.status_code == 401
    # and a finance token does not open demo (default audience)
    f = await through(router, a, flow(f"Bearer {jv.mint_token(key_dir, 'carol', aud='https://gw.test/mcp/finance')}",
                                      path="/mcp/demo", connection=None))
    assert f.response.status_code == 401
    f = await through(router, a, flow(f"Bearer {jv.mint_token(key_dir, 'carol')}", path="/mcp/demo", connection=None))
    assert f.response is None


# ------------------------------------------------------------------ RFC 9728 metadata

async def test_metadata_root_and_per_connection(routed):
    router, a, _ = routed
    f = await through(router, a, flow(None, path="/.well-known/oauth-protected-resource", method="GET", connection=None))
    doc = json.loads(f.response.content)
    assert f.response.status_code == 200
    assert doc["resource"] == f"http://{HOST}"
    assert doc["authorization_servers"] == [jv.LOCAL_ISSUER]
    assert doc["bearer_methods_supported"] == ["header"]
    assert doc["resource_name"]
    assert f.response.headers["content-type"] == "application/json"
    f = await through(router, a, flow(None, path="/.well-known/oauth-protected-resource/mcp/finance",
                                      method="GET", connection=None))
    doc = json.loads(f.response.content)
    assert doc["resource"] == f"http://{HOST}/mcp/finance"
    f = await through(router, a, flow(None, path="/.well-known/oauth-protected-resource/mcp/nope",
                                      method="GET", connection=None))
    assert f.response.status_code == 404
    f = await through(router, a, flow(None, path="/.well-known/oauth-protected-resource", method="POST",
                                      connection=None))
    assert f.response.status_code == 405


async def test_metadata_resource_url_option(routed):
    router, a, tctx = routed
    tctx.configure(a, bastion_resource_url="https://mcp.example.com/gw")
    f = await through(router, a, flow(None, path="/.well-known/oauth-protected-resource/gw/mcp/demo",
                                      method="GET", connection=None))
    assert json.loads(f.response.content)["resource"] == "https://mcp.example.com/gw/mcp/demo"
    f = await through(router, a, flow(None, path="/mcp/demo", connection=None))
    assert ('resource_metadata="https://mcp.example.com/.well-known/oauth-protected-resource/gw/mcp/demo"'
            in f.response.headers["www-authenticate"])


async def test_spoofed_host_cannot_inject_header(ident):
    a, _ = ident
    f = flow(None)
    f.request.headers["host"] = 'evil", error="x'
    await a.request(f)
    assert 'resource_metadata="http://localhost/.well-known/oauth-protected-resource/mcp/demo"' in \
        f.response.headers["www-authenticate"]


# ------------------------------------------------------------------ revocation

async def test_revocation_reload(ident, key_dir, tmp_path):
    a, tctx = ident
    rev = tmp_path / "revoked.yaml"
    rev.write_text("[]\n")
    tctx.configure(a, bastion_revoked=str(rev))
    tok_a = jv.mint_token(key_dir, "job-a")
    tok_b = jv.mint_token(key_dir, "job-b")
    jti_b = jwt.decode(tok_b, options={"verify_signature": False})["jti"]
    for tok in (tok_a, tok_b):
        f = flow(f"Bearer {tok}")
        await a.request(f)
        assert f.response is None
    rev.write_text(f"- jti: {jti_b}\n  reason: leaked in CI log\n")
    a.poll_revoked()
    f = flow(f"Bearer {tok_b}")
    await a.request(f)
    assert_refused(f, 401)
    f = flow(f"Bearer {tok_a}")
    await a.request(f)
    assert f.response is None
    rev.write_text(f"- jti: {jti_b}\n- sub: job-a\n")
    a.poll_revoked()
    f = flow(f"Bearer {jv.mint_token(key_dir, 'job-a')}")  # a fresh token for a revoked subject
    await a.request(f)
    assert_refused(f, 401)
    # a broken edit keeps the last good list (fail closed)
    rev.write_text("- {jti: [unclosed\n")
    a.poll_revoked()
    f = flow(f"Bearer {tok_b}")
    await a.request(f)
    assert_refused(f, 401)


async def test_revocation_polled_by_running_task(ident, key_dir, tmp_path):
    import asyncio
    a, tctx = ident
    rev = tmp_path / "revoked.txt"
    rev.write_text("")
    tctx.configure(a, bastion_revoked=str(rev))
    a.running()
    try:
        rev.write_text("sub:job-z\n")
        for _ in range(40):
            await asyncio.sleep(0.1)
            if a.revoked.subs:
                break
        assert a.revoked.subs == {"job-z"}
    finally:
        a.done()


def test_revocation_bad_file_rejected_at_configure(ident, tmp_path):
    a, tctx = ident
    rev = tmp_path / "revoked.yaml"
    rev.write_text("- {user: bob}\n")
    with pytest.raises(exceptions.OptionsError, match="revoked.yaml:1"):
        tctx.configure(a, bastion_revoked=str(rev))


# ------------------------------------------------------------------ admin paths

async def test_admin_path_identified_when_token_present(ident, key_dir):
    a, _ = ident
    f = flow(f"Bearer {jv.mint_token(key_dir, 'approver', roles=['approver'])}", path="/_bastion/approvals",
             connection=None, method="GET")
    await a.request(f)
    assert f.response is None and get_record(f.metadata).identity.sub == "approver"
    f = flow(None, path="/_bastion/approvals", connection=None, method="GET")
    await a.request(f)
    assert f.response is None and get_record(f.metadata).identity is None
    f = flow("Bearer garbage", path="/_bastion/approvals", connection=None, method="GET")
    await a.request(f)
    assert f.response.status_code == 401


async def test_reverse_mode_uses_listen_address(ident):
    """Reverse mode rewrites Host to the upstream's: the metadata URL must name the gateway."""
    from mitmproxy.proxy.mode_specs import ProxyMode
    a, _ = ident
    f = flow(None)
    f.client_conn.proxy_mode = ProxyMode.parse("reverse:http://127.0.0.1:9000@8080")
    f.client_conn.sockname = ("127.0.0.1", 8080)
    f.request.headers["host"] = "127.0.0.1:9000"
    await a.request(f)
    assert ('resource_metadata="http://127.0.0.1:8080/.well-known/oauth-protected-resource/mcp/demo"'
            in f.response.headers["www-authenticate"])
