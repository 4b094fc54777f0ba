"""The `mcp` addon: parse every client->server body into JSON-RPC messages before policy.

Refuses (never forwards) what cannot be parsed, with the JSON-RPC error and the HTTP
status the MCP transport assigns (2026-07-28: an intermediary answers validation
failures with an HTTP error status; the SDK's ERROR_CODE_HTTP_STATUS table).
"""
from __future__ import annotations

import logging
import zlib
from collections import OrderedDict

import brotli
try:
    from compression import zstd  # type: ignore[import-not-found]  # Python 3.14+
except ImportError:
    from backports import zstd  # type: ignore[import-not-found,no-redef]  # mitmproxy's dependency

from mitmproxy import http

from addons import mcp
from addons.httputil import checked_snapshot, refuse_http, refuse_message
from addons.record import get_record
from addons.responses import readonly

log = logging.getLogger("bastion.mcp")

ERROR_STATUS = {
    mcp.PARSE_ERROR: 400, mcp.INVALID_REQUEST: 400, mcp.INVALID_PARAMS: 400,
    mcp.HEADER_MISMATCH: 400, mcp.UNSUPPORTED_PROTOCOL_VERSION: 400, mcp.METHOD_NOT_FOUND: 404,
}
MAX_SCHEMAS = 4096
MAX_PENDING = 10_000


def stream_key(rec, req: http.Request) -> str | None:
    """Which client stream a request belongs to: Mcp-Session-Id, or the legacy
    transport's session_id query parameter."""
    if rec.session_id:
        return rec.session_id
    q = req.path.partition("?")[2]
    for part in q.split("&"):
        k, _, v = part.partition("=")
        if k in ("session_id", "sessionId") and v:
            return v
    return None


class McpParser:
    name = "mcp"

    def __init__(self) -> None:
        # (connection, tool) -> Mcp-Param-* map learned from tools/list results (bounded)
        self.param_maps: OrderedDict[tuple[str, str], dict] = OrderedDict()
        # (connection, stream, id) -> transforms of the request, for responses that arrive
        # on another flow (legacy SSE stream, or a resumed GET stream): the transforms of a
        # request follow its response wherever it travels. Bounded.
        self.pending: OrderedDict[tuple[str, str, str], list] = OrderedDict()
        # (connection, session) -> sub of the identity that opened it (bounded)
        self.owners: OrderedDict[tuple[str, str], str] = OrderedDict()

    def _bind(self, conn: str, session: str, rec) -> None:
        if rec.identity is None or not session:
            return
        self.owners.setdefault((conn, session), rec.identity.sub)
        self.owners.move_to_end((conn, session))
        while len(self.owners) > MAX_PENDING:
            self.owners.popitem(last=False)

    def _follow(self, rec, key: str | None, bind: bool = False) -> None:
        """A GET stream carries the answers to its session's POSTs: give them the
        transforms (masking, list filtering, refusals) of the request they answer."""
        if key is None:
            return
        conn = rec.connection
        if bind:
            self._bind(conn, key, rec)
        rec.notes["pending_lookup"] = lambda msg_id: self.pending.get((conn, key, _idkey(msg_id)))

    def _session_owner_ok(self, rec, key: str) -> bool:
        owner = self.owners.get((rec.connection, key))
        return owner is None or (rec.identity is not None and rec.identity.sub == owner)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Streamable HTTP: the server names the session in the initialize response."""
        rec = get_record(flow.metadata)
        sid = flow.response.headers.get("mcp-session-id") if flow.response else None
        if sid and rec.connection and rec.refusal is None:
            self._bind(rec.connection, sid, rec)

    def request(self, flow: http.HTTPFlow) -> None:
        rec = get_record(flow.metadata)
        if flow.response is not None or rec.connection is None:
            return
        req = flow.request
        if len(req.headers.get_all("mcp-session-id")) > 1:
            # mitmproxy would join them ("a, b": nobody's session), Starlette routes on the first
            refuse_http(flow, 400, "invalid_request", "Mcp-Session-Id header appears more than once")
            return
        rec.session_id = req.headers.get("mcp-session-id")
        key = stream_key(rec, req)
        if key is not None and not self._session_owner_ok(rec, key):
            # a session belongs to the identity that opened it: another caller who learnt
            # the id gets what an unknown session gets (404), and nothing is forwarded
            refuse_http(flow, 404, "unknown_session", "no such session for this caller")
            return
        if req.method != "POST":
            if req.content:
                refuse_http(flow, 400, "invalid_request", f"{req.method} requests carry no body")
                return
            rec.notes["stream_checked"] = True
            rec.checked = checked_snapshot(req)
            if req.method == "GET":
                self._follow(rec, key)
                # legacy HTTP+SSE: the session is named later, in the stream's endpoint event
                rec.notes["bind_session"] = lambda sid, rec=rec: self._follow(rec, sid, bind=True)
            return
        ctype = req.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            refuse_http(flow, 415, "unsupported_media_type", "MCP messages are POSTed as application/json")
            return
        enc = req.headers.get("content-encoding", "")
        try:
            body = decode_bounded(req.raw_content or b"", enc, _max_body())
        except BodyTooLarge:
            body = None
        except ValueError:
            refuse_message(flow, None, mcp.PARSE_ERROR, "request body has a Content-Encoding the gateway cannot decode",
                           status=400)
            return
        if body is None or len(body) > _max_body():
            refuse_http(flow, 413, "body_too_large", f"request body exceeds {_max_body()} bytes")
            return
        try:
            parsed = mcp.parse_body(body)
            err = mcp.check_routing_headers(_fields(req), parsed)
            if err is None and not parsed.batch and parsed.messages[0].method == "tools/call":
                msg = parsed.messages[0]
                err = mcp.check_param_headers(_fields(req), msg,
                                              self.param_maps.get((rec.connection, msg.tool_name or "")))
            if err is not None:
                raise err
        except mcp.McpParseError as e:
            log.info("refused %s: %s", req.path, e.message)
            refuse_message(flow, e.msg_id, e.code, e.message, status=ERROR_STATUS.get(e.code, 400))
            return
        rec.messages = parsed.messages
        rec.batch = parsed.batch
        rec.protocol_version = req.headers.get("mcp-protocol-version") or next(
            (m.protocol_version for m in parsed.messages if m.protocol_version), None)
        if "content-encoding" in req.headers:
            del req.headers["content-encoding"]
            req.content = body  # upstream gets exactly the bytes that were inspected
        if req.headers.get("content-type") != "application/json":
            req.headers["content-type"] = "application/json"  # what was inspected: UTF-8 JSON
        rec.checked = checked_snapshot(req)     # what policy and approval decide on
        if key is not None:
            for m in parsed.messages:
                if m.kind == "request":
                    self.pending[(rec.connection, key, _idkey(m.id))] = rec.response_transforms
            while len(self.pending) > MAX_PENDING:
                self.pending.popitem(last=False)
        if any(m.method == "tools/list" for m in parsed.messages):
            conn = rec.connection
            rec.response_transforms.append(readonly(lambda m: self._learn(conn, m)))

    def _learn(self, conn: str, message: dict) -> dict:
        tools = (message.get("result") or {}).get("tools") if isinstance(message.get("result"), dict) else None
        if isinstance(tools, list):
            for t in tools:
                if isinstance(t, dict) and isinstance(t.get("name"), str):
                    key = (conn, t["name"])
                    self.param_maps[key] = mcp.param_header_map(t.get("inputSchema"))
                    self.param_maps.move_to_end(key)
            while len(self.param_maps) > MAX_SCHEMAS:
                self.param_maps.popitem(last=False)
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


def _idkey(msg_id) -> str:
    return f"{type(msg_id).__name__}:{msg_id}"


def _fields(req: http.Request) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in req.headers.fields]


def _max_body() -> int:
    from mitmproxy import ctx
    return ctx.options.bastion_max_body
