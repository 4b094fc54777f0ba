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

import re
from pathlib import Path

from mitmproxy import ctx, exceptions, http
from mitmproxy.net.http import url

from addons.core.identity import credentials as creds
from addons.hooks.reloading import Watching
from addons.hooks.httputil import HeaderView, checked_snapshot, json_response, refuse_http, refuse_jsonrpc
from addons.core.record import METADATA_KEY, BastionRecord, get_record
from addons.core.rules import RulesWatch, RulesError, rules_files
from addons.core.identity.vault import DEFAULT_KEY, DEFAULT_VAULT, Vault, VaultError, key_path, load_key, updating
from addons.core.textsafe import get_logger
from addons.core.connections import (LOCAL_PREFIXES, STRIPPED_REQUEST_HEADERS, Connection, ConnectionRegistry,
                                     load_connections, plain_query, split_path)

log = get_logger("bastion.connections")

class Router(Watching):
    """First in the chain: which connection is this request for?"""

    name = "connections"

    def __init__(self, registry: ConnectionRegistry | None = None) -> None:
        self.registry = registry or ConnectionRegistry()
        self._watch = RulesWatch(self._reload)
        self.watches = (self._watch,)
        self.allowed_origins: frozenset[str] = frozenset()
        self.max_body = 4 * 1024 * 1024         # bastion_max_body, read in configure (not per call)

    @property
    def connections(self) -> dict[str, Connection]:
        return self.registry.connections

    @connections.setter
    def connections(self, value: dict[str, Connection]) -> None:
        self.registry.connections = value

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
            self._watch.watch(lambda: rules_files(rules, "connections"))
            log.info("loaded %d connection(s): %s", len(self.connections), ", ".join(self.connections) or "-")
        if "bastion_max_body" in updated:
            if ctx.options.bastion_max_body <= 0:
                raise exceptions.OptionsError("bastion_max_body must be positive")
            self.max_body = ctx.options.bastion_max_body
        if "bastion_allowed_origins" in updated:
            self.allowed_origins = frozenset(o.strip() for o in ctx.options.bastion_allowed_origins.split(",")
                                             if o.strip())

    def _reload(self) -> None:
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
        headers = HeaderView(req.headers)
        origin = headers.get(b"origin")
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
            rec.legacy_stream = True  # answers travel on the event stream
        else:
            refuse_http(flow, 404, "not_found", "no such endpoint on this connection")
            return
        if req.method not in ("POST", "GET", "DELETE"):
            refuse_http(flow, 405, "method_not_allowed", "MCP endpoints accept POST, GET and DELETE",
                        {"allow": "POST, GET, DELETE"})
            return
        rec.upstream_path = upstream_path
        cl = headers.get(b"content-length")
        if cl is not None and (not cl.isdigit() or int(cl) > self.max_body):
            refuse_http(flow, 413, "body_too_large", f"request body exceeds {self.max_body} bytes")
            return

    def _origin_ok(self, origin: str, flow: http.HTTPFlow) -> bool:
        if origin in self.allowed_origins:
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

    def __init__(self, connections: ConnectionRegistry | None = None, identity_required: bool = True) -> None:
        # identity_required: False only for a pipeline built without the identity stage (tests)
        self.registry = connections or ConnectionRegistry()
        self.identity_required = identity_required
        self.exchanger = creds.TokenExchanger()
        self.upstream = creds.UpstreamCredentials(self.exchanger, self._vault, self._store_refreshed)
        self.vault: Vault | VaultError = VaultError("vault not loaded")
        self._vault_watch = RulesWatch(self._load_vault)

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
            self._vault_watch.watch(lambda: paths)

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
        self._vault_watch.check()

    async def done(self):
        self._vault_watch.stop()
        await self.exchanger.aclose()

    def running(self):
        self._vault_watch.start()
        # the Forwarder must come after mitmweb's own addons, which are loaded after scripts,
        # so the Injector registers it with the master now (once: a script reload keeps it)
        if ctx.master.addons.get(Forwarder.name) is None:
            from addons.hooks.failclosed import FailClosed
            ctx.master.addons.add(FailClosed(Forwarder()))

    async def request(self, flow: http.HTTPFlow) -> None:
        rec = get_record(flow.metadata)
        held, rec.subject_token = rec.subject_token, None
        subject_token = held.value if held is not None else None
        if flow.response is not None:
            return
        conn = self.registry.get(rec.connection)
        if rec.connection is None:
            refuse_http(flow, 404, "not_found", "no such endpoint")
            return
        if conn is None or rec.upstream_path is None:
            refuse_http(flow, 502, "gateway_error", "request was not routed")
            return
        problem = unchecked_reason(rec, flow.request.method,
                                   identity_required=self.identity_required)
        if rec.refusal_carrier is not None:
            # a refusal on its way to a legacy client: only the exact carrier ping may go
            problem = None if flow.request.raw_content == rec.refusal_carrier else "refusal carrier was altered"
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
        point_at(req, conn, drop)
        req.path = rec.upstream_path
        rec.outgoing = checked_snapshot(req)
        if injected:
            rec.credential = (injected.header, injected.value)
            rec.injected_header = injected.header
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
    errors = None if rec.legacy_stream else creds.consent_errors(e, rec.messages, rec.protocol_version)
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
    # the fields scanned directly: what Headers.get_all("connection") gives, without its
    # per-call key conversions (most requests carry no Connection header at all)
    values = [v.decode("utf-8", "surrogateescape") for k, v in headers.fields if k.lower() == b"connection"]
    if not values:
        return frozenset()
    names = [t.strip().lower().encode() for v in values for t in v.split(",")]
    return frozenset(n for n in names if n and n not in KEPT_DESPITE_CONNECTION and not n.startswith(b"mcp-"))


def point_at(req: http.Request, conn: Connection, drop: frozenset[bytes]) -> None:
    """Aim the request at the connection's upstream: every field named in `drop` removed
    and the Host field set, in one pass over the fields (Headers.pop per name, the host and
    port setters' Host lookups and a Host write each rescan all fields). The result is what
    mitmproxy's setters give: Host keeps its place and spelling (further Host fields go),
    or is appended when there was none; an HTTP/2 authority becomes host[:port]."""
    host = (conn.host if conn.port in (80, 443) else f"{conn.host}:{conn.port}").encode("utf-8", "surrogateescape")
    fields, has_host = [], False
    for name, value in req.headers.fields:
        lower = name.lower()
        if lower in drop:
            continue
        if lower == b"host":
            if not has_host:
                fields.append((name, host))
                has_host = True
            continue
        fields.append((name, value))
    if not has_host:
        fields.append((b"host", host))
    req.headers.fields = tuple(fields)
    req.scheme = conn.scheme
    req.data.host, req.data.port = conn.host, conn.port
    if req.data.authority:
        req.authority = url.hostport(conn.scheme, conn.host, conn.port)


def unchecked_reason(rec, http_method: str, identity_required: bool = True) -> str | None:
    """Defence in depth: every message must carry a decision that lets it through."""
    if identity_required and rec.identity is None:
        return "caller not verified"
    if http_method != "POST":
        return None if rec.stream_checked else "stream request not checked"
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
