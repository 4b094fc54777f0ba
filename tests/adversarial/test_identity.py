"""Token and header tricks: nothing unverified reaches the upstream."""
from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from addons.core.identity.jwtverify import _private_key, jwk_thumbprint, mint_token
from tests.adversarial.conftest import call

CALL = call("get_customer", {"id": 1})       # an allowed call: only the identity is wrong


def b64(obj) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def _key(adv):
    return _private_key(adv.gw.key_dir)


def _forged(adv, header: dict, claims: dict | None = None, key=None, alg="ES256") -> str:
    now = int(time.time())
    base = {"iss": "mcp-bastion-local", "sub": "mallory", "aud": "mcp-bastion", "iat": now, "exp": now + 600,
            "roles": ["e2e-user"]}
    return jwt.encode({**base, **(claims or {})}, key or _key(adv), algorithm=alg, headers=header)


def _tokens(adv) -> dict[str, str]:
    kd = adv.gw.key_dir
    priv = _key(adv)
    kid = jwk_thumbprint(priv.public_key())
    pub_pem = priv.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    other = ec.generate_private_key(ec.SECP256R1())
    valid_payload = mint_token(kd, "mallory", roles=["e2e-user"]).split(".")[1]
    return {
        "alg none": b64({"alg": "none", "typ": "JWT"}) + "." + valid_payload + ".",
        "alg none, kid kept": b64({"alg": "none", "kid": kid}) + "." + valid_payload + ".",
        "HS256 keyed with the public key": _hs256(valid_payload, pub_pem, kid),
        "signed by another key, same kid": _forged(adv, {"kid": kid}, key=other),
        "signature stripped": ".".join(mint_token(kd, "mallory", roles=["e2e-user"]).split(".")[:2]) + ".",
        "payload swapped under a valid signature": _swap_payload(kd),
        "expired": mint_token(kd, "mallory", roles=["e2e-user"], exp=int(time.time()) - 3600),
        "not yet valid": mint_token(kd, "mallory", roles=["e2e-user"], nbf=int(time.time()) + 3600),
        "issued in the future": mint_token(kd, "mallory", roles=["e2e-user"], iat=int(time.time()) + 3600),
        "wrong audience": mint_token(kd, "mallory", roles=["e2e-user"], aud="https://other.example"),
        "wrong issuer": mint_token(kd, "mallory", roles=["e2e-user"], iss="https://evil.example"),
        "kid path traversal": _forged(adv, {"kid": "../../../../etc/passwd"}),
        "kid URL": _forged(adv, {"kid": "https://evil.example/jwks.json"}),
        "jku header": _forged(adv, {"kid": kid, "jku": "https://evil.example/jwks.json"}, key=other),
        "embedded jwk header": _forged(adv, {"jwk": json.loads(jwt.algorithms.ECAlgorithm.to_jwk(other.public_key()))},
                                       key=other),
        "missing sub": _forged(adv, {"kid": kid}, {"sub": None}),
        "empty sub": _forged(adv, {"kid": kid}, {"sub": ""}),
        "missing exp": jwt.encode({"iss": "mcp-bastion-local", "sub": "m", "aud": "mcp-bastion", "iat": int(time.time())},
                                  priv, algorithm="ES256", headers={"kid": kid}),
        "huge header": _forged(adv, {"kid": kid, "x": "A" * 20000}),
        "garbage": "a.b.c",
        "not a JWT": "hunter2",
    }


def _hs256(payload_b64: str, pub_pem: bytes, kid: str) -> str:
    import hashlib
    import hmac
    head = b64({"alg": "HS256", "typ": "JWT", "kid": kid})
    sig = hmac.new(pub_pem, f"{head}.{payload_b64}".encode(), hashlib.sha256).digest()
    return f"{head}.{payload_b64}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"


def _swap_payload(kd) -> str:
    a = mint_token(kd, "nobody", roles=[]).split(".")
    b = mint_token(kd, "admin", roles=["e2e-user", "admin"]).split(".")
    return f"{a[0]}.{b[1]}.{a[2]}"


TOKEN_CASES = ["alg none", "alg none, kid kept", "HS256 keyed with the public key", "signed by another key, same kid",
               "signature stripped", "payload swapped under a valid signature", "expired", "not yet valid",
               "issued in the future", "wrong audience", "wrong issuer", "kid path traversal", "kid URL", "jku header",
               "embedded jwk header", "missing sub", "empty sub", "missing exp", "huge header", "garbage", "not a JWT"]


@pytest.mark.parametrize("case", TOKEN_CASES)
def test_forged_or_invalid_token_refused(adv, upstream, case):
    tok = _tokens(adv)[case]
    r = adv.post(CALL, headers=adv.headers(token=tok))
    assert r.status_code in (400, 401, 431), (case, r.status_code, r.text)
    if r.status_code == 401:
        assert r.headers["www-authenticate"].startswith("Bearer ") and "resource_metadata=" in r.headers["www-authenticate"]
    assert tok not in r.text and tok not in adv.gw.log_text()
    upstream.nothing()


def test_no_token(adv, upstream):
    r = adv.post(CALL, headers=adv.headers(token=None))
    assert r.status_code == 401 and 'resource_metadata="' in r.headers["www-authenticate"]
    upstream.nothing()


def test_two_authorization_headers(adv, upstream):
    h = list(adv.headers().items()) + [("authorization", "Bearer " + _tokens(adv)["wrong issuer"])]
    r = adv.post(CALL, headers=h)
    assert r.status_code == 401
    upstream.nothing()


@pytest.mark.parametrize("param", ["access_token", "token", "Access_Token"])
def test_token_in_query_string(adv, upstream, param):
    r = adv.post(CALL, headers=adv.headers(token=None), path=f"/mcp/demo?{param}={adv.token}")
    assert r.status_code in (400, 401)
    assert adv.token not in adv.gw.log_text()
    upstream.nothing()


@pytest.mark.parametrize("scheme", ["Basic", "Token", "Bearer\t", "Bearerx"])
def test_other_schemes(adv, upstream, scheme):
    h = adv.headers(token=None)
    h["authorization"] = f"{scheme} {adv.token}"
    r = adv.post(CALL, headers=h)
    assert r.status_code == 401, (scheme, r.status_code)
    upstream.nothing()


def test_lowercase_bearer_is_legitimate(adv, upstream):
    h = adv.headers(token=None)
    h["authorization"] = f"bearer {adv.token}"
    r = adv.post(CALL, headers=h)
    assert r.status_code == 200 and "result" in r.text
    # the upstream never sees the caller's token
    assert all(adv.token not in json.dumps(x) for x in upstream.received())


def test_forwarded_headers_do_not_change_identity_or_routing(adv, upstream):
    h = adv.headers(token=None, x_forwarded_for="127.0.0.1", x_forwarded_user="admin", x_remote_user="admin",
                    x_original_url="/mcp/demo", forwarded="for=127.0.0.1;by=gateway")
    r = adv.post(call("run_command", {"command": "id"}), headers=h)
    assert r.status_code == 401
    upstream.nothing()


def test_evil_origin(adv, upstream):
    r = adv.post(CALL, headers=adv.headers(origin="https://evil.example"))
    assert r.status_code == 403
    upstream.nothing()
