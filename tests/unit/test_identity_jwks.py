"""Identity with a real JWKS / OIDC provider on loopback: key rotation is followed, an
unknown kid is refused, a JWKS that is down fails closed (503) while cached keys keep
working, discovery must name the configured issuer, and fetches never block the loop."""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from mitmproxy.test import taddons, tflow, tutils

from addons.hooks.identity import Identity
from addons.core.record import get_record

AUD = "https://gw.test/mcp"


class FakeIdP:
    """JWKS + OIDC discovery on 127.0.0.1, keys rotatable, can go down."""

    def __init__(self) -> None:
        self.keys: list[tuple[str, object]] = []   # (kid, private key)
        self.hits = 0
        self.delay = 0.0
        self.discovery_issuer: str | None = None
        idp = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                idp.hits += 1
                if idp.delay:
                    time.sleep(idp.delay)
                if self.path == "/jwks.json":
                    body = idp.jwks()
                elif self.path == "/.well-known/openid-configuration":
                    body = {"issuer": idp.discovery_issuer or idp.issuer, "jwks_uri": idp.url + "/jwks.json"}
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.issuer = self.url
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.rotate()

    def rotate(self, kind: str = "ec", keep_old: bool = False) -> str:
        key = ec.generate_private_key(ec.SECP256R1()) if kind == "ec" else \
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
        kid = f"k{len(self.keys) + 1}-{kind}"
        self.keys = ([*self.keys] if keep_old else []) + [(kid, key)]
        self._all = getattr(self, "_all", {}) | {kid: key}
        return kid

    def jwks(self) -> dict:
        out = []
        for kid, key in self.keys:
            alg = jwt.algorithms.ECAlgorithm if isinstance(key, ec.EllipticCurvePrivateKey) else jwt.algorithms.RSAAlgorithm
            jwk = json.loads(alg.to_jwk(key.public_key()))
            jwk.update({"kid": kid, "use": "sig"})
            out.append(jwk)
        return {"keys": out}

    def token(self, kid: str | None = None, sub: str = "job-1", **claims) -> str:
        kid = kid or self.keys[-1][0]
        key = self._all[kid]
        now = int(time.time())
        body = {"iss": self.issuer, "sub": sub, "aud": AUD, "iat": now, "exp": now + 300,
                "azp": "ci", "realm_access": {"roles": ["reader"]}, "jti": f"j-{now}-{sub}", **claims}
        alg = "ES256" if isinstance(key, ec.EllipticCurvePrivateKey) else "RS256"
        return jwt.encode(body, key, alg, headers={"kid": kid})

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def idp():
    s = FakeIdP()
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def flow(token: str | None):
    f = tflow.tflow(req=tutils.treq(method=b"POST", path=b"/mcp/demo", content=b"{}"))
    f.request.headers["host"] = "gw.test"
    if token:
        f.request.headers["authorization"] = f"Bearer {token}"
    get_record(f.metadata).connection = "demo"
    return f


@pytest.fixture
def jwks_ident(idp):
    a = Identity()
    with taddons.context(a) as tctx:
        tctx.configure(a, bastion_jwks_url=idp.url + "/jwks.json", bastion_issuer=idp.issuer,
                       bastion_audience=AUD, bastion_roles_claim="realm_access.roles", bastion_jwks_cooldown=0)
        yield a, tctx


async def check(a, token) -> tuple[int | None, object]:
    f = flow(token)
    await a.request(f)
    return (f.response.status_code if f.response else None), get_record(f.metadata).identity


async def test_jwks_valid_token(jwks_ident, idp):
    a, _ = jwks_ident
    status, ident = await check(a, idp.token())
    assert status is None
    assert ident.sub == "job-1" and ident.roles == ("reader",) and ident.client_id == "ci" and ident.issuer == idp.issuer


async def test_jwks_rotation_followed(jwks_ident, idp):
    a, _ = jwks_ident
    old_kid = idp.keys[0][0]
    assert (await check(a, idp.token()))[0] is None
    new_kid = idp.rotate("rsa")            # the IdP switches to a new (RSA) key, drops the old one
    assert (await check(a, idp.token(new_kid)))[0] is None   # unknown kid -> one refetch -> accepted
    # the retired key is gone from the refetched set
    assert (await check(a, idp.token(old_kid)))[0] == 401
    # several keys published at once (overlap during rotation)
    k3 = idp.rotate("ec", keep_old=True)
    assert (await check(a, idp.token(k3)))[0] is None
    assert (await check(a, idp.token(new_kid)))[0] is None


async def test_jwks_unknown_kid(jwks_ident, idp, caplog):
    a, _ = jwks_ident
    forged_key = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    tok = jwt.encode({"iss": idp.issuer, "sub": "x", "aud": AUD, "iat": now, "exp": now + 60}, forged_key,
                     "ES256", headers={"kid": "not-published"})
    with caplog.at_level(logging.WARNING, "bastion.identity"):
        assert (await check(a, tok))[0] == 401
    assert "unknown kid" in caplog.text


async def test_jwks_kid_required(jwks_ident, idp):
    a, _ = jwks_ident
    now = int(time.time())
    tok = jwt.encode({"iss": idp.issuer, "sub": "x", "aud": AUD, "iat": now, "exp": now + 60}, idp.keys[0][1], "ES256")
    assert (await check(a, tok))[0] == 401


async def test_jwks_key_used_with_wrong_alg_family(jwks_ident, idp):
    """A published EC key's kid on an RS256 token: refused (allow-list by key type)."""
    a, _ = jwks_ident
    kid = idp.keys[0][0]
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    tok = jwt.encode({"iss": idp.issuer, "sub": "x", "aud": AUD, "iat": now, "exp": now + 60}, other, "RS256",
                     headers={"kid": kid})
    assert (await check(a, tok))[0] == 401


async def test_jwks_down_fails_closed_but_cached_keys_work(jwks_ident, idp, caplog):
    a, _ = jwks_ident
    tok = idp.token()
    assert (await check(a, tok))[0] is None     # set fetched and cached
    hits = idp.hits
    idp.stop()
    assert (await check(a, tok))[0] is None     # cached key, no fetch
    assert (await check(a, idp.token(sub="job-2")))[0] is None
    assert idp.hits == hits
    # a kid the cache does not know needs the JWKS, which is down: 503, not 401, not forwarded
    new_kid = idp.rotate()
    f = flow(idp.token(new_kid))
    with caplog.at_level(logging.ERROR, "bastion.identity"):
        await a.request(f)
    assert f.response.status_code == 503
    assert json.loads(f.response.content)["error"] == "temporarily_unavailable"
    assert get_record(f.metadata).identity is None
    assert "unavailable" in caplog.text and "jwks.json" in caplog.text


async def test_jwks_down_from_start_503(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    a = Identity()
    with taddons.context(a) as tctx:
        tctx.configure(a, bastion_jwks_url=f"http://127.0.0.1:{port}/jwks.json", bastion_issuer="https://idp",
                       bastion_audience=AUD)
        key = ec.generate_private_key(ec.SECP256R1())
        now = int(time.time())
        tok = jwt.encode({"iss": "https://idp", "sub": "x", "aud": AUD, "iat": now, "exp": now + 60}, key, "ES256",
                         headers={"kid": "k"})
        t0 = time.monotonic()
        assert (await check(a, tok))[0] == 503
        assert (await check(a, tok))[0] == 503      # fails fast during the retry back-off
        assert time.monotonic() - t0 < 3


async def test_jwks_cache_expiry_refetches(idp):
    a = Identity()
    with taddons.context(a) as tctx:
        tctx.configure(a, bastion_jwks_url=idp.url + "/jwks.json", bastion_issuer=idp.issuer,
                       bastion_audience=AUD, bastion_jwks_cache_ttl=1)
        assert (await check(a, idp.token()))[0] is None
        hits = idp.hits
        await asyncio.sleep(1.2)
        assert (await check(a, idp.token()))[0] is None
        assert idp.hits == hits + 1


async def test_fetch_does_not_block_event_loop(jwks_ident, idp):
    a, _ = jwks_ident
    idp.delay = 0.5
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.02)
            ticks += 1

    t = asyncio.create_task(ticker())
    try:
        results = await asyncio.gather(*(check(a, idp.token(sub=f"j{i}")) for i in range(5)))
    finally:
        t.cancel()
    assert all(r[0] is None for r in results)
    assert ticks >= 10          # the loop kept running during the slow fetch
    assert idp.hits == 1        # concurrent callers shared one fetch


async def test_oidc_discovery(idp):
    a = Identity()
    with taddons.context(a) as tctx:
        tctx.configure(a, bastion_oidc_issuer=idp.issuer, bastion_audience=AUD, bastion_jwks_cooldown=0)
        status, ident = await check(a, idp.token())
        assert status is None and ident.issuer == idp.issuer
        kid = idp.rotate()
        assert (await check(a, idp.token(kid)))[0] is None
        # metadata names the provider as authorization server
        f = tflow.tflow(req=tutils.treq(method=b"GET", path=b"/.well-known/oauth-protected-resource", content=b""))
        f.request.headers["host"] = "gw.test"
        await a.request(f)
        assert json.loads(f.response.content)["authorization_servers"] == [idp.issuer]


async def test_oidc_discovery_issuer_mismatch_503(idp):
    idp.discovery_issuer = "https://someone-else.example"
    a = Identity()
    with taddons.context(a) as tctx:
        tctx.configure(a, bastion_oidc_issuer=idp.issuer, bastion_audience=AUD)
        assert (await check(a, idp.token()))[0] == 503


async def test_prefetch_on_running(idp):
    a = Identity()
    with taddons.context(a) as tctx:
        tctx.configure(a, bastion_jwks_url=idp.url + "/jwks.json", bastion_issuer=idp.issuer, bastion_audience=AUD)
        a.running()
        try:
            for _ in range(50):
                await asyncio.sleep(0.05)
                if idp.hits:
                    break
            assert idp.hits == 1
            assert a.source.cached(idp.keys[0][0]) is not None
        finally:
            a.done()
