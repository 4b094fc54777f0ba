"""Small helpers to answer a flow from the gateway itself (pure apart from mitmproxy types)."""
from __future__ import annotations

import hashlib
import json
from typing import Any

from mitmproxy import http

from addons.core.mcpwire import jsonrpc_error
from addons.core.record import CheckedRequest, get_record

STATE_UNAVAILABLE = -32039   # JSON-RPC: the shared state engine (bastion_state) is down
JSON_HEADERS = {"content-type": "application/json", "cache-control": "no-store"}


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> http.Response:
    return http.Response.make(status, json.dumps(body, separators=(",", ":")).encode(), {**JSON_HEADERS, **(headers or {})})


def refuse_http(flow: http.HTTPFlow, status: int, error: str, description: str,
                headers: dict[str, str] | None = None, rule: str | None = None) -> None:
    """HTTP-level refusal (not authenticated, unknown connection, bad transport)."""
    flow.response = json_response(status, {"error": error, "error_description": description}, headers)
    get_record(flow.metadata).refuse(f"{status} {error}: {description}", rule)


def refuse_jsonrpc(flow: http.HTTPFlow, errors: list[dict], batch: bool, status: int = 200,
                   reason: str | None = None, rule: str | None = None) -> None:
    """JSON-RPC refusal: one error object, or an array for a batch."""
    body: Any = errors if batch else errors[0]
    flow.response = json_response(status, body)
    first = errors[0]["error"]
    get_record(flow.metadata).refuse(reason or f"{first['code']}: {first['message']}", rule)


def refuse_message(flow: http.HTTPFlow, msg_id: Any, code: int, message: str, status: int = 200,
                   rule: str | None = None) -> None:
    refuse_jsonrpc(flow, [jsonrpc_error(msg_id, code, message)], batch=False, status=status, rule=rule)


_UNHASHED = (b"host", b"content-length")    # set by the Injector / recomputed by mitmproxy


def checked_snapshot(req: http.Request) -> CheckedRequest:
    """What a later stage compares against to know the request is still the one checked."""
    lines = []
    for name, value in req.headers.fields:
        name = name.lower()
        if name not in _UNHASHED:
            lines.append(name + b"\0" + value + b"\n")
    # one digest of the joined lines: the same as one update per line, a third of the cost
    return CheckedRequest(req.method, req.scheme, req.host, req.port, req.path,
                          hashlib.sha256(b"".join(lines)).hexdigest(),
                          hashlib.sha256(req.raw_content or b"").hexdigest())


class HeaderView:
    """A request's header fields read once, indexed by lower-cased name: get/get_all answer
    what mitmproxy's Headers.get/get_all answer for those fields (values decoded the same
    way, several folded with ", "), without Headers' case folding of every field on every
    lookup. A snapshot: a hook that changes the headers reads them again afterwards."""

    __slots__ = ("fields", "_index")

    def __init__(self, headers: http.Headers) -> None:
        self.fields: tuple[tuple[bytes, bytes], ...] = headers.fields
        index: dict[bytes, list[bytes]] = {}
        for name, value in self.fields:
            index.setdefault(name.lower(), []).append(value)
        self._index = index

    def get_all(self, name: bytes) -> list[str]:
        """`name` lower-cased bytes."""
        return [v.decode("utf-8", "surrogateescape") for v in self._index.get(name, ())]

    def get(self, name: bytes, default: str | None = None) -> str | None:
        values = self._index.get(name)
        if not values:
            return default
        return ", ".join(v.decode("utf-8", "surrogateescape") for v in values)

    def __contains__(self, name: bytes) -> bool:
        return name in self._index

    def mcp_fields(self) -> list[tuple[str, str]]:
        """The raw Mcp-* header lines as latin-1 text (names as sent, duplicates kept): all
        that the routing and Mcp-Param-* checks read (a latin-1 name lower-cases to "mcp-…"
        exactly when its bytes do)."""
        return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self.fields if k[:4].lower() == b"mcp-"]


def refuse_unavailable(flow: http.HTTPFlow, rec, what: str) -> None:
    """The clear refusal for a call that needs the shared engine while it is down."""
    msg = f"the shared state engine is unavailable: {what} cannot be checked, so the call is refused"
    errors = [jsonrpc_error(m.id, STATE_UNAVAILABLE, msg, {"retry": True})
              for m in rec.messages if m.kind == "request"]
    refuse_jsonrpc(flow, errors or [jsonrpc_error(None, STATE_UNAVAILABLE, msg)], rec.batch, 200,
                   reason=msg, rule="state:unavailable")
