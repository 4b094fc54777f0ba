"""Bearer-token verification for the identity addon. Pure apart from file and JWKS I/O.

- Key sources: a local PEM (the embedded issuer's key or an operator-supplied public key),
  a JWKS URL (pyjwt's PyJWKClient: cached set, one refresh on an unknown `kid`), or OIDC
  discovery (`<issuer>/.well-known/openid-configuration` -> `jwks_uri`).
- The algorithm allow-list is derived from the key type, intersected with the operator's
  list: `none` and HMAC are never accepted, so a public key can never be used as an HMAC
  secret and an RSA key never verifies an EC signature.
- Blocking fetches (`KeySource.fetch`) are meant to run in a worker thread; `cached` never
  does I/O, so the common case costs no thread hop.
- The embedded issuer: `ensure_local_key` creates an EC P-256 key (0600 in a 0700 dir),
  `mint_token` signs tokens for it (CLI, tests, e2e harness).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from addons.core.lru import LRU
from addons.core.privatefiles import private_dir, write_private
from addons.core.record import Identity
from addons.core.rules import RulesError, load_yaml

LOCAL_ISSUER = "mcp-bastion-local"
DEFAULT_AUDIENCE = "mcp-bastion"
LOCAL_KEY_FILE = "issuer-key.pem"
MAX_TOKEN_BYTES = 8 * 1024
REQUIRED_CLAIMS = ("exp", "iat", "sub", "iss")

RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_ALGS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512", "secp256k1": "ES256K"}
ASYMMETRIC_ALGS = RSA_ALGS | frozenset(EC_ALGS.values()) | {"EdDSA"}

# token68 (RFC 7235) — a JWT is three base64url parts joined by dots
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


# ---------------------------------------------------------------- errors

class TokenError(Exception):
    """The token is not acceptable -> 401 invalid_token.

    `reason` is for the log (never contains the token); `description` is what the
    caller is told, deliberately coarse."""

    def __init__(self, reason: str, description: str = "the access token is invalid", code: str = "invalid_token"):
        super().__init__(reason)
        self.reason = reason
        self.description = description
        self.code = code


class KeyUnavailable(Exception):
    """The verification keys cannot be obtained (JWKS/discovery down) -> 503."""


# ---------------------------------------------------------------- keys

def algorithms_for_key(key: Any) -> frozenset[str]:
    """Signature algorithms a public key can verify, by its type."""
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGS
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = EC_ALGS.get(key.curve.name)
        return frozenset({alg}) if alg else frozenset()
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return frozenset({"EdDSA"})
    return frozenset()  # anything else (HMAC secrets included) verifies nothing


@dataclass(frozen=True)
class VerifyKey:
    key: Any                       # cryptography public key object
    algorithms: frozenset[str]
    kid: str | None = None


def jwk_thumbprint(public_key: Any) -> str:
    """RFC 7638 thumbprint, used as the local key's `kid`."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public_key))
    elif isinstance(public_key, rsa.RSAPublicKey):
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public_key))
    else:
        jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(public_key))
    members = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}[jwk["kty"]]
    canon = json.dumps({k: jwk[k] for k in members}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canon.encode()).digest()).rstrip(b"=").decode()


def load_public_pem(path: str | os.PathLike) -> Any:
    """Public key from a PEM file holding a public key, a certificate or a private key."""
    data = Path(path).read_bytes()
    if b"-----BEGIN CERTIFICATE-----" in data:
        key = x509.load_pem_x509_certificate(data).public_key()
    elif b"PRIVATE KEY-----" in data:
        key = serialization.load_pem_private_key(data, password=None).public_key()
    else:
        key = serialization.load_pem_public_key(data)
    if not algorithms_for_key(key):
        raise ValueError("unsupported key type (use an RSA, EC P-256/384/521 or Ed25519 key)")
    return key


class KeySource(Protocol):
    def cached(self, kid: str | None) -> VerifyKey | None:
        """The key for `kid` if known without I/O, else None (then call fetch)."""

    def fetch(self, kid: str | None) -> VerifyKey:
        """Blocking lookup; TokenError for an unknown kid, KeyUnavailable when down."""

    def describe(self) -> str: ...


@dataclass
class LocalKeySource:
    """One public key (local PEM). A token naming another `kid` is refused."""

    key: Any
    kid: str | None = None
    label: str = "local key"

    @classmethod
    def from_pem(cls, path: str | os.PathLike) -> "LocalKeySource":
        key = load_public_pem(path)
        return cls(key, jwk_thumbprint(key), f"PEM {path}")

    def cached(self, kid: str | None) -> VerifyKey | None:
        if kid is not None and self.kid is not None and kid != self.kid:
            raise TokenError("unknown kid (not the configured key)")
        return VerifyKey(self.key, algorithms_for_key(self.key), self.kid)

    def fetch(self, kid: str | None) -> VerifyKey:
        return self.cached(kid)  # type: ignore[return-value]

    def describe(self) -> str:
        return self.label


def _vkey(jwk: jwt.PyJWK) -> VerifyKey:
    algs = algorithms_for_key(jwk.key)
    declared = jwk._jwk_data.get("alg")
    if declared:  # a JWK that names its algorithm verifies only that one
        algs = algs & {declared}
    return VerifyKey(jwk.key, algs, jwk.key_id)


class JwksKeySource:
    """Keys from a JWKS URL. pyjwt caches the set for `lifespan` seconds and refetches
    once on an unknown kid (at most every `cooldown` seconds, so a flood of made-up kids
    cannot hammer the IdP). After a failed fetch, further fetches are skipped for
    `retry_after` seconds so requests fail fast (503) instead of queueing on timeouts."""

    def __init__(self, url: str, lifespan: float = 300, cooldown: float = 5, timeout: float = 5,
                 retry_after: float = 2):
        self.url = url
        self.client = jwt.PyJWKClient(url, cache_jwk_set=True, lifespan=lifespan, timeout=timeout,
                                      cooldown_duration=cooldown)
        self.retry_after = retry_after
        self._failed_until = 0.0

    def describe(self) -> str:
        return f"JWKS {self.url}"

    def cached(self, kid: str | None) -> VerifyKey | None:
        if kid is None:
            raise TokenError("token header has no kid (required with a JWKS)")
        cache = self.client.jwk_set_cache
        jwks = cache.get() if cache is not None else None
        if jwks is None:
            return None
        for k in jwks.keys:
            if k.key_id == kid and k.public_key_use in ("sig", None):
                return _vkey(k)
        return None

    def _fetched_without(self, kid: str) -> bool:
        cache = self.client.jwk_set_cache
        jwks = cache.get() if cache is not None else None
        return jwks is not None and all(k.key_id != kid for k in jwks.keys)

    def warm(self) -> None:
        """Fetch the set now (start-up), so the first caller does not wait."""
        try:
            self.client.get_jwk_set()
        except (jwt.PyJWKClientError, jwt.PyJWKSetError, jwt.PyJWKError) as e:
            raise KeyUnavailable(f"{self.describe()}: {e}") from None

    def fetch(self, kid: str | None) -> VerifyKey:
        if kid is None:
            raise TokenError("token header has no kid (required with a JWKS)")
        if time.monotonic() < self._failed_until:
            raise KeyUnavailable(f"{self.describe()} unreachable (recent failure, retrying shortly)")
        try:
            return _vkey(self.client.get_signing_key(kid))
        except jwt.PyJWKClientConnectionError as e:
            self._failed_until = time.monotonic() + self.retry_after
            raise KeyUnavailable(f"{self.describe()} unreachable: {e}") from None
        except jwt.PyJWKClientError as e:
            if self._fetched_without(kid):      # the set was read and has no such key
                raise TokenError("unknown kid (not in the JWKS)") from None
            self._failed_until = time.monotonic() + self.retry_after
            raise KeyUnavailable(f"{self.describe()} unusable: {e}") from None
        except (jwt.PyJWKSetError, jwt.InvalidKeyError, jwt.PyJWKError) as e:
            self._failed_until = time.monotonic() + self.retry_after
            raise KeyUnavailable(f"{self.describe()} unusable: {e}") from None


def fetch_json(url: str, timeout: float = 5) -> Any:
    """GET a small JSON document (discovery); no redirects to other schemes."""
    req = urllib.request.Request(url, headers={"accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 (http(s) checked by caller)
            return json.loads(r.read(1024 * 1024))
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as e:
        raise KeyUnavailable(f"cannot fetch {url}: {e}") from None


class OidcKeySource:
    """OIDC discovery: `<issuer>/.well-known/openid-configuration` names the JWKS.

    The document's `issuer` must equal the configured one (OIDC Discovery 4.3), so a
    misdirected discovery URL cannot swap in another provider's keys."""

    def __init__(self, issuer: str, **jwks_kw: Any):
        self.issuer = issuer
        self.discovery_url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        self._jwks_kw = jwks_kw
        self._jwks: JwksKeySource | None = None
        self._lock = threading.Lock()
        self._failed_until = 0.0

    def describe(self) -> str:
        return f"OIDC {self.issuer}"

    def cached(self, kid: str | None) -> VerifyKey | None:
        return self._jwks.cached(kid) if self._jwks is not None else None

    def _discover(self) -> JwksKeySource:
        with self._lock:
            if self._jwks is not None:
                return self._jwks
            if time.monotonic() < self._failed_until:
                raise KeyUnavailable(f"{self.discovery_url} unreachable (recent failure, retrying shortly)")
            try:
                doc = fetch_json(self.discovery_url)
                if not isinstance(doc, dict):
                    raise KeyUnavailable(f"{self.discovery_url}: not a JSON object")
                if doc.get("issuer") != self.issuer:
                    raise KeyUnavailable(f"{self.discovery_url}: issuer {doc.get('issuer')!r} does not match the configured issuer")
                uri = doc.get("jwks_uri")
                if not isinstance(uri, str) or not uri.startswith(("https://", "http://")):
                    raise KeyUnavailable(f"{self.discovery_url}: no usable jwks_uri")
            except KeyUnavailable:
                self._failed_until = time.monotonic() + self._jwks_kw.get("retry_after", 2)
                raise
            self._jwks = JwksKeySource(uri, **self._jwks_kw)
            return self._jwks

    def fetch(self, kid: str | None) -> VerifyKey:
        return self._discover().fetch(kid)

    def warm(self) -> None:
        self._discover().warm()


# ---------------------------------------------------------------- verification

@dataclass(frozen=True)
class VerifyConfig:
    issuer: str
    audience: str
    leeway: float = 30
    algorithms: frozenset[str] = ASYMMETRIC_ALGS   # operator's allow-list (subset of ASYMMETRIC_ALGS)
    roles_claim: str = "roles"


def parse_algorithms(spec: str) -> frozenset[str]:
    """'ES256,RS256' -> allow-list. Empty = every asymmetric algorithm (narrowed per key)."""
    algs = frozenset(a.strip() for a in spec.split(",") if a.strip())
    if not algs:
        return ASYMMETRIC_ALGS
    bad = sorted(a for a in algs if a not in ASYMMETRIC_ALGS)
    if bad:
        raise ValueError(f"unsupported algorithm(s) {', '.join(bad)}: only asymmetric signatures "
                         f"({', '.join(sorted(ASYMMETRIC_ALGS))}) are accepted; never none or HMAC")
    return algs


def check_shape(token: str) -> None:
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenError(f"token too large ({len(token)} bytes > {MAX_TOKEN_BYTES})")
    if not _TOKEN68.fullmatch(token) or token.count(".") != 2:
        raise TokenError("token is not a compact JWS")


def peek_header(token: str, config: VerifyConfig) -> str | None:
    """Unverified header checks before any key lookup; returns the kid."""
    check_shape(token)
    try:
        header = jwt.get_unverified_header(token)
    except jwt.DecodeError as e:
        raise TokenError(f"malformed token header: {e}") from None
    alg = header.get("alg")
    if alg not in config.algorithms:
        raise TokenError(f"algorithm {str(alg)[:16]!r} not allowed")
    kid = header.get("kid")
    if kid is not None and (not isinstance(kid, str) or len(kid) > 256):
        raise TokenError("malformed kid")
    return kid


_EXPIRED_DESC = "the access token expired"


_JWT_REASONS: dict[type, str] = {
    jwt.ExpiredSignatureError: "token expired",
    jwt.ImmatureSignatureError: "token not yet valid ({e})",
    jwt.InvalidAudienceError: "wrong audience",
    jwt.InvalidIssuerError: "wrong issuer",
    jwt.MissingRequiredClaimError: "missing claim {e.claim}",
    jwt.InvalidAlgorithmError: "algorithm not allowed for this key",
    jwt.InvalidSignatureError: "bad signature",
    jwt.InvalidKeyError: "key rejected: {e}",
    jwt.InvalidTokenError: "invalid token ({name}: {e})",
}


def decode(token: str, key: VerifyKey, config: VerifyConfig, audience: str | None = None) -> dict:
    """Verify signature and claims; return the claims. TokenError on any problem."""
    algs = key.algorithms & config.algorithms
    if not algs:
        raise TokenError("no allowed algorithm for this key type")
    try:
        claims = jwt.decode(
            token, key.key, algorithms=sorted(algs), audience=audience or config.audience,
            issuer=config.issuer, leeway=config.leeway,
            options={"require": list(REQUIRED_CLAIMS), "verify_signature": True, "verify_aud": True,
                     "verify_iss": True, "verify_exp": True, "verify_nbf": True, "verify_iat": True},
        )
    except jwt.InvalidTokenError as e:
        # the most specific PyJWT class names the reason; expiry gets its own description
        reason = next(_JWT_REASONS[c] for c in type(e).__mro__ if c in _JWT_REASONS)
        err = TokenError(reason.format(e=e, name=type(e).__name__))
        if isinstance(e, jwt.ExpiredSignatureError):
            err.description = _EXPIRED_DESC
        raise err from None
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub.strip() or len(sub) > 256:
        raise TokenError("sub must be a non-empty string")
    return claims


def claim_path(claims: dict, path: str) -> Any:
    """'realm_access.roles' -> claims['realm_access']['roles'] (None when absent).
    A claim whose own name contains dots (e.g. a namespaced URL claim) is tried first."""
    if path in claims:
        return claims[path]
    cur: Any = claims
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def roles_from(claims: dict, path: str) -> tuple[str, ...]:
    value = claim_path(claims, path)
    if value is None:
        return ()
    if isinstance(value, str):
        items: Iterable[Any] = value.split()
    elif isinstance(value, list):
        items = value
    else:
        raise TokenError(f"roles claim {path!r} is neither a list nor a string")
    out = []
    for r in items:
        if not isinstance(r, str) or not r or len(r) > 128:
            raise TokenError(f"roles claim {path!r} holds a non-string or oversized role")
        if r not in out:
            out.append(r)
    if len(out) > 256:
        raise TokenError("too many roles")
    return tuple(out)


def identity_from(claims: dict, roles_claim: str = "roles") -> Identity:
    client_id = claims.get("azp") or claims.get("client_id")
    jti = claims.get("jti")
    return Identity(
        sub=claims["sub"],
        roles=roles_from(claims, roles_claim),
        client_id=str(client_id) if client_id is not None else None,
        token_id=str(jti) if jti is not None else None,
        issuer=str(claims.get("iss")),
    )


# ---------------------------------------------------------------- revocation

@dataclass(frozen=True)
class Revocations:
    jtis: frozenset[str] = frozenset()
    subs: frozenset[str] = frozenset()

    def check(self, ident: Identity) -> str | None:
        """Reason when revoked, else None."""
        if ident.token_id is not None and ident.token_id in self.jtis:
            return "token id revoked"
        if ident.sub in self.subs:
            return "subject revoked"
        return None

    def __len__(self) -> int:
        return len(self.jtis) + len(self.subs)


def load_revocations(path: str | os.PathLike) -> Revocations:
    """Revocation list: a YAML list of `{jti: X}` / `{sub: Y}` (extra keys such as `reason`
    are ignored), or of strings `jti:X` / `sub:Y` (a bare string is a jti); a file that is
    not YAML-shaped is read as plain lines of the same strings. `#` starts a comment.
    RulesError (file:line) on anything else."""
    p = Path(path)
    data = load_yaml(p)   # a syntax error is an error: never guess at a half-edited list
    if isinstance(data, str):
        data = _plain_lines(p)
    if isinstance(data, dict) and set(map(str, data)) <= {"revoked"}:
        data = data.get("revoked")
    if data is None:
        return Revocations()
    if not isinstance(data, list):
        raise RulesError(p, None, "revocation list must be a YAML list of {jti: ...} / {sub: ...} entries")
    jtis: set[str] = set()
    subs: set[str] = set()
    for i, item in enumerate(data):
        where = _line(data, i)
        if isinstance(item, dict):
            keys = {str(k) for k in item} & {"jti", "sub"}
            if len(keys) != 1:
                raise RulesError(p, where, "each entry needs exactly one of 'jti' or 'sub'")
            k = keys.pop()
            v = item[k]
            if not isinstance(v, (str, int)) or not str(v).strip():
                raise RulesError(p, where, f"'{k}' must be a non-empty string")
            (jtis if k == "jti" else subs).add(str(v).strip())
        elif isinstance(item, (str, int)):
            kind, sep, value = str(item).strip().partition(":")
            if sep and kind in ("jti", "sub") and value.strip():
                (jtis if kind == "jti" else subs).add(value.strip())
            elif str(item).strip():
                jtis.add(str(item).strip())
        else:
            raise RulesError(p, where, "entry must be {jti: ...}, {sub: ...} or a string")
    return Revocations(frozenset(jtis), frozenset(subs))


def _line(seq: Any, i: int) -> int | None:
    try:
        return seq.lc.item(i)[0] + 1
    except Exception:
        return None


_PLAIN = re.compile(r"^((jti|sub):\s*)?[A-Za-z0-9._~+/=@:-]+$")


def _plain_lines(p: Path) -> list[str]:
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if not _PLAIN.match(line):
            raise RulesError(p, n, "expected 'jti:<id>', 'sub:<subject>' or a bare token id")
        out.append(line)
    return out


# ---------------------------------------------------------------- embedded issuer

def ensure_local_key(key_dir: str | os.PathLike) -> Path:
    """The embedded issuer's EC P-256 key, created on first use (dir 0700, file 0600).

    Creation is atomic and never overwrites: the gateway and the CLI may race on a fresh
    checkout, and both must end up with the same key."""
    d = private_dir(key_dir)
    path = d / LOCAL_KEY_FILE
    if path.exists():
        return path
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_private(path, pem, overwrite=False)   # another process won the race: keep theirs
    return path


def _private_key(key_dir: str | os.PathLike) -> Any:
    return serialization.load_pem_private_key(ensure_local_key(key_dir).read_bytes(), password=None)


def local_key_source(key_dir: str | os.PathLike) -> LocalKeySource:
    pub = _private_key(key_dir).public_key()
    return LocalKeySource(pub, jwk_thumbprint(pub), f"embedded issuer key {Path(key_dir) / LOCAL_KEY_FILE}")


def local_jwks(key_dir: str | os.PathLike) -> dict:
    """The embedded issuer's public key as a JWKS (for other gateways / tools)."""
    pub = _private_key(key_dir).public_key()
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(pub))
    jwk.update({"kid": jwk_thumbprint(pub), "use": "sig", "alg": "ES256"})
    return {"keys": [jwk]}


def mint_token(key_dir: str | os.PathLike, sub: str, roles: Iterable[str] = (), ttl: int = 3600,
               aud: str | None = None, client_id: str | None = None, **extra: Any) -> str:
    """A token from the embedded issuer. `extra` claims are added (and may override
    iss/iat/exp/jti, which tests use to build bad tokens)."""
    if not sub:
        raise ValueError("sub must not be empty")
    key = _private_key(key_dir)
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": LOCAL_ISSUER, "sub": sub, "aud": aud or DEFAULT_AUDIENCE,
        "iat": now, "exp": now + int(ttl), "jti": uuid.uuid4().hex, "roles": list(roles),
    }
    if client_id:
        claims["client_id"] = client_id
    claims.update(extra)
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": jwk_thumbprint(key.public_key()), "typ": "JWT"})


class VerifiedTokens:
    """Claims of tokens whose signature and claims were verified, so a client that sends
    the same token on every call pays for one signature check, not one per call.

    Keyed by SHA-256 of (audience, token): the cache never holds a token. An entry is used
    only while the token is still within exp (+leeway) and for at most `ttl` seconds, so
    a key rotation or a JWKS change is honoured within `ttl`. Revocation is checked by the
    caller on every use. Bounded (LRU)."""

    def __init__(self, max_entries: int = 10_000, ttl: float = 60.0):
        self._d = LRU(max_entries)                # key -> (claims, until)
        self.max = max_entries
        self.ttl = ttl

    @staticmethod
    def _key(token: str, audience: str | None) -> bytes:
        return hashlib.sha256(f"{audience or ''}\0{token}".encode()).digest()

    def get(self, token: str, audience: str | None, leeway: float, now: float | None = None) -> dict | None:
        now = time.time() if now is None else now
        k = self._key(token, audience)
        hit = self._d.get(k)
        if hit is None:
            return None
        claims, until = hit
        if now >= until or now > float(claims["exp"]) + leeway:
            self._d.discard(k)
            return None
        return claims

    def put(self, token: str, audience: str | None, claims: dict, now: float | None = None) -> None:
        if self.max <= 0 or not isinstance(claims.get("exp"), (int, float)):
            return
        now = time.time() if now is None else now
        self._d.put(self._key(token, audience), (claims, now + self.ttl))

    def clear(self) -> None:
        self._d.clear()

    def __len__(self) -> int:
        return len(self._d)
