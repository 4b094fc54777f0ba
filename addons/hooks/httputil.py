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
    h = hashlib.sha256()
    for name, value in req.headers.fields:
        if name.lower() not in _UNHASHED:
            h.update(name.lower() + b"\0" + value + b"\n")
    return CheckedRequest(req.method, req.scheme, req.host, req.port, req.path, h.hexdigest(),
                          hashlib.sha256(req.raw_content or b"").hexdigest())


def refuse_unavailable(flow: http.HTTPFlow, rec, what: str) -> None:
    """The clear refusal for a call that needs the shared engine while it is down."""
    msg = f"the shared state engine is unavailable: {what} cannot be checked, so the call is refused"
    errors = [jsonrpc_error(m.id, STATE_UNAVAILABLE, msg, {"retry": True})
              for m in rec.messages if m.kind == "request"]
    refuse_jsonrpc(flow, errors or [jsonrpc_error(None, STATE_UNAVAILABLE, msg)], rec.batch, 200,
                   reason=msg, rule="state:unavailable")
