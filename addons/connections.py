"""Connections: route /mcp/<name>/… to the registered upstream, and inject its credential.

Addons at both ends of the chain:
- Router (first): resolves the connection from the path, refuses unknown names and path
  tricks, records the target on the bastion record. Leaves headers alone so identity can
  read the caller's token.
- Injector (last): once every check passed, and only if the request is still the one
  the checks saw (rec.checked), points it at the upstream and removes every client
  credential header.
- Forwarder (added behind every other addon, mitmweb's Intercept and View included):
  refuses a request changed after the Injector (mitmweb's intercept filter lets a user
  edit it), and adds the service credential to the request's wire form only, so no flow
  the UI lists, exports or saves ever holds it.
"""
from __future__ import annotations

import os
import re
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from mitmproxy import ctx, exceptions, http

from addons import credentials as creds
from addons.httputil import checked_snapshot, json_response, refuse_http, refuse_jsonrpc
from addons.legacyrefusal import carrier_ok
from addons.record import METADATA_KEY, BastionRecord, get_record
from addons.rules import ChangeWatcher, Located, RulesError, load_yaml, poll_forever, rules_files
from addons.toolintegrity import IntegrityConfig, parse_integrity
from addons.vault import DEFAULT_KEY, DEFAULT_VAULT, Vault, VaultError, key_path, load_key, updating
from addons.textsafe import get_logger

log = get_logger("bastion.connections")

MCP_PREFIX = "/mcp/"
LOCAL_PREFIXES = ("/.well-known/", "/_bastion/")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
# Headers a client could use to carry a credential or spoof its origin upstream.
CLIENT_CREDENTIAL_HEADERS = (
    "authorization", "proxy-authorization", "cookie", "x-api-key", "api-key",
    "x-auth-token", "x-amz-security-token", "forwarded", "x-forwarded-for",
    "x-forwarded-host", "x-forwarded-proto", "x-real-ip",
    # more forwarding / override headers some upstream frameworks trust for routing
    "x-forwarded-port", "x-forwarded-prefix", "x-forwarded-server", "x-original-url",
    "x-rewrite-url", "x-http-method-override", "x-client-ip", "true-client-ip",
)
HOP_BY_HOP = ("connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade")
# Ask the upstream for identity encoding: responses are inspected (and SSE masked while
# streaming), which a compressed stream would defeat.
NEGOTIATION = ("accept-encoding",)
STRIPPED_REQUEST_HEADERS = frozenset(h.encode() for h in CLIENT_CREDENTIAL_HEADERS + HOP_BY_HOP + NEGOTIATION)
MAX_ANNOUNCED = 1024


@dataclass(frozen=True)
class Credential:
    source: str                  # "env:NAME" or "file:PATH" — never the secret itself
    header: str = "Authorization"
    scheme: str | None = "Bearer"

    def resolve(self, base: Path) -> str:
        kind, _, ref = self.source.partition(":")
        if kind == "env":
            value = os.environ.get(ref)
            if not value:
                raise RulesError(base, None, f"credential {self.source}: environment variable is not set")
        else:
            p = Path(ref)
            if not p.is_absolute():
                p = (base / p) if (base / p).exists() else Path.cwd() / p
            try:
                value = p.read_text(encoding="utf-8").strip()
            except OSError as e:
                raise RulesError(base, None, f"credential {self.source}: cannot read ({e.strerror})") from None
            if not value:
                raise RulesError(base, None, f"credential {self.source}: file is empty")
        return f"{self.scheme} {value}" if self.scheme else value


AnyCredential = Union[Credential, creds.ExchangeCredential, creds.VaultCredential]


@dataclass
class Connection:
    name: str
    scheme: str
    host: str
    port: int
    path: str                    # upstream MCP endpoint path, e.g. /mcp or /sse
    credential: AnyCredential | None
    transport: str = "streamable"   # or "sse" (legacy HTTP+SSE, 2024-11-05)
    audience: str | None = None
    roles: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    integrity: IntegrityConfig = field(default_factory=IntegrityConfig)
    environment: str | None = None   # selects `environments:` actions in policy rules
    secret: str | None = field(default=None, repr=False)
    # legacy SSE: upstream paths announced by `endpoint` events (bounded)
    announced: OrderedDict = field(default_factory=OrderedDict, repr=False)

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def announce(self, path: str) -> None:
        self.announced[path] = True
        self.announced.move_to_end(path)
        while len(self.announced) > MAX_ANNOUNCED:
            self.announced.popitem(last=False)


_ALLOWED_KEYS = {"upstream", "credential", "transport", "audience", "roles", "description", "options", "integrity",
                 "environment"}


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: str) -> str:
    """`${VAR}` / `${VAR:-default}` in upstream URLs (ports differ per deployment)."""
    return _ENV_REF.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), value)


def parse_connections(path: Path, data: Any) -> dict[str, Connection]:
    """Validate the connections document. Pure apart from reading credentials."""
    loc = Located(str(path))
    if data is None:
        return {}
    if not isinstance(data, dict) or "connections" not in data:
        raise loc.error(data, "top level must be a mapping with a 'connections' key")
    conns = data["connections"]
    if not isinstance(conns, dict):
        raise loc.error(data, "'connections' must be a mapping of name -> connection", "connections")
    out: dict[str, Connection] = {}
    for name, spec in conns.items():
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise loc.error(conns, f"connection name {name!r} must match {NAME_RE.pattern}", name)
        if not isinstance(spec, dict):
            raise loc.error(conns, f"connection {name}: must be a mapping", name)
        unknown = set(map(str, spec)) - _ALLOWED_KEYS
        if unknown:
            raise loc.error(spec, f"connection {name}: unknown key(s) {', '.join(sorted(unknown))}", sorted(unknown)[0])
        url = expand_env(str(spec.get("upstream") or ""))
        u = urllib.parse.urlsplit(url)
        try:
            port = u.port
        except ValueError:
            raise loc.error(spec, f"connection {name}: upstream has an invalid port", "upstream") from None
        if u.scheme not in ("http", "https") or not u.hostname:
            raise loc.error(spec, f"connection {name}: upstream must be an http(s) URL",
                            "upstream" if "upstream" in spec else None)
        if u.query or u.fragment or u.username or u.password:
            raise loc.error(spec, f"connection {name}: upstream must not carry query, fragment or userinfo "
                            "(put credentials in 'credential')", "upstream")
        transport = str(spec.get("transport", "streamable"))
        if transport not in ("streamable", "sse"):
            raise loc.error(spec, f"connection {name}: transport must be 'streamable' or 'sse'", "transport")
        cred: AnyCredential | None = None
        c = spec.get("credential")
        if isinstance(c, dict) and ("exchange" in c or "vault" in c):
            cred = _delegated_credential(loc, name, c, path.parent)
        elif c is not None:
            # where to point errors: the `from` key, or the credential line for the short form
            where: tuple[Any, Any] = (c, "from")
            if isinstance(c, str):
                c, where = {"from": c}, (spec, "credential")
            if not isinstance(c, dict) or not isinstance(c.get("from"), str):
                raise loc.error(spec, f"connection {name}: credential needs 'from: env:NAME' or 'from: file:PATH'", "credential")
            src = c["from"]
            if not re.match(r"^(env:[A-Za-z_][A-Za-z0-9_]*|file:.+)$", src):
                raise loc.error(where[0], f"connection {name}: credential 'from' must be env:NAME or file:PATH "
                                "(secrets are never written inline)", where[1])
            header, scheme = _header_scheme(loc, name, c)
            cred = Credential(src, header, scheme)
        roles = spec.get("roles") or ()
        if isinstance(roles, str):
            roles = (roles,)
        if not isinstance(roles, (list, tuple)):
            raise loc.error(spec, f"connection {name}: roles must be a list", "roles")
        if not isinstance(spec.get("options") or {}, dict):
            raise loc.error(spec, f"connection {name}: options must be a mapping", "options")
        conn = Connection(
            name=name, scheme=u.scheme, host=u.hostname, port=port or (443 if u.scheme == "https" else 80),
            path=u.path or "/", credential=cred, transport=transport,
            audience=str(spec["audience"]) if spec.get("audience") else None,
            roles=tuple(str(r) for r in roles), options=dict(spec.get("options") or {}),
            integrity=parse_integrity(loc, spec.get("integrity"), name),
            environment=str(spec["environment"]) if spec.get("environment") else None,
        )
        if isinstance(cred, Credential):
            try:
                conn.secret = cred.resolve(path.parent)
            except RulesError as e:
                raise loc.error(spec, f"connection {name}: {e.message}", "credential") from None
        out[name] = conn
    return out


def _header_scheme(loc: Located, name: str, c: dict) -> tuple[str, str | None]:
    header = str(c.get("header", "Authorization"))
    if not re.match(r"^[A-Za-z0-9-]+$", header):
        raise loc.error(c, f"connection {name}: invalid header name", "header")
    scheme = c.get("scheme", "Bearer" if header.lower() == "authorization" else None)
    return header, str(scheme) if scheme else None


def _delegated_credential(loc: Located, name: str, c: dict, base: Path) -> AnyCredential:
    """`credential: {exchange: {...}}` or `credential: {vault: {...}}` (addons/credentials.py)."""
    kinds = [k for k in ("exchange", "vault", "from") if k in c]
    if len(kinds) > 1:
        raise loc.error(c, f"connection {name}: credential takes one of from / exchange / vault, "
                        f"not {' and '.join(kinds)}", kinds[1])
    kind = kinds[0]
    unknown = set(map(str, c)) - {kind, "header", "scheme"}
    if unknown:
        raise loc.error(c, f"connection {name}: credential: unknown key(s) {', '.join(sorted(unknown))}",
                        sorted(unknown)[0])
    header, scheme = _header_scheme(loc, name, c)

    def resolve(src: str) -> str:
        try:
            return Credential(src, scheme=None).resolve(base)
        except RulesError as e:
            raise ValueError(e.message.removeprefix(f"credential {src}: ")) from None

    if kind == "exchange":
        kw, err = creds.parse_exchange(c["exchange"], resolve)
        if err is None:
            return creds.ExchangeCredential(header=header, scheme=scheme, **kw)
    else:
        kw, err = creds.parse_vault(c["vault"], resolve)
        if err is None:
            return creds.VaultCredential(header=header, scheme=scheme, **kw)
    raise loc.error(c, f"connection {name}: credential: {err}", kind)


def load_connections(rules_dir: str | os.PathLike) -> dict[str, Connection]:
    out: dict[str, Connection] = {}
    for f in rules_files(rules_dir, "connections"):
        if not f.exists():
            continue
        for name, c in parse_connections(f, load_yaml(f)).items():
            if name in out:
                raise RulesError(f, None, f"connection {name} is defined twice")
            out[name] = c
    return out


def validate_dir(rules_dir: str) -> list[str]:
    try:
        load_connections(rules_dir)
        return []
    except RulesError as e:
        return [str(e)]


_BAD_PATH = re.compile(r"(%|\\|//|/\.\.?(/|$)|[\x00-\x20\x7f])")
_PLAIN_QUERY = re.compile(r"^[A-Za-z0-9._~-]+=[A-Za-z0-9._~-]*(&[A-Za-z0-9._~-]+=[A-Za-z0-9._~-]*)*$")
SESSION_QUERY_KEYS = ("session_id", "sessionId")
_PLAIN_VALUE = re.compile(r"^[A-Za-z0-9._~-]+$")


def plain_query(query: str) -> bool:
    """A query the gateway and the upstream cannot read differently: unreserved characters
    only (no percent escapes, no '+'), every key once, at most one session key.
    (`session_id=mine&session_id=victim`: the gateway would check the first, Starlette
    routes on the last.)"""
    if not query:
        return True
    if not _PLAIN_QUERY.match(query):
        return False
    keys = [p.partition("=")[0] for p in query.split("&")]
    return len(keys) == len(set(keys)) and sum(k in SESSION_QUERY_KEYS for k in keys) <= 1


def query_session(path: str) -> str | None:
    """The legacy transport's session query parameter, raw as written (None: none)."""
    for part in path.partition("?")[2].split("&"):
        k, _, v = part.partition("=")
        if k in SESSION_QUERY_KEYS and v:
            return v
    return None


def with_query_session(path: str, value: str) -> str:
    """`path` with its session query parameter set to `value` (a plain_query has one)."""
    base, _, query = path.partition("?")
    parts = [f"{k}={value}" if k in SESSION_QUERY_KEYS else k + eq + v
             for k, eq, v in (p.partition("=") for p in query.split("&"))]
    return f"{base}?{'&'.join(parts)}"


def plain_value(value: str) -> bool:
    """Unreserved characters only: the value reads the same raw and percent-decoded."""
    return _PLAIN_VALUE.match(value) is not None


def split_path(raw_path: str) -> tuple[str | None, str, str] | None:
    """'/mcp/<name>/<rest>?q' -> (name, '/<rest>' or '', query). None if not a gateway path.

    Percent escapes, backslashes, dot segments and empty segments are refused outright
    rather than normalised: MCP endpoints have no use for them, and any normalisation
    would be a second interpretation an attacker could play against the upstream's.
    """
    path, _, query = raw_path.partition("?")
    if not path.startswith(MCP_PREFIX) and path != "/mcp":
        return None
    rest = path[len(MCP_PREFIX):]
    name, slash, sub = rest.partition("/")
    if _BAD_PATH.search(path):
        return (None, "", query)
    return (name, slash + sub, query)


class Router:
    """First in the chain: which connection is this request for?"""

    name = "connections"

    def __init__(self) -> None:
        self.connections: dict[str, Connection] = {}
        self._watcher: ChangeWatcher | None = None
        self._task = None

    def load(self, loader):
        loader.add_option("bastion_rules", str, "rules", "Directory with connections.yaml, policy.yaml, masking.yaml, ...")
        loader.add_option("bastion_max_body", int, 4 * 1024 * 1024, "Largest request body the gateway inspects (bytes); larger -> 413.")
        loader.add_option("bastion_allowed_origins", str, "", "Comma-separated Origin values browsers may use; any other present Origin -> 403.")

    def configure(self, updated):
        if "bastion_rules" in updated:
            rules = Path(ctx.options.bastion_rules)
            if not rules.is_dir():
                raise exceptions.OptionsError(f"bastion_rules: {rules} is not a directory")
            try:
                self.connections = load_connections(rules)
            except RulesError as e:
                raise exceptions.OptionsError(f"connections: {e}") from None
            self._watcher = ChangeWatcher(lambda: rules_files(rules, "connections"))
            log.info("loaded %d connection(s): %s", len(self.connections), ", ".join(self.connections) or "-")
        if "bastion_max_body" in updated and ctx.options.bastion_max_body <= 0:
            raise exceptions.OptionsError("bastion_max_body must be positive")

    def running(self):
        import asyncio
        self._task = asyncio.get_running_loop().create_task(poll_forever(self.check_reload))

    def done(self):
        if self._task:
            self._task.cancel()

    def check_reload(self) -> None:
        if not (self._watcher and self._watcher.changed()):
            return
        try:
            new = load_connections(ctx.options.bastion_rules)
        except RulesError as e:
            log.error("connections reload rejected, keeping the last good set: %s", e)
            return
        for name, c in new.items():  # keep legacy endpoint announcements
            if name in self.connections:
                c.announced = self.connections[name].announced
        self.connections = new
        log.info("connections reloaded: %s", ", ".join(new) or "-")

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # every pass through the chain starts from nothing: a replay in mitmweb sends the
        # same flow object again, and must earn every check (and the credential) anew
        rec = flow.metadata[METADATA_KEY] = BastionRecord()
        req = flow.request
        if req.path.startswith(LOCAL_PREFIXES):
            return  # served by the gateway itself (identity metadata, approval admin API)
        parts = split_path(req.path)
        if parts is None:
            refuse_http(flow, 404, "not_found", "MCP endpoints live under /mcp/<connection>")
            return
        name, sub, query = parts
        if name is None:
            refuse_http(flow, 400, "invalid_path", "path contains escapes, dot segments or empty segments")
            return
        conn = self.connections.get(name)
        if conn is None:
            refuse_http(flow, 404, "unknown_connection", "no connection with that name")
            return
        rec.connection = conn.name
        origin = req.headers.get("origin")
        if origin is not None and not self._origin_ok(origin, flow):
            refuse_http(flow, 403, "forbidden_origin", "Origin is not allowed")
            return
        # Which upstream path? Only the registered endpoint, or (legacy SSE) a path the
        # upstream itself announced in an `endpoint` event.
        if sub in ("", "/"):
            upstream_path = conn.path
            if query:
                refuse_http(flow, 400, "invalid_request", "query strings are not accepted on the MCP endpoint")
                return
        elif conn.transport == "sse" and sub in conn.announced:
            if not plain_query(query):
                refuse_http(flow, 400, "invalid_request", "query must be plain key=value pairs, each key once")
                return
            upstream_path = sub + (f"?{query}" if query else "")
            rec.notes["legacy_messages"] = True  # answers travel on the event stream
        else:
            refuse_http(flow, 404, "not_found", "no such endpoint on this connection")
            return
        if req.method not in ("POST", "GET", "DELETE"):
            refuse_http(flow, 405, "method_not_allowed", "MCP endpoints accept POST, GET and DELETE",
                        {"allow": "POST, GET, DELETE"})
            return
        rec.upstream_path = upstream_path
        cl = req.headers.get("content-length")
        if cl is not None and (not cl.isdigit() or int(cl) > ctx.options.bastion_max_body):
            refuse_http(flow, 413, "body_too_large", f"request body exceeds {ctx.options.bastion_max_body} bytes")
            return

    def _origin_ok(self, origin: str, flow: http.HTTPFlow) -> bool:
        allowed = {o.strip() for o in ctx.options.bastion_allowed_origins.split(",") if o.strip()}
        if origin in allowed:
            return True
        # same origin as the gateway's own listener. Not the Host header: reverse mode has
        # already rewritten it to the upstream's, and a rebinding page controls it anyway.
        sock = flow.client_conn.sockname
        if not sock:
            return False
        host, port = sock[0], sock[1]
        names = {host, "localhost"} if host in ("127.0.0.1", "::1") else {host}
        return origin in {f"{scheme}://{n}:{port}" for n in names for scheme in ("http", "https")}


class Injector:
    """Last in the chain: send the checked request to its upstream and choose its credential
    (the service secret, a token exchanged for the caller, or the caller's vault entry), which
    the Forwarder adds to the wire form only."""

    name = "injector"

    def __init__(self) -> None:
        self.exchanger = creds.TokenExchanger()
        self.upstream = creds.UpstreamCredentials(self.exchanger, self._vault, self._store_refreshed)
        self.vault: Vault | VaultError = VaultError("vault not loaded")
        self._vault_watcher: ChangeWatcher | None = None
        self._task = None

    def load(self, loader):
        loader.add_option("bastion_vault", str, DEFAULT_VAULT,
                          "Credential vault of per-user upstream secrets (connections with `credential: {vault: …}`).")
        loader.add_option("bastion_vault_key", str, DEFAULT_KEY, "Vault key: file:PATH (0600) or env:NAME.")

    def configure(self, updated):
        if {"bastion_vault", "bastion_vault_key"} & updated:
            ref = ctx.options.bastion_vault_key
            if not re.match(r"^(file:.+|env:[A-Za-z_][A-Za-z0-9_]*)$", ref):
                raise exceptions.OptionsError("bastion_vault_key must be file:PATH or env:NAME")
            self._load_vault()
            paths = [Path(ctx.options.bastion_vault)] + ([key_path(ref)] if key_path(ref) else [])
            self._vault_watcher = ChangeWatcher(lambda: paths)

    def _load_vault(self) -> None:
        o = ctx.options
        try:
            key = load_key(o.bastion_vault_key) if Path(o.bastion_vault).exists() else None
            self.vault = Vault.load(o.bastion_vault, key)
            if self.vault.entries:
                log.info("credential vault %s: %d entr%s", o.bastion_vault, len(self.vault.entries),
                         "y" if len(self.vault.entries) == 1 else "ies")
        except VaultError as e:
            # fail closed: vault connections are refused until the vault opens again
            log.error("credential vault unusable, vault connections are refused: %s", e)
            self.vault = e

    def _vault(self) -> Vault:
        if isinstance(self.vault, VaultError):
            raise self.vault
        return self.vault

    async def _store_refreshed(self, connection: str, sub: str, access: str, refresh: str,
                               expires: float | None) -> None:
        """Write a refreshed oauth entry back (the refresh token may have rotated)."""
        import asyncio
        path, ref = ctx.options.bastion_vault, ctx.options.bastion_vault_key

        def write() -> Vault:
            with updating(path, load_key(ref)) as v:
                v.put(connection, sub, access, "oauth", expires, refresh_token=refresh)
            return v
        try:
            self.vault = await asyncio.to_thread(write)
        except (VaultError, OSError, ValueError) as e:
            log.error("refreshed token for sub=%s on %s could not be stored: %s", sub, connection, e)
            raise creds.CredentialRefused("vault", f"refreshed token not stored: {e}", status=503,
                                          error="temporarily_unavailable", retry_after=5,
                                          description="the gateway cannot write its credential vault",
                                          rule="credential:vault-unavailable") from None

    def _check_vault(self) -> None:
        if self._vault_watcher is not None and self._vault_watcher.changed():
            self._load_vault()

    async def done(self):
        if self._task:
            self._task.cancel()
        await self.exchanger.aclose()

    def running(self):
        import asyncio
        self._task = asyncio.get_running_loop().create_task(poll_forever(self._check_vault))
        # the Forwarder must come after mitmweb's own addons, which are loaded after scripts
        if ctx.master.addons.get(Forwarder.name) is None:
            from addons.failclosed import FailClosed
            ctx.master.addons.add(FailClosed(Forwarder()))

    async def request(self, flow: http.HTTPFlow) -> None:
        rec = get_record(flow.metadata)
        held, rec.subject_token = rec.subject_token, None
        subject_token = held.value if held is not None else None
        if flow.response is not None:
            return
        router = ctx.master.addons.get("connections")
        conn = getattr(router, "wrapped", router).connections.get(rec.connection or "") if router else None
        if rec.connection is None:
            refuse_http(flow, 404, "not_found", "no such endpoint")
            return
        if conn is None or rec.upstream_path is None:
            refuse_http(flow, 502, "gateway_error", "request was not routed")
            return
        problem = unchecked_reason(rec, flow.request.method,
                                   identity_required=ctx.master.addons.get("identity") is not None)
        carrier = carrier_ok(rec, flow.request.raw_content)
        if carrier is not None:
            # a refusal on its way to a legacy client: only the exact carrier ping may go
            problem = None if carrier else "refusal carrier was altered"
        if problem:
            log.error("refusing to forward %s: %s", flow.request.path, problem)
            refuse_http(flow, 502, "gateway_error", "the gateway could not check this request")
            return
        ident = rec.identity
        try:
            injected = await self.upstream.for_call(conn.name, conn.credential, conn.secret,
                                                    ident.sub if ident else None, ident.issuer if ident else None,
                                                    subject_token)
        except creds.CredentialRefused as e:
            refuse_credential(flow, rec, e)
            return
        req = flow.request
        if rec.checked is None or checked_snapshot(req) != rec.checked:
            refuse_changed(flow, "after the checks")
            return
        drop = STRIPPED_REQUEST_HEADERS | connection_listed(req.headers)
        if injected:
            drop |= {injected.header.lower().encode()}
        strip_headers(req.headers, drop)
        req.scheme, req.host, req.port = conn.scheme, conn.host, conn.port
        req.path = rec.upstream_path
        req.headers["host"] = conn.host if conn.port in (80, 443) else f"{conn.host}:{conn.port}"
        rec.outgoing = checked_snapshot(req)
        if injected:
            rec.credential = (injected.header, injected.value)
            rec.notes["injected_header"] = injected.header
            rec.credential_kind = injected.kind


def refuse_changed(flow: http.HTTPFlow, when: str) -> None:
    rec = get_record(flow.metadata)
    log.error("refusing to forward %s: the request was changed %s (mitmweb edit, script or replay)",
              flow.request.path, when)
    rec.credential = rec.outgoing = None
    refuse_http(flow, 409, "request_changed",
                "the request was changed after the gateway checked it; send it again", rule="integrity:request-changed")


class WireHeaders(http.Headers):
    """Request headers whose wire form (bytes(), what mitmproxy's HTTP/1 client writes
    upstream) carries one more field than the headers themselves: the service credential.
    Everything that lists, shows, exports or saves headers (mitmweb's flow JSON and
    websocket updates, Flow.get_state, copies, replays) reads `fields` and never sees it.
    An HTTP/2 upstream builds its frames from `fields`: it gets no credential (a 401),
    never a leak."""

    def __init__(self, fields, credential: tuple[bytes, bytes]):
        super().__init__(fields)
        self._credential = credential

    def __bytes__(self) -> bytes:
        name, value = self._credential
        return super().__bytes__() + name + b": " + value + b"\r\n"


class Forwarder:
    """Behind every other addon (mitmweb's Intercept and View included): the last word
    before a request goes upstream.

    - A flow that mitmweb's intercept filter held after the Injector is awaited here and
      refused if it was edited meanwhile (rec.outgoing is what the Injector made).
    - The service credential is added to the request's wire form only (WireHeaders), never
      to the headers a flow shows; once the response starts, plain headers come back.
    """

    name = "bastion_forwarder"

    async def request(self, flow: http.HTTPFlow) -> None:
        rec = get_record(flow.metadata)
        if rec.outgoing is None or flow.response is not None:
            return
        if flow.intercepted:
            await flow.wait_for_resume()
            flow.metadata[METADATA_KEY] = rec      # a Revert in mitmweb restores a copy without it
        if flow.response is not None or flow.error is not None:
            return
        if checked_snapshot(flow.request) != rec.outgoing:
            refuse_changed(flow, "while intercepted in mitmweb")
            return
        if rec.credential is not None:
            name, value = rec.credential
            rec.credential = None
            flow.request.headers = WireHeaders(flow.request.headers.fields, (name.encode(), value.encode()))

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        plain_headers(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        plain_headers(flow)


def plain_headers(flow: http.HTTPFlow) -> None:
    """Sent (or failed): the request keeps its headers without the credential's wire form."""
    if isinstance(flow.request.headers, WireHeaders):
        flow.request.headers = http.Headers(flow.request.headers.fields)


def refuse_credential(flow: http.HTTPFlow, rec, e: creds.CredentialRefused) -> None:
    """No upstream credential for this call: a JSON-RPC error naming where to authorise
    (vault, consent), else an HTTP error (token endpoint down 503, exchange refused 403)."""
    ident = rec.identity
    log.warning("refused %s %s for sub=%s: %s", flow.request.method, flow.request.path.split("?")[0],
                ident.sub if ident else "-", e.reason)
    rec.credential_kind = e.kind
    errors = None if rec.notes.get("legacy_messages") else creds.consent_errors(e, rec.messages, rec.protocol_version)
    if errors:
        refuse_jsonrpc(flow, errors, rec.batch, reason=e.reason, rule=e.rule)
        return
    body = {"error": e.error, "error_description": e.description}
    if e.authorize_url:
        body["authorize_url"] = e.authorize_url
    flow.response = json_response(e.status, body, {"retry-after": str(e.retry_after)} if e.retry_after else None)
    rec.refuse(e.reason, e.rule)


# Never dropped because the client listed them in Connection: framing (without
# Content-Length the upstream would read the body as a second, unchecked request), and
# the headers the gateway itself checked.
KEPT_DESPITE_CONNECTION = frozenset({b"host", b"content-length", b"transfer-encoding", b"content-type",
                                     b"content-encoding", b"accept"})


def connection_listed(headers) -> frozenset[bytes]:
    """Header names the client's Connection header declares hop-by-hop (RFC 9110 7.6.1),
    except framing and MCP headers."""
    names = [t.strip().lower().encode() for v in headers.get_all("connection") for t in v.split(",")]
    return frozenset(n for n in names if n and n not in KEPT_DESPITE_CONNECTION and not n.startswith(b"mcp-"))


def strip_headers(headers, names: frozenset[bytes]) -> None:
    """Drop every field whose lower-cased name is in names, in one pass (Headers.pop per
    name rescans all fields and dominated the Injector's cost)."""
    fields = headers.fields
    kept = tuple(f for f in fields if f[0].lower() not in names)
    if len(kept) != len(fields):
        headers.fields = kept


def unchecked_reason(rec, http_method: str, identity_required: bool = True) -> str | None:
    """Defence in depth: every message must carry a decision that lets it through."""
    if identity_required and rec.identity is None:
        return "caller not verified"
    if http_method != "POST":
        return None if rec.notes.get("stream_checked") else "stream request not checked"
    if not rec.messages:
        return "body not parsed"
    if len(rec.decisions) != len(rec.messages):
        return "not every message has a policy decision"
    for d in rec.decisions:
        if d.action == "allow":
            continue
        if d.action == "approve" and (rec.approval or {}).get("outcome") == "approved":
            continue
        return f"decision {d.action} does not allow forwarding"
    return None


def rewrite_endpoint(conn_name: str, data: str, connections: dict[str, Connection]) -> str:
    """Legacy `endpoint` event: keep the client on the gateway.

    '/messages/?session_id=x' (or an absolute URL on the upstream) becomes
    '/mcp/<conn>/messages/?session_id=x', and the upstream path is remembered as
    the only extra path that connection accepts.
    """
    conn = connections[conn_name]
    u = urllib.parse.urlsplit(data.strip())
    if u.scheme or u.netloc:
        if (u.scheme, u.hostname, u.port or (443 if u.scheme == "https" else 80)) != (conn.scheme, conn.host, conn.port):
            raise ValueError("endpoint event names another origin")
    path = u.path if u.path.startswith("/") else "/" + u.path
    if _BAD_PATH.search(path) or path in ("", "/"):
        raise ValueError("endpoint event path is not acceptable")
    conn.announce(path)
    return f"{MCP_PREFIX}{conn_name}{path}" + (f"?{u.query}" if u.query else "")


def add_cli(sub) -> None:
    p = sub.add_parser("connections", help="list the registered connections (no secrets)")
    p.set_defaults(func=_cli_list)


def _cli_list(args) -> int:
    try:
        conns = load_connections(args.rules)
    except RulesError as e:
        print(e)
        return 1
    for c in conns.values():
        cred = f"{c.credential.source} -> {c.credential.header}" if c.credential else "none"
        print(f"{c.name:16} {c.transport:10} {c.origin}{c.path}  credential: {cred}")
    return 0
