"""Upstream credentials: what the Injector sends to a connection's upstream, per call.

Three kinds, chosen per connection in rules/connections.yaml (`credential:`):
- service  : the connection's one secret (`from: env:|file:`), resolved when rules load;
- exchange : OAuth 2.0 Token Exchange (RFC 8693): the caller's verified token is traded at
             the authorisation server for one whose audience is the upstream, cached per
             (issuer, subject, connection, scope) until shortly before it expires;
- vault    : a per-subject token or API key from the encrypted vault (addons/core/identity/vault.py).

No mitmproxy import: the Injector hands in the record's identity and the subject token and
gets back a header to set, or a CredentialRefused saying how to refuse. Token values never
appear in exceptions, logs or reprs.
"""
from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Literal

import httpx

Kind = Literal["service", "exchange", "vault"]

EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
TOKEN_TYPE_URNS = {"access_token": "urn:ietf:params:oauth:token-type:access_token",
                   "jwt": "urn:ietf:params:oauth:token-type:jwt"}
# An exchanged token goes into a header: printable ASCII only (no CR/LF smuggling), bounded.
_HEADER_SAFE = re.compile(r"^[\x21-\x7e]{1,16384}$")
_ERROR_CODE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
CACHE_MARGIN = 30          # seconds before expiry a cached token is no longer used
MAX_CACHED = 10_000


@dataclass(frozen=True)
class Injected:
    """A header value to send upstream, and which kind of credential it is (for the audit)."""

    header: str
    value: str = field(repr=False)
    kind: Kind = "service"


class CredentialRefused(Exception):
    """The call cannot get an upstream credential: refuse it before the upstream.

    `reason` is for the gateway log and the audit store (never a token value);
    `description` is what the caller is told.
    """

    def __init__(self, kind: Kind, reason: str, *, status: int, error: str, description: str,
                 rule: str, authorize_url: str | None = None, retry_after: int | None = None):
        super().__init__(reason)
        self.kind, self.reason, self.status, self.error = kind, reason, status, error
        self.description, self.rule = description, rule
        self.authorize_url, self.retry_after = authorize_url, retry_after


@dataclass(frozen=True)
class ExchangeCredential:
    """`credential: {exchange: {...}}` of one connection."""

    token_endpoint: str
    audience: str | None = None
    scope: str | None = None
    resource: str | None = None
    client_id: str | None = None
    client_secret_source: str | None = None      # env:NAME / file:PATH, never the secret
    client_secret: str | None = field(default=None, repr=False, compare=False)
    subject_token_type: str = TOKEN_TYPE_URNS["access_token"]
    header: str = "Authorization"
    scheme: str | None = "Bearer"
    timeout: float = 5.0

    kind: Kind = "exchange"

    @property
    def source(self) -> str:
        return f"exchange:{self.token_endpoint}"

    def form(self, subject_token: str) -> dict[str, str]:
        """RFC 8693 section 2.1 request parameters."""
        data = {"grant_type": EXCHANGE_GRANT, "subject_token": subject_token,
                "subject_token_type": self.subject_token_type,
                "requested_token_type": TOKEN_TYPE_URNS["access_token"]}
        for k in ("audience", "scope", "resource"):
            if getattr(self, k):
                data[k] = getattr(self, k)
        if self.client_id and not self.client_secret:
            data["client_id"] = self.client_id      # public client (RFC 6749 section 2.3)
        return data

    def auth(self) -> httpx.BasicAuth | None:
        return basic_auth(self.client_id, self.client_secret)


def basic_auth(client_id: str | None, client_secret: str | None) -> httpx.BasicAuth | None:
    """client_secret_basic (RFC 6749 section 2.3.1: form-urlencode both parts first)."""
    if client_id and client_secret:
        q = urllib.parse.quote_plus
        return httpx.BasicAuth(q(client_id), q(client_secret))
    return None


@dataclass(frozen=True)
class RefreshConfig:
    """`vault: {refresh: {...}}`: where the gateway refreshes oauth vault entries."""

    token_endpoint: str
    client_id: str | None = None
    client_secret_source: str | None = None
    client_secret: str | None = field(default=None, repr=False, compare=False)
    timeout: float = 5.0


@dataclass(frozen=True)
class VaultCredential:
    """`credential: {vault: {...}}`: per-subject secrets from the credential vault."""

    header: str = "Authorization"
    scheme: str | None = "Bearer"
    authorize_url: str | None = None   # where a subject without an entry goes to authorise
    refresh: RefreshConfig | None = None

    kind: Kind = "vault"

    @property
    def source(self) -> str:
        return "vault"


async def single_flight(inflight: dict, key: Any, start: Callable[[], Awaitable[Any]]) -> Any:
    """One running task per key, shared (and shielded from one caller's cancellation) by
    every concurrent caller; the entry goes when the task ends."""
    task = inflight.get(key)
    if task is None:
        task = inflight[key] = asyncio.ensure_future(start())
        task.add_done_callback(lambda _t: inflight.pop(key, None))
    return await asyncio.shield(task)


def with_scheme(scheme: str | None, value: str) -> str:
    return f"{scheme} {value}" if scheme else value


def _unavailable(reason: str) -> CredentialRefused:
    return CredentialRefused("exchange", reason, status=503, error="temporarily_unavailable",
                             description="the gateway cannot obtain an upstream credential right now",
                             rule="credential:exchange-unavailable", retry_after=5)


def _denied(reason: str) -> CredentialRefused:
    return CredentialRefused("exchange", reason, status=403, error="access_denied",
                             description="the authorisation server refused to delegate your identity to this connection",
                             rule="credential:exchange-denied")


def _jwt_exp(token: str) -> float | None:
    """`exp` of a JWT-shaped token, unverified (only used to bound caching; the upstream
    verifies the token)."""
    import jwt
    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.PyJWTError:
        return None
    return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None


def parse_token_response(status: int, body: bytes, now: float, exchange: bool = True) -> tuple[str, float | None, str | None]:
    """The token endpoint's answer -> (access token, expiry or None, refresh token or None).
    Raises CredentialRefused: 403 when the server refused (4xx), 503 when it is unusable
    (5xx, malformed). `exchange`: an RFC 8693 answer, which must name its issued_token_type."""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if status >= 500 or (status >= 400 and not isinstance(doc, dict)):
        raise _unavailable(f"token endpoint answered HTTP {status}")
    if status >= 400:
        code = doc.get("error")
        code = code if isinstance(code, str) and _ERROR_CODE.match(code) else "unknown"
        raise _denied(f"token endpoint refused the {'exchange' if exchange else 'refresh'}: HTTP {status} {code}")
    if status != 200 or not isinstance(doc, dict):
        raise _unavailable(f"token endpoint answered HTTP {status} without a JSON object")
    token = doc.get("access_token")
    if not isinstance(token, str) or not _HEADER_SAFE.match(token):
        raise _unavailable("token endpoint response has no usable access_token")
    if exchange and doc.get("issued_token_type") not in TOKEN_TYPE_URNS.values():   # REQUIRED, RFC 8693 2.2.1
        raise _unavailable("token endpoint response has no access-token issued_token_type")
    if str(doc.get("token_type", "")).lower() != "bearer":
        raise _unavailable("token endpoint issued a token that is not a bearer token")
    refresh = doc.get("refresh_token")
    if refresh is not None and (not isinstance(refresh, str) or not _HEADER_SAFE.match(refresh)):
        raise _unavailable("token endpoint response has an unusable refresh_token")
    exp_in = doc.get("expires_in")
    if isinstance(exp_in, (int, float)) and not isinstance(exp_in, bool) and exp_in > 0:
        return token, now + float(exp_in), refresh
    return token, _jwt_exp(token), refresh


class TokenExchanger:
    """RFC 8693 client with a per-(issuer, subject, connection, exchange settings) cache.

    Concurrent calls for the same key wait for one exchange (single flight). A token is
    reused until `margin` seconds before it expires; one without a known lifetime is not
    cached at all. The cache is bounded (least recently used evicted).
    """

    def __init__(self, client: httpx.AsyncClient | None = None, margin: float = CACHE_MARGIN,
                 max_entries: int = MAX_CACHED, clock: Callable[[], float] = time.time):
        self._client = client
        self.margin, self.max_entries, self.clock = margin, max_entries, clock
        self._cache: OrderedDict[tuple, tuple[str, float]] = OrderedDict()
        self._inflight: dict[tuple, asyncio.Future] = {}
        self.exchanges = 0          # requests sent to token endpoints (metrics, tests)

    def clear(self) -> None:
        self._cache.clear()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _cached(self, key: tuple) -> str | None:
        hit = self._cache.get(key)
        if hit is None:
            return None
        if hit[1] - self.margin <= self.clock():
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return hit[0]

    async def token(self, cred: ExchangeCredential, connection: str, issuer: str | None, sub: str,
                    subject_token: str) -> str:
        key = (connection, cred, issuer, sub)
        tok = self._cached(key)
        if tok is not None:
            return tok
        # single flight: concurrent calls of one subject share one exchange
        return await single_flight(self._inflight, key, lambda: self._exchange_and_cache(key, cred, subject_token))

    async def _exchange_and_cache(self, key: tuple, cred: ExchangeCredential, subject_token: str) -> str:
        tok, expires = await self._exchange(cred, subject_token)
        if expires is not None and expires - self.margin > self.clock():
            self._cache[key] = (tok, expires)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return tok

    async def _exchange(self, cred: ExchangeCredential, subject_token: str) -> tuple[str, float | None]:
        status, body = await self._post(cred.token_endpoint, cred.form(subject_token), cred.auth(), cred.timeout)
        tok, expires, _ = parse_token_response(status, body, self.clock())
        return tok, expires

    async def refresh(self, cfg: "RefreshConfig", refresh_token: str) -> tuple[str, float | None, str | None]:
        """RFC 6749 section 6 refresh. The answer may carry a new (rotated) refresh token."""
        status, body = await self._post(cfg.token_endpoint, {"grant_type": "refresh_token",
                                                             "refresh_token": refresh_token},
                                        basic_auth(cfg.client_id, cfg.client_secret), cfg.timeout)
        return parse_token_response(status, body, self.clock(), exchange=False)

    async def _post(self, url: str, form: dict[str, str], auth: httpx.BasicAuth | None,
                    timeout: float) -> tuple[int, bytes]:
        if self._client is None:
            # no redirects: a token endpoint that redirects would carry the token elsewhere
            self._client = httpx.AsyncClient(follow_redirects=False, trust_env=False)
        self.exchanges += 1
        try:
            r = await self._client.post(url, data=form, auth=auth, headers={"accept": "application/json"},
                                        timeout=timeout)
        except httpx.TimeoutException:
            raise _unavailable("token endpoint timed out") from None
        except httpx.HTTPError as e:
            raise _unavailable(f"token endpoint unreachable ({type(e).__name__})") from None
        return r.status_code, r.content


class UpstreamCredentials:
    """Produces the credential for one call from its connection's `credential:` kind."""

    def __init__(self, exchanger: TokenExchanger, vault: Callable[[], Any],
                 store: Callable[..., Awaitable[None]] | None = None):
        self.exchanger = exchanger
        self.vault = vault            # () -> addons.core.identity.vault.Vault, raising VaultError when unusable
        self.store = store            # async (connection, sub, access, refresh, expires): write back a refresh
        self._refreshing: dict[tuple[str, str], asyncio.Future] = {}

    async def for_call(self, connection: str, cred: Any, service_secret: str | None, sub: str | None,
                       issuer: str | None, subject_token: str | None) -> Injected | None:
        if isinstance(cred, ExchangeCredential):
            if sub is None or not subject_token:
                raise _denied("no verified caller token to exchange")
            tok = await self.exchanger.token(cred, connection, issuer, sub, subject_token)
            return Injected(cred.header, with_scheme(cred.scheme, tok), "exchange")
        if isinstance(cred, VaultCredential):
            secret = await self._from_vault(cred, connection, sub)
            return Injected(cred.header, with_scheme(cred.scheme, secret), "vault")
        if cred is not None and service_secret:
            return Injected(cred.header, service_secret, "service")
        return None

    async def _from_vault(self, cred: VaultCredential, connection: str, sub: str | None) -> str:
        from addons.core.identity.vault import NoEntry, VaultError
        try:
            if sub is None:
                raise NoEntry("none")
            try:
                return self.vault().lookup(connection, sub, margin=self.exchanger.margin)
            except NoEntry as e:
                if e.why != "expired" or cred.refresh is None or self.store is None:
                    raise
                return await self._refresh(cred, connection, sub)
        except NoEntry as e:
            raise _consent(cred, connection, sub, {"none": "missing"}.get(e.why, e.why)) from None
        except VaultError as e:
            raise CredentialRefused("vault", f"vault unusable: {e}", status=503, error="temporarily_unavailable",
                                    description="the gateway cannot read its credential vault",
                                    rule="credential:vault-unavailable", retry_after=5) from None

    async def _refresh(self, cred: VaultCredential, connection: str, sub: str) -> str:
        # single flight: a rotated refresh token is good once, a second use would fail (or
        # make the authorisation server revoke the whole grant)
        key = (connection, sub)
        return await single_flight(self._refreshing, key, lambda: self._do_refresh(cred, connection, sub))

    async def _do_refresh(self, cred: VaultCredential, connection: str, sub: str) -> str:
        from addons.core.identity.vault import NoEntry
        assert cred.refresh is not None and self.store is not None
        old = self.vault().refresh_token(connection, sub)
        if old is None:
            raise NoEntry("expired")
        try:
            access, expires, rotated = await self.exchanger.refresh(cred.refresh, old)
        except CredentialRefused as e:
            if e.status == 403:      # refresh token revoked, expired or reused: the user must authorise again
                raise _consent(cred, connection, sub, "refresh-denied") from None
            raise CredentialRefused("vault", e.reason, status=503, error=e.error, description=e.description,
                                    rule="credential:vault-refresh-unavailable", retry_after=5) from None
        await self.store(connection, sub, access, rotated or old, expires)
        return access


def _consent(cred: VaultCredential, connection: str, sub: str | None, why: str) -> CredentialRefused:
    return CredentialRefused(
        "vault", f"vault entry {why} for sub={sub} on {connection}", status=403,
        error="credential_required", rule=f"credential:vault-{why}", authorize_url=cred.authorize_url,
        description=f"no upstream credential for you on this connection ({why})"
                    + (f"; authorise at {cred.authorize_url}" if cred.authorize_url else ""))


# JSON-RPC code of "this call needs an upstream credential you do not have" on protocol
# revisions without URL elicitation (see policy.py for the gateway's -3203x band).
CREDENTIAL_REQUIRED = -32038
URL_ELICITATION_REVISIONS = frozenset({"2025-11-25"})   # -32042 exists only there (mcp_types.jsonrpc)


def consent_errors(e: CredentialRefused, messages: list, protocol_version: str | None) -> list[dict] | None:
    """JSON-RPC errors telling each request of the call where to authorise, or None when the
    call has no request to answer (then the refusal is an HTTP 403).

    On 2025-11-25 this is URLElicitationRequiredError (-32042) with a URL-mode elicitation;
    elsewhere -32038 with the URL in `data.authorize_url`."""
    from addons.core.mcpwire import jsonrpc_error
    ids = [m.id for m in messages if m.kind == "request"]
    if not ids or e.error != "credential_required":
        return None
    url = e.authorize_url
    out = []
    for i in ids:
        if url and protocol_version in URL_ELICITATION_REVISIONS:
            data: dict[str, Any] = {"elicitations": [{
                "mode": "url", "elicitationId": f"bastion-consent-{secrets.token_hex(8)}", "url": url,
                "message": "Authorise mcp-bastion to use this service on your behalf, then retry."}]}
            out.append(jsonrpc_error(i, -32042, "URL elicitation required: " + e.description, data))
        else:
            out.append(jsonrpc_error(i, CREDENTIAL_REQUIRED, e.description,
                                     {"authorize_url": url, "rule": e.rule} if url else {"rule": e.rule}))
    return out


# ---------------------------------------------------------------- rules parsing

_EXCHANGE_KEYS = {"token_endpoint", "audience", "scope", "resource", "client_auth", "subject_token_type",
                  "timeout"}
_VAULT_KEYS = {"authorize_url", "refresh"}


def _url(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    u = urllib.parse.urlsplit(value)
    if u.scheme not in ("http", "https") or not u.hostname or u.fragment or u.username or u.password:
        return None
    return value


def parse_exchange(spec: Any, resolve: Callable[[str], str]) -> tuple[dict[str, Any], str | None]:
    """`exchange:` mapping -> (ExchangeCredential kwargs, error). `resolve` reads a
    `from: env:|file:` reference (raising ValueError with a safe message)."""
    if not isinstance(spec, dict):
        return {}, "exchange must be a mapping with token_endpoint"
    unknown = set(map(str, spec)) - _EXCHANGE_KEYS
    if unknown:
        return {}, f"exchange: unknown key(s) {', '.join(sorted(unknown))}"
    endpoint = _url(spec.get("token_endpoint"))
    if endpoint is None:
        return {}, "exchange.token_endpoint must be an http(s) URL without userinfo or fragment"
    out: dict[str, Any] = {"token_endpoint": endpoint}
    for k in ("audience", "scope", "resource"):
        if spec.get(k) is not None:
            if not isinstance(spec[k], str) or not spec[k].strip():
                return {}, f"exchange.{k} must be a non-empty string"
            out[k] = spec[k]
    if not (out.get("audience") or out.get("resource")):
        return {}, "exchange needs an audience (or resource) naming the upstream"
    stt = spec.get("subject_token_type", "access_token")
    if stt not in TOKEN_TYPE_URNS:
        return {}, "exchange.subject_token_type must be access_token or jwt"
    out["subject_token_type"] = TOKEN_TYPE_URNS[stt]
    timeout = spec.get("timeout", 5)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= 60:
        return {}, "exchange.timeout must be between 0 and 60 seconds"
    out["timeout"] = float(timeout)
    client, err = _client_auth(spec.get("client_auth"), resolve, "exchange")
    if err:
        return {}, err
    return {**out, **client}, None


def _client_auth(ca: Any, resolve: Callable[[str], str], where: str) -> tuple[dict[str, Any], str | None]:
    if ca is None:
        return {}, None
    if not isinstance(ca, dict) or not isinstance(ca.get("client_id"), str) or not ca["client_id"]:
        return {}, f"{where}.client_auth needs client_id (and client_secret: {{from: env:|file:}})"
    if set(map(str, ca)) - {"client_id", "client_secret"}:
        return {}, f"{where}.client_auth: only client_id and client_secret"
    out: dict[str, Any] = {"client_id": ca["client_id"]}
    sec = ca.get("client_secret")
    if sec is not None:
        src = sec.get("from") if isinstance(sec, dict) else None
        if not isinstance(src, str) or not re.match(r"^(env:[A-Za-z_][A-Za-z0-9_]*|file:.+)$", src):
            return {}, f"{where}.client_auth.client_secret must be {{from: env:NAME | file:PATH}}"
        try:
            out["client_secret"] = resolve(src)
        except ValueError as e:
            return {}, f"{where}.client_auth.client_secret: {e}"
        out["client_secret_source"] = src
    return out, None


def parse_vault(spec: Any, resolve: Callable[[str], str]) -> tuple[dict[str, Any], str | None]:
    if spec is None or spec is True:
        return {}, None
    if not isinstance(spec, dict):
        return {}, "vault must be a mapping (or true)"
    unknown = set(map(str, spec)) - _VAULT_KEYS
    if unknown:
        return {}, f"vault: unknown key(s) {', '.join(sorted(unknown))}"
    out: dict[str, Any] = {}
    if spec.get("authorize_url") is not None:
        url = _url(spec["authorize_url"])
        if url is None:
            return {}, "vault.authorize_url must be an http(s) URL"
        out["authorize_url"] = url
    r = spec.get("refresh")
    if r is not None:
        if not isinstance(r, dict) or set(map(str, r)) - {"token_endpoint", "client_auth", "timeout"}:
            return {}, "vault.refresh takes token_endpoint, client_auth and timeout"
        endpoint = _url(r.get("token_endpoint"))
        if endpoint is None:
            return {}, "vault.refresh.token_endpoint must be an http(s) URL without userinfo or fragment"
        client, err = _client_auth(r.get("client_auth"), resolve, "vault.refresh")
        if err:
            return {}, err
        timeout = r.get("timeout", 5)
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= 60:
            return {}, "vault.refresh.timeout must be between 0 and 60 seconds"
        out["refresh"] = RefreshConfig(endpoint, timeout=float(timeout), **client)
    return out, None
