"""Connections model: the upstreams registered in rules/connections*.yaml, their credentials,
and the gateway path grammar (/mcp/<name>/…). No mitmproxy import; the Router, Injector and
Forwarder hooks (addons/hooks/connections.py) use it."""
from __future__ import annotations

import os
import re
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from addons.core.identity import credentials as creds
from addons.core.rules import Located, RulesError, load_yaml, rules_files
from addons.core.integrity import IntegrityConfig, parse_integrity

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
        loc.check_keys(spec, _ALLOWED_KEYS, context=f"connection {name}: ")
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
    """`credential: {exchange: {...}}` or `credential: {vault: {...}}` (addons/core/identity/credentials.py)."""
    kinds = [k for k in ("exchange", "vault", "from") if k in c]
    if len(kinds) > 1:
        raise loc.error(c, f"connection {name}: credential takes one of from / exchange / vault, "
                        f"not {' and '.join(kinds)}", kinds[1])
    kind = kinds[0]
    loc.check_keys(c, {kind, "header", "scheme"}, context=f"connection {name}: credential: ")
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


class ConnectionRegistry:
    """The current set of connections, shared by every stage that needs it (built once by
    addons/bastion.py; the Router replaces the set on a good reload, the others read it)."""

    def __init__(self, connections: dict[str, Connection] | None = None) -> None:
        self.connections: dict[str, Connection] = connections or {}

    def get(self, name: str | None) -> Connection | None:
        return self.connections.get(name) if name is not None else None
