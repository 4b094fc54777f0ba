"""The `identity` addon: every request to /mcp/<connection> carries a verified bearer JWT.

- Exactly one `Authorization: Bearer <JWT>` (scheme case-insensitive, RFC 6750); tokens
  in the query string are refused, never accepted.
- Verification (addons/core/identity/jwtverify.py): signature with an explicit per-key-type algorithm
  allow-list, exp/nbf/iat with leeway, iss, aud (per connection when configured),
  required claims, size limit, revocation list.
- Keys: the embedded issuer (default; key created in bastion_key_dir on first load), a
  local PEM, a JWKS URL or OIDC discovery. JWKS/discovery fetches run in a worker thread
  (never on the event loop); when the IdP is down and no cached key fits -> 503.
- The verified caller goes on rec.identity; per-connection `roles:` -> 403.
- 401s carry `WWW-Authenticate: Bearer resource_metadata="…"`; RFC 9728 metadata is
  served at /.well-known/oauth-protected-resource[/mcp/<name>].
"""
from __future__ import annotations

import asyncio
import re
import urllib.parse
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy.mode_specs import ReverseMode

from addons.core.connections import ConnectionRegistry
from addons.core.identity import jwtverify as jv
from addons.hooks.httputil import json_response, refuse_http
from addons.core.record import Transient, get_record
from addons.core.rules import RulesWatch, RulesError
from addons.core.textsafe import get_logger
from addons.core.masking.secretscan import TokenIndexCache

log = get_logger("bastion.identity")

METADATA_PATH = "/.well-known/oauth-protected-resource"
ADMIN_PREFIX = "/_bastion/"
_HOST_RE = re.compile(r"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_OPTIONS = ("bastion_issuer", "bastion_audience", "bastion_jwks_url", "bastion_oidc_issuer",
            "bastion_public_key", "bastion_key_dir", "bastion_leeway", "bastion_algorithms",
            "bastion_roles_claim", "bastion_jwks_cache_ttl", "bastion_jwks_cooldown")


def _http_url(value: str, what: str) -> str:
    u = urllib.parse.urlsplit(value)
    if u.scheme not in ("http", "https") or not u.hostname or u.query or u.fragment or u.username:
        raise exceptions.OptionsError(f"{what} must be an http(s) URL without query, fragment or userinfo: {value!r}")
    if u.scheme == "http" and u.hostname not in ("127.0.0.1", "localhost", "::1"):
        log.warning("%s uses plain http (%s): keys can be tampered with in transit", what, u.hostname)
    return value


def redact_authorization(req: http.Request) -> tuple[str, ...]:
    """The caller's token is consumed here: nothing later (mitmweb while a call is held,
    flow files, recordings, the upstream) may see it. Returns the values taken, as
    Headers.get_all reads them; each field keeps its place and name, its value becomes
    "<scheme> [redacted]" (one pass over the fields, not a lookup and a rewrite)."""
    fields = req.headers.fields
    found = [v for k, v in fields if k.lower() == b"authorization"]
    if found:
        req.headers.fields = tuple((k, _redacted_credentials(v)) if k.lower() == b"authorization"
                                   else (k, v) for k, v in fields)
    return tuple(v.decode("utf-8", "surrogateescape") for v in found)


# an auth-scheme name (RFC 9110 token, short): "Bearer", "Basic", "DPoP"; a value without
# one (a bare token) keeps nothing of itself
_AUTH_SCHEME = re.compile(rb"[A-Za-z][A-Za-z0-9!#$%&'*+^_`|~-]{0,15}")


def _redacted_credentials(value: bytes) -> bytes:
    scheme, sep, _ = value.strip().partition(b" ")
    return scheme + b" [redacted]" if sep and _AUTH_SCHEME.fullmatch(scheme) else b"[redacted]"


def take_authorization(flow: http.HTTPFlow) -> tuple[str, ...]:
    """The caller's Authorization values, moved from the headers to the per-flow record the
    first time a hook sees the flow (requestheaders: mitmweb lists the flow right after)."""
    rec = get_record(flow.metadata)
    if rec.caller_authorization is None:
        rec.caller_authorization = redact_authorization(flow.request)
    return rec.caller_authorization


def scrub_query_token(req: http.Request) -> bool:
    """RFC 6750 query tokens are never accepted; blank the value in place. True if found."""
    path, sep, query = req.path.partition("?")
    if "access_token" not in query:
        return False
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    if not any(k == "access_token" for k, _ in pairs):
        return False
    req.path = path + "?" + urllib.parse.urlencode(
        [(k, "[redacted]" if k == "access_token" else v) for k, v in pairs], safe="[]")
    return True


class Identity:
    name = "identity"

    def __init__(self, connections: ConnectionRegistry | None = None) -> None:
        self.registry = connections or ConnectionRegistry()   # per-connection resource metadata
        self.source: Any = None                 # jwtverify KeySource
        self.config: jv.VerifyConfig | None = None
        self.verified = jv.VerifiedTokens()
        self.revoked = jv.Revocations()
        self.token_secrets = TokenIndexCache()  # the caller's token is redacted from what it gets back
        self._revoked_watch = RulesWatch(lambda: self._load_revoked(strict=False))
        self._fetch_lock: asyncio.Lock | None = None
        self._tasks: list[asyncio.Task] = []

    # ------------------------------------------------------------ options

    def load(self, loader):
        loader.add_option("bastion_issuer", str, "",
                          "Expected token issuer (iss). Empty: the embedded issuer 'mcp-bastion-local', "
                          "or bastion_oidc_issuer when that is set.")
        loader.add_option("bastion_audience", str, jv.DEFAULT_AUDIENCE,
                          "Expected token audience (aud): the gateway's resource identifier. A connection's "
                          "`audience:` replaces it for that connection.")
        loader.add_option("bastion_jwks_url", str, "", "Verify tokens with the keys of this JWKS URL.")
        loader.add_option("bastion_oidc_issuer", str, "",
                          "Verify tokens of this OIDC provider (keys via <issuer>/.well-known/openid-configuration).")
        loader.add_option("bastion_public_key", str, "", "Verify tokens with this PEM public key (or certificate).")
        loader.add_option("bastion_key_dir", str, ".secrets",
                          "Directory of the embedded issuer's signing key (created 0700/0600 on first load).")
        loader.add_option("bastion_leeway", int, 30, "Clock skew allowed for exp/nbf/iat, in seconds.")
        loader.add_option("bastion_algorithms", str, "",
                          "Comma-separated signature algorithms to accept (default: those of the key type). "
                          "none and HMAC are never accepted.")
        loader.add_option("bastion_roles_claim", str, "roles",
                          "Claim holding the caller's roles; dotted path, e.g. realm_access.roles. "
                          "A list or a space-separated string.")
        loader.add_option("bastion_revoked", str, "",
                          "Revocation list (YAML list of {jti: ...} / {sub: ...}), re-read when it changes.")
        loader.add_option("bastion_resource_url", str, "",
                          "Public base URL of the gateway for RFC 9728 metadata (default: from the Host header).")
        loader.add_option("bastion_jwks_cache_ttl", int, 300, "Seconds a fetched JWKS is trusted before refetching.")
        loader.add_option("bastion_jwks_cooldown", int, 5,
                          "Least seconds between JWKS refetches triggered by an unknown kid.")

    def configure(self, updated):
        o = ctx.options
        if any(k in updated for k in _OPTIONS):
            self.source, self.config = self._build(o)
            self.verified.clear()
            log.info("verifying tokens from %s (issuer %s, audience %s)",
                     self.source.describe(), self.config.issuer, self.config.audience)
        if "bastion_revoked" in updated:
            self._load_revoked(strict=True)
        if "bastion_resource_url" in updated and o.bastion_resource_url:
            _http_url(o.bastion_resource_url, "bastion_resource_url")

    def _build(self, o) -> tuple[Any, jv.VerifyConfig]:
        chosen = [n for n in ("bastion_jwks_url", "bastion_oidc_issuer", "bastion_public_key") if getattr(o, n)]
        if len(chosen) > 1:
            raise exceptions.OptionsError(f"set only one key source, not {' and '.join(chosen)}")
        if not 0 <= o.bastion_leeway <= 300:
            raise exceptions.OptionsError("bastion_leeway must be between 0 and 300 seconds")
        if o.bastion_jwks_cache_ttl <= 0 or o.bastion_jwks_cooldown < 0:
            raise exceptions.OptionsError("bastion_jwks_cache_ttl must be > 0 and bastion_jwks_cooldown >= 0")
        try:
            algs = jv.parse_algorithms(o.bastion_algorithms)
        except ValueError as e:
            raise exceptions.OptionsError(f"bastion_algorithms: {e}") from None
        path = o.bastion_roles_claim
        if not path or any(not p for p in path.split(".")):
            raise exceptions.OptionsError(f"bastion_roles_claim: {path!r} is not a claim path")
        if not o.bastion_audience.strip():
            raise exceptions.OptionsError("bastion_audience must not be empty (audience is always checked)")
        jwks_kw = {"lifespan": o.bastion_jwks_cache_ttl, "cooldown": o.bastion_jwks_cooldown}
        issuer = o.bastion_issuer
        if o.bastion_jwks_url:
            source: Any = jv.JwksKeySource(_http_url(o.bastion_jwks_url, "bastion_jwks_url"), **jwks_kw)
        elif o.bastion_oidc_issuer:
            _http_url(o.bastion_oidc_issuer, "bastion_oidc_issuer")
            if issuer and issuer != o.bastion_oidc_issuer:
                raise exceptions.OptionsError("bastion_issuer differs from bastion_oidc_issuer; set only the latter")
            issuer = o.bastion_oidc_issuer
            source = jv.OidcKeySource(issuer, **jwks_kw)
        elif o.bastion_public_key:
            try:
                source = jv.LocalKeySource.from_pem(o.bastion_public_key)
            except (OSError, ValueError, TypeError) as e:
                raise exceptions.OptionsError(f"bastion_public_key: cannot load {o.bastion_public_key}: {e}") from None
        else:
            try:
                source = jv.local_key_source(o.bastion_key_dir)
            except (OSError, ValueError, TypeError) as e:
                raise exceptions.OptionsError(f"bastion_key_dir: cannot create or read the issuer key in "
                                              f"{o.bastion_key_dir}: {e}") from None
            issuer = issuer or jv.LOCAL_ISSUER
            keyfile = Path(o.bastion_key_dir) / jv.LOCAL_KEY_FILE
            if keyfile.stat().st_mode & 0o077:
                log.warning("%s is readable by other users; whoever reads it can mint any identity "
                            "(chmod 600)", keyfile)
        if not issuer:
            raise exceptions.OptionsError("bastion_issuer is required with bastion_jwks_url / bastion_public_key")
        if any(c in issuer for c in '"\\\r\n'):
            raise exceptions.OptionsError("bastion_issuer contains characters that cannot appear in metadata")
        return source, jv.VerifyConfig(issuer=issuer, audience=o.bastion_audience, leeway=o.bastion_leeway,
                                       algorithms=algs, roles_claim=path)

    def _load_revoked(self, strict: bool) -> None:
        path = ctx.options.bastion_revoked
        if not path:
            self.revoked = jv.Revocations()
            self._revoked_watch.unwatch()
            return
        try:
            self.revoked = jv.load_revocations(path)
        except (RulesError, OSError) as e:
            if strict:
                raise exceptions.OptionsError(f"bastion_revoked: {e}") from None
            # keep the last good list: it still revokes what it revoked
            log.error("revocation list reload rejected, keeping the previous one: %s", e)
            return
        finally:
            if not self._revoked_watch.watching:
                self._revoked_watch.watch(lambda: [Path(ctx.options.bastion_revoked)])
        log.info("revocation list %s: %d entr%s", path, len(self.revoked), "y" if len(self.revoked) == 1 else "ies")

    def running(self):
        loop = asyncio.get_running_loop()
        self._revoked_watch.start()
        if not isinstance(self.source, jv.LocalKeySource):
            self._tasks.append(loop.create_task(self._prefetch()))

    def done(self):
        self._revoked_watch.stop()
        for t in self._tasks:
            t.cancel()

    def poll_revoked(self) -> None:
        self._revoked_watch.check()

    async def _prefetch(self):
        """Warm the JWKS cache at start-up so the first caller does not wait; a failure is
        only logged (requests then answer 503 until the IdP is reachable)."""
        source = self.source
        try:
            await asyncio.to_thread(source.warm)
        except jv.KeyUnavailable as e:
            log.error("token keys not available yet: %s", e)

    # ------------------------------------------------------------ hooks

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # before mitmweb's View lists the flow (it runs after every script's requestheaders)
        take_authorization(flow)
        scrub_query_token(flow.request)

    async def request(self, flow: http.HTTPFlow) -> None:
        # even when an earlier addon already refused it: the token must not survive in
        # the flow (mitmdump's log line, recordings, flow files)
        take_authorization(flow)
        scrub_query_token(flow.request)
        if flow.response is not None:
            return
        rec = get_record(flow.metadata)
        path = flow.request.path
        if rec.connection is None:
            if path.split("?")[0] == METADATA_PATH or path.startswith(METADATA_PATH + "/"):
                self.serve_metadata(flow)
            elif path.startswith(ADMIN_PREFIX) and rec.caller_authorization:
                # admin API (approvals): identify the caller if it presents a token; the
                # addon serving the path decides whether one is required
                try:
                    await self.authenticate(flow, None)
                finally:
                    rec.caller_authorization = ()
            return
        try:
            await self.authenticate(flow, rec.connection)
        finally:
            rec.caller_authorization = ()

    async def authenticate(self, flow: http.HTTPFlow, connection: str | None) -> None:
        rec = get_record(flow.metadata)
        req = flow.request
        conn = self._connection(connection) if connection else None
        if scrub_query_token(req):
            self._refuse(flow, 400, "invalid_request", "access tokens are not accepted in the query string",
                         "token in query string", connection)
            return
        values = rec.caller_authorization or ()
        if not values:
            self._refuse(flow, 401, None, "a bearer token is required", "no Authorization header", connection)
            return
        if len(values) > 1:
            self._refuse(flow, 401, "invalid_request", "send exactly one Authorization header",
                         "several Authorization headers", connection)
            return
        scheme, _, token = values[0].strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            self._refuse(flow, 401, None, "a bearer token is required", "Authorization scheme is not Bearer", connection)
            return
        audience = conn.audience if conn is not None and getattr(conn, "audience", None) else None
        try:
            ident = await self.verify(token, audience)
        except jv.TokenError as e:
            self._refuse(flow, 401, e.code, e.description, e.reason, connection)
            return
        except jv.KeyUnavailable as e:
            log.error("refused %s %s: token keys unavailable (failing closed): %s", req.method, req.path, e)
            refuse_http(flow, 503, "temporarily_unavailable", "the gateway cannot verify tokens right now",
                        {"retry-after": "5"}, rule="identity:keys-unavailable")
            return
        rec.identity = ident
        if getattr(getattr(conn, "credential", None), "kind", None) == "exchange":
            rec.subject_token = Transient(token)   # the RFC 8693 subject_token; the Injector clears it
        rec.known_secrets.append(self.token_secrets.get(token))
        needed = tuple(getattr(conn, "roles", ()) or ()) if conn is not None else ()
        if needed and not set(needed) & set(ident.roles):
            log.warning("refused %s %s for sub=%s: connection %s needs one of roles %s",
                        req.method, req.path, ident.sub, connection, ",".join(needed))
            meta_url = self.metadata_url(flow, connection)
            refuse_http(flow, 403, "insufficient_scope", "your identity may not use this connection",
                        {"www-authenticate": f'Bearer error="insufficient_scope", resource_metadata="{meta_url}"'},
                        rule="identity:roles")

    async def verify(self, token: str, audience: str | None = None):
        """Token -> Identity. TokenError (401) or KeyUnavailable (503)."""
        config, source = self.config, self.source
        if config is None or source is None:
            raise jv.KeyUnavailable("identity addon is not configured")
        claims = self.verified.get(token, audience, config.leeway)
        if claims is None:
            kid = jv.peek_header(token, config)
            key = source.cached(kid)
            if key is None:
                # one fetch at a time: concurrent callers wait and then hit the fresh cache
                if self._fetch_lock is None:
                    self._fetch_lock = asyncio.Lock()
                async with self._fetch_lock:
                    key = source.cached(kid)
                    if key is None:
                        key = await asyncio.to_thread(source.fetch, kid)
            claims = jv.decode(token, key, config, audience)
            self.verified.put(token, audience, claims)
        ident = jv.identity_from(claims, config.roles_claim)
        why = self.revoked.check(ident)
        if why:
            raise jv.TokenError(why, "the access token has been revoked")
        return ident

    def _refuse(self, flow: http.HTTPFlow, status: int, error: str | None, description: str,
                reason: str, connection: str | None) -> None:
        # the metadata URL only on a refusal: building it costs a fifth of a verified call
        meta_url = self.metadata_url(flow, connection)
        log.warning("refused %s %s: %s", flow.request.method, flow.request.path.split("?")[0], reason)
        params = ([f'error="{error}"'] if error else []) + [f'resource_metadata="{meta_url}"']
        refuse_http(flow, status, error or "unauthorized", description,
                    {"www-authenticate": "Bearer " + ", ".join(params)},
                    rule=f"identity:{error or 'missing-token'}")
        get_record(flow.metadata).auth_failure = reason

    # ------------------------------------------------------------ RFC 9728 metadata

    def _connection(self, name: str | None):
        return self.registry.get(name)

    def resource_base(self, flow: http.HTTPFlow) -> str:
        base = ctx.options.bastion_resource_url
        if base:
            return base.rstrip("/")
        scheme = "https" if flow.client_conn.tls_established else "http"
        if isinstance(flow.client_conn.proxy_mode, ReverseMode) and not getattr(ctx.options, "keep_host_header", False):
            # reverse mode has already replaced Host with the upstream's; the address the
            # client connected to is the best we know (set bastion_resource_url behind a LB)
            ip, port = flow.client_conn.sockname[:2]
            host = f"[{ip}]:{port}" if ":" in str(ip) else f"{ip}:{port}"
        else:
            host = flow.request.headers.get("host", "")
        if not _HOST_RE.match(host):
            host = "localhost"
        return f"{scheme}://{host}"

    def resource(self, flow: http.HTTPFlow, connection: str | None) -> str:
        base = self.resource_base(flow)
        return f"{base}/mcp/{connection}" if connection else base

    def metadata_url(self, flow: http.HTTPFlow, connection: str | None) -> str:
        base = self.resource_base(flow)
        u = urllib.parse.urlsplit(base)
        path = u.path.rstrip("/") + (f"/mcp/{connection}" if connection else "")
        # RFC 9728 section 3.1: the well-known segment goes between host and path
        return urllib.parse.urlunsplit((u.scheme, u.netloc, METADATA_PATH + path, "", ""))

    def metadata(self, flow: http.HTTPFlow, connection: str | None) -> dict:
        assert self.config is not None
        doc = {
            "resource": self.resource(flow, connection),
            "authorization_servers": [self.config.issuer],
            "bearer_methods_supported": ["header"],
            "resource_name": f"mcp-bastion: {connection}" if connection else "mcp-bastion",
        }
        return doc

    def serve_metadata(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        if req.method not in ("GET", "HEAD"):
            refuse_http(flow, 405, "method_not_allowed", "metadata is read with GET", {"allow": "GET, HEAD"})
            return
        rest = req.path.split("?")[0][len(METADATA_PATH):]
        connection = None
        if rest not in ("", "/"):
            base_path = urllib.parse.urlsplit(ctx.options.bastion_resource_url).path.rstrip("/")
            if base_path and rest.startswith(base_path + "/"):
                rest = rest[len(base_path):]
            m = re.fullmatch(r"/mcp/([^/]+)/?", rest)
            if not m or not _NAME_RE.match(m.group(1)) or self._connection(m.group(1)) is None:
                refuse_http(flow, 404, "not_found", "no protected resource at this path")
                return
            connection = m.group(1)
        flow.response = json_response(200, self.metadata(flow, connection),
                                      {"cache-control": "max-age=300", "access-control-allow-origin": "*"})


# ---------------------------------------------------------------- CLI
