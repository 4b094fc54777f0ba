"""The `mcp` addon: parse every client->server body into JSON-RPC messages before policy.

Refuses (never forwards) what cannot be parsed, with the JSON-RPC error and the HTTP
status the MCP transport assigns (2026-07-28: an intermediary answers validation
failures with an HTTP error status; the SDK's ERROR_CODE_HTTP_STATUS table).
"""
from __future__ import annotations

import zlib
from collections import OrderedDict
from pathlib import Path

import brotli
try:
    from compression import zstd  # type: ignore[import-not-found]  # Python 3.14+
except ImportError:
    from backports import zstd  # type: ignore[import-not-found,no-redef]  # mitmproxy's dependency

from mitmproxy import http

from addons.core.mcpwire import id_key
from addons.core import mcpwire
from addons.core.connections import query_session, with_query_session
from addons.hooks.httputil import HeaderView, checked_snapshot, refuse_http, refuse_message
from addons.core.listcache import LearnedLists
from addons.core.record import ResultSource, get_record
from addons.hooks.responses import readonly
from addons.core.rules import RulesWatch
from addons.hooks.reloading import Watching
from addons.core.sessionseal import KEY_FILE, KeyringError, SealError, Sealer
from addons.core.sessions import UNKNOWN, SessionRefused, SessionTable
from addons.core.textsafe import get_logger

log = get_logger("bastion.mcp")

ERROR_STATUS = {
    mcpwire.PARSE_ERROR: 400, mcpwire.INVALID_REQUEST: 400, mcpwire.INVALID_PARAMS: 400,
    mcpwire.HEADER_MISMATCH: 400, mcpwire.UNSUPPORTED_PROTOCOL_VERSION: 400, mcpwire.METHOD_NOT_FOUND: 404,
}
MAX_SCHEMAS = 4096
MAX_PENDING = 10_000


def stream_key(rec, req: http.Request) -> str | None:
    """Which client stream a request belongs to: Mcp-Session-Id, or the legacy
    transport's session_id query parameter."""
    if rec.session_id:
        return rec.session_id
    return query_session(req.path)


class McpParser(Watching):
    name = "mcp"

    def __init__(self) -> None:
        # (connection, tool) -> Mcp-Param-* map learned from tools/list results (bounded)
        self.param_maps: OrderedDict[tuple[str, str], dict] = OrderedDict()
        self._learned = LearnedLists()           # the tools/list result they came from, per connection
        # (connection, stream, id) -> transforms of the request, for responses that arrive
        # on another flow (legacy SSE stream, or a resumed GET stream): the transforms of a
        # request follow its response wherever it travels. Bounded.
        self.pending: OrderedDict[tuple[str, str, str], list] = OrderedDict()
        self.sessions = SessionTable()
        self.sealer: Sealer | None = None        # the sealed session ids (addons/core/sessionseal.py)
        self._keys_watch = RulesWatch(self._reload_keys)
        self.watches = (self._keys_watch,)
        # bastion_max_body (the Router declares it), read in configure: an option read
        # through ctx.options deep-copies the value on every call
        self.max_body = 4 * 1024 * 1024

    # (name, type, default, help): sessions, sealed ids and the per-replica bounds
    OPTIONS = (
        ("bastion_session_keys", str, "",
         "Keyring that seals the session ids clients see (AES-256-GCM; '<kid> <key>' per line, the last "
         "seals, all open). Default: session-keys in bastion_key_dir, created 0600; replicas that share it "
         "serve each other's sessions."),
        ("bastion_session_ttl", int, 86400,
         "Seconds a session id stays valid (sealed in it); then 404 and the client starts a new session."),
        ("bastion_session_limit", int, 100,
         "Open MCP sessions one identity may hold (opened through this replica); one more -> 429."),
        ("bastion_session_max", int, 10_000,
         "Open MCP sessions this replica counts in all; one more -> 503. Never evicted."),
        ("bastion_session_idle", int, 3600,
         "Seconds without a request or an open stream through this replica after which a session stops "
         "counting towards its limits here."),
    )

    def load(self, loader) -> None:
        for name, typ, default, help in self.OPTIONS:
            loader.add_option(name, typ, default, help)

    def configure(self, updated: set[str]) -> None:
        from mitmproxy import ctx, exceptions
        o = ctx.options
        if "bastion_max_body" in updated:
            self.max_body = o.bastion_max_body
        if updated & {"bastion_session_limit", "bastion_session_max", "bastion_session_idle"}:
            if o.bastion_session_limit < 1 or o.bastion_session_max < 1 or o.bastion_session_idle <= 0:
                raise exceptions.OptionsError("bastion_session_limit/_max must be >= 1 and bastion_session_idle > 0")
            t = self.sessions
            t.per_identity, t.total, t.idle = o.bastion_session_limit, o.bastion_session_max, o.bastion_session_idle
        if updated & {"bastion_session_keys", "bastion_key_dir", "bastion_session_ttl"}:
            if o.bastion_session_ttl <= 0:
                raise exceptions.OptionsError("bastion_session_ttl must be > 0")
            key_dir = o.bastion_key_dir if "bastion_key_dir" in o else ".secrets"
            try:
                self.sealer = Sealer(o.bastion_session_keys or Path(key_dir) / KEY_FILE, o.bastion_session_ttl)
                sealer = self.sealer
                self._keys_watch.watch(lambda: [sealer.path])
            except (OSError, KeyringError) as e:
                raise exceptions.OptionsError(f"bastion_session_keys: {e}") from None

    def _reload_keys(self) -> None:
        if self.sealer is not None:
            self.sealer.reload()

    def _open(self, rec, envelope: str) -> str:
        """The upstream session id sealed in `envelope`, for this caller and connection;
        SessionRefused 404 (unknown session) otherwise."""
        if self.sealer is None or rec.identity is None or rec.connection is None:
            raise UNKNOWN
        try:
            return self.sealer.open(envelope, rec.identity.issuer, rec.identity.sub, rec.connection)
        except SealError as e:
            log.info("session id refused on %s for sub=%s: %s", rec.connection, rec.identity.sub, e)
            raise UNKNOWN from None

    def _seal(self, rec, upstream_id: str) -> str:
        if self.sealer is None or rec.identity is None or rec.connection is None:
            raise SealError("no session keyring loaded, or no verified caller")
        return self.sealer.seal(upstream_id, rec.identity.issuer, rec.identity.sub, rec.connection)

    def _unseal(self, flow: http.HTTPFlow, rec) -> None:
        """The client's session id is an envelope: open it and put the upstream's id in
        its place (header, or the legacy query parameter) before anything else reads it."""
        req = flow.request
        if rec.session_id is not None:
            rec.session_envelope = rec.session_id
            rec.session_id = self._open(rec, rec.session_id)
            req.headers["mcp-session-id"] = rec.session_id
            return
        envelope = query_session(req.path)
        if envelope is not None:
            rec.session_envelope = envelope
            upstream = self._open(rec, envelope)
            req.path = with_query_session(req.path, upstream)
            if rec.upstream_path is not None:
                rec.upstream_path = with_query_session(rec.upstream_path, upstream)

    def _follow(self, rec, key: str | None) -> None:
        """A GET stream carries the answers to its session's POSTs: give them the
        transforms (masking, list filtering, refusals) of the request they answer."""
        if key is None:
            return
        conn = rec.connection
        rec.pending_lookup = lambda msg_id: self.pending.get((conn, key, id_key(msg_id)))

    def _bind_legacy(self, flow: http.HTTPFlow, rec, sid: str) -> str | None:
        """Legacy HTTP+SSE: the stream's endpoint event names the session the stream is.
        Returns the envelope the client gets in its place; None: the session is not the
        caller's to have (the stream is refused)."""
        key = (rec.connection, sid)
        if rec.identity is None or not self.sessions.bind(flow.id, key, rec.identity.sub):
            return None
        rec.session_key, rec.session_stream = key, True
        self.sessions.stream(key, +1)
        self._follow(rec, sid)
        try:
            return self._seal(rec, sid)
        except SealError as e:
            log.warning("legacy endpoint of %s names a session the gateway cannot seal: %s", rec.connection, e)
            return None

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Streamable HTTP: the server names the session in the initialize response; the
        client gets it sealed (the raw upstream id never reaches the client)."""
        rec = get_record(flow.metadata)
        resp = flow.response
        if resp is None or not rec.connection:
            return
        sid = resp.headers.get("mcp-session-id")
        if sid is not None:
            self._seal_response(flow, rec, sid)
        if rec.refusal is not None:
            return
        if rec.session_key is not None and flow.request.method == "GET" and resp.status_code == 200:
            rec.session_stream = True
            self.sessions.stream(rec.session_key, +1)

    def _seal_response(self, flow: http.HTTPFlow, rec, sid: str) -> None:
        resp = flow.response
        if len(resp.headers.get_all("mcp-session-id")) == 1 and rec.identity is not None:
            if rec.session_envelope is not None and sid == rec.session_id:
                resp.headers["mcp-session-id"] = rec.session_envelope    # the server echoes the session
                return
            try:
                sealed = self._seal(rec, sid)
            except SealError as e:
                log.warning("upstream %s named a session the gateway cannot seal (%s); not passed on", rec.connection, e)
                del resp.headers["mcp-session-id"]
                return
            if self.sessions.bind(flow.id, (rec.connection, sid), rec.identity.sub):
                rec.session_key = (rec.connection, sid)
                resp.headers["mcp-session-id"] = sealed
                return
        # not a session this caller opened here (no initialize, another caller's id, no identity)
        log.warning("upstream %s named a session outside this caller's initialize; not passed on", rec.connection)
        del resp.headers["mcp-session-id"]

    def response(self, flow: http.HTTPFlow) -> None:
        self._done(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._done(flow)

    def _done(self, flow: http.HTTPFlow) -> None:
        """The flow ended: free its reservation and stream; a closed session loses its binding."""
        rec = get_record(flow.metadata)
        self.sessions.release(flow.id)
        key = rec.session_key
        if key is None:
            return
        if rec.session_stream:
            rec.session_stream = False
            self.sessions.stream(key, -1)
            if flow.request.method == "GET" and stream_key(rec, flow.request) is None:
                self.sessions.forget(key)       # legacy transport: the session ends with its stream
        status = flow.response.status_code if flow.response is not None and rec.refusal is None else None
        if status == 404 or (flow.request.method == "DELETE" and status is not None and 200 <= status < 300):
            self.sessions.forget(key)           # closed by the client, or unknown upstream

    def request(self, flow: http.HTTPFlow) -> None:
        rec = get_record(flow.metadata)
        if flow.response is not None or rec.connection is None:
            return
        req = flow.request
        # the headers read once: _unseal below rewrites only mcp-session-id, which is not read again
        headers = HeaderView(req.headers)
        if len(headers.get_all(b"mcp-session-id")) > 1:
            # mitmproxy would join them ("a, b": nobody's session), Starlette routes on the first
            refuse_http(flow, 400, "invalid_request", "Mcp-Session-Id header appears more than once")
            return
        rec.session_id = headers.get(b"mcp-session-id")
        try:
            # a session belongs to the identity that opened it, on the connection it was
            # opened on, until its envelope expires: anything else gets 404, nothing forwarded
            self._unseal(flow, rec)
            key = stream_key(rec, req)
            if key is not None:
                rec.session_key = (rec.connection, key)
                self.sessions.touch(rec.session_key)
            elif req.method == "GET":
                self._admit(flow, rec)
        except SessionRefused as e:
            refuse_http(flow, e.status, e.error, e.message)
            return
        if req.method != "POST":
            if req.content:
                refuse_http(flow, 400, "invalid_request", f"{req.method} requests carry no body")
                return
            rec.stream_checked = True
            rec.checked = checked_snapshot(req)
            if req.method == "GET":
                self._follow(rec, key)
                # legacy HTTP+SSE: the session is named later, in the stream's endpoint event
                rec.bind_session = lambda sid, flow=flow, rec=rec: self._bind_legacy(flow, rec, sid)
            return
        ctype = headers.get(b"content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            refuse_http(flow, 415, "unsupported_media_type", "MCP messages are POSTed as application/json")
            return
        enc = headers.get(b"content-encoding", "")
        max_body = self.max_body
        try:
            body = decode_bounded(req.raw_content or b"", enc, max_body)
        except BodyTooLarge:
            body = None
        except ValueError:
            refuse_message(flow, None, mcpwire.PARSE_ERROR, "request body has a Content-Encoding the gateway cannot decode",
                           status=400)
            return
        if body is None or len(body) > max_body:
            refuse_http(flow, 413, "body_too_large", f"request body exceeds {max_body} bytes")
            return
        try:
            parsed = mcpwire.parse_body(body)
            fields = headers.mcp_fields()
            err = mcpwire.check_routing_headers(fields, parsed)
            if err is None and not parsed.batch and parsed.messages[0].method == "tools/call":
                msg = parsed.messages[0]
                err = mcpwire.check_param_headers(fields, msg,
                                              self.param_maps.get((rec.connection, msg.tool_name or "")))
            if err is not None:
                raise err
        except mcpwire.McpParseError as e:
            log.info("refused %s: %s", req.path, e.message)
            refuse_message(flow, e.msg_id, e.code, e.message, status=ERROR_STATUS.get(e.code, 400))
            return
        if key is None and any(m.method == "initialize" for m in parsed.messages):
            try:
                self._admit(flow, rec)
            except SessionRefused as e:
                refuse_http(flow, e.status, e.error, e.message)
                return
        rec.messages = parsed.messages
        rec.batch = parsed.batch
        rec.protocol_version = headers.get(b"mcp-protocol-version") or next(
            (m.protocol_version for m in parsed.messages if m.protocol_version), None)
        if b"content-encoding" in headers:
            del req.headers["content-encoding"]
            req.content = body  # upstream gets exactly the bytes that were inspected
        if headers.get(b"content-type") != "application/json":
            req.headers["content-type"] = "application/json"  # what was inspected: UTF-8 JSON
        rec.checked = checked_snapshot(req)     # what policy and approval decide on
        if key is not None:
            for m in parsed.messages:
                if m.kind == "request":
                    self.pending[(rec.connection, key, id_key(m.id))] = rec.response_transforms
            while len(self.pending) > MAX_PENDING:
                self.pending.popitem(last=False)
        if any(m.method == "tools/list" for m in parsed.messages):
            conn = rec.connection
            rec.response_transforms.append(readonly(lambda m, r=rec: self._learn(conn, m, r.response_source)))

    def _admit(self, flow: http.HTTPFlow, rec) -> None:
        """Room for the session this request may open (initialize, legacy SSE stream)."""
        if rec.identity is not None:
            self.sessions.admit(flow.id, rec.identity.sub)

    def _learn(self, conn: str, message: dict, source: ResultSource | None = None) -> dict:
        tools = (message.get("result") or {}).get("tools") if isinstance(message.get("result"), dict) else None
        if isinstance(tools, list):
            digest = source.digest() if source is not None else None
            if self._learned.seen(conn, digest):
                return message            # the list these maps were learned from, again
            for t in tools:
                if isinstance(t, dict) and isinstance(t.get("name"), str):
                    key = (conn, t["name"])
                    self.param_maps[key] = mcpwire.param_header_map(t.get("inputSchema"))
                    self.param_maps.move_to_end(key)
            if len(self.param_maps) > MAX_SCHEMAS:
                self._learned.forget()    # maps of some listed tools are about to go
            while len(self.param_maps) > MAX_SCHEMAS:
                self.param_maps.popitem(last=False)
            self._learned.learned(conn, digest)
        return message


class BodyTooLarge(Exception):
    pass


def decode_bounded(raw: bytes, enc: str, limit: int) -> bytes:
    """Decode a request body, never producing more than `limit` bytes (a 4 MiB gzip body
    can inflate to 4 GiB; mitmproxy's own decode has no bound). Raises BodyTooLarge, or
    ValueError for an unknown, corrupt, truncated or multi-member encoding."""
    enc = enc.strip().lower()
    if enc in ("", "identity"):
        return raw
    out: bytes
    try:
        if enc in ("gzip", "deflate"):
            for wbits in ((16 + zlib.MAX_WBITS,) if enc == "gzip" else (zlib.MAX_WBITS, -zlib.MAX_WBITS)):
                d = zlib.decompressobj(wbits)
                try:
                    out = d.decompress(raw, limit + 1)
                    break
                except zlib.error:
                    if wbits == -zlib.MAX_WBITS or enc == "gzip":
                        raise
            complete = d.eof and not d.unused_data
        elif enc == "br":
            b = brotli.Decompressor()
            out = b.process(raw, output_buffer_limit=limit + 1)
            complete = b.is_finished()
        elif enc == "zstd":
            z = zstd.ZstdDecompressor()
            out = z.decompress(raw, max_length=limit + 1)
            complete = z.eof and not z.unused_data
        else:
            raise ValueError(f"unsupported content-encoding {enc!r}")
    except (zlib.error, brotli.error, zstd.ZstdError, EOFError) as e:
        raise ValueError(str(e)) from None
    if len(out) > limit:
        raise BodyTooLarge()
    if not complete:
        raise ValueError("truncated or trailing compressed data")
    return out
