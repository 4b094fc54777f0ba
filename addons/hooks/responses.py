"""The `responses` addon: apply the record's response transforms (tools/list filtering,
masking, ...) to every JSON-RPC message the upstream sends back.

- application/json bodies: parsed whole, transformed, re-serialised only if changed.
- text/event-stream: streamed (never buffered, mitmproxy #4469), parsed event by event
  with an incremental parser that survives any chunk boundary; unchanged events are
  forwarded byte for byte.
- legacy HTTP+SSE `endpoint` events are rewritten to stay on the gateway.
Fail closed: a message that cannot be parsed while masking is required, or a transform
that raises, is replaced by a JSON-RPC error and the stream ends.
"""
from __future__ import annotations

import json
from typing import Any, Callable

from mitmproxy import http

from addons.core import mcpwire
from addons.core.connections import (ConnectionRegistry, plain_value, query_session, rewrite_endpoint,
                                     with_query_session)
from addons.hooks.httputil import json_response
from addons.core.record import BastionRecord, ResultSource, get_record
from addons.core.textsafe import get_logger

log = get_logger("bastion.responses")

MAX_RECORDED_MESSAGES = 10_000


class TransformError(Exception):
    pass


def readonly(fn: Callable[[dict], dict]) -> Callable[[dict], dict]:
    """Mark a transform that never changes the message (so no re-serialisation)."""
    fn.readonly = True  # type: ignore[attr-defined]
    return fn


def _transforms_for(rec: BastionRecord, obj: dict) -> list:
    """On a GET stream, a response also gets the transforms of the request it answers.
    A response to a request this gateway did not check (posted through another replica,
    or forgotten) cannot get them: it becomes an error, never passes with fewer checks."""
    lookup = rec.pending_lookup
    if lookup is not None and "id" in obj and ("result" in obj or "error" in obj):
        origin = lookup(obj["id"])
        if origin is None:
            return [_unchecked_answer]
        if origin:
            return [*origin, *rec.response_transforms]
    return rec.response_transforms


def _unchecked_answer(message: dict) -> dict:
    log.warning("answer on an event stream to a request this gateway did not check: replaced by an error")
    return mcpwire.jsonrpc_error(message.get("id"), mcpwire.INTERNAL_ERROR,
                                 "the gateway holding this event stream did not check the request it answers "
                                 "(legacy HTTP+SSE behind a non-sticky balancer?)")


def transform_message(rec: BastionRecord, obj: Any, source: ResultSource | None = None) -> tuple[Any, bool]:
    """Run every registered transform over one decoded JSON-RPC message.

    Transforms may mutate in place, so any non-readonly transform counts as a change
    and the message is re-serialised: correctness over a saved json.dumps.
    `source`: the text of `obj`'s result; transforms see it as rec.response_source until
    one of them changes the message (then it no longer describes what they get).
    """
    if not isinstance(obj, dict):
        if rec.mask_required:
            raise TransformError("response is not a JSON-RPC message")
        return obj, False
    changed = False
    rec.response_source = source
    try:
        for t in _transforms_for(rec, obj):
            obj = t(obj)
            if not getattr(t, "readonly", False):
                changed, rec.response_source = True, None
    finally:
        rec.response_source = None
    return obj, changed


def _remember(rec: BastionRecord, obj: Any) -> None:
    if len(rec.response_messages) < MAX_RECORDED_MESSAGES:
        rec.response_messages.append(obj)
    else:
        rec.response_messages_dropped += 1


def transform_json_body(rec: BastionRecord, body: bytes) -> bytes | None:
    """New body, or None when nothing changed. Raises TransformError / McpParseError."""
    obj = mcpwire.strict_loads(body)
    items = obj if isinstance(obj, list) else [obj]
    out, any_changed = [], False
    for item in items:
        new, changed = transform_message(rec, item, ResultSource.of(body, item))
        any_changed |= changed
        out.append(new)
        _remember(rec, new)
    if not any_changed:
        return None
    return mcpwire.dumps(out if isinstance(obj, list) else out[0])


class SSERewriter:
    """flow.response.stream callable: bytes in, a list of chunks out.

    mitmproxy sends every returned chunk as it is, and on a chunked response an empty
    chunk is the end of the body: so nothing to emit is an empty list, never b"" (an
    event arriving in several reads would otherwise end the client's response early).
    """

    def __init__(self, rec: BastionRecord, endpoint_rewriter: Callable[[str], str] | None, error_id: Any):
        self.rec = rec
        self.parser = mcpwire.SSEParser()
        self.rewrite_endpoint = endpoint_rewriter
        self.error_id = error_id
        self.closed = False
        self.events = 0
        # a masked stream passes only what was checked: comments, unknown fields and ids
        # the masking rules would change are dropped
        self.strict = rec.mask_required

    def __call__(self, data: bytes) -> list[bytes]:
        if self.closed:
            return []
        try:
            events = self.parser.feed(data, final=not data)
            return [out for out in map(self._event, events) if out]
        except Exception as e:  # noqa: BLE001 - fail closed on anything
            log.warning("SSE response refused mid-stream: %s", e)
            self.rec.refuse(f"unsafe SSE response: {type(e).__name__}")
            self.closed = True
            err = mcpwire.jsonrpc_error(self.error_id, mcpwire.INTERNAL_ERROR, "the gateway could not check the response")
            return [mcpwire.SSEEvent(event="message", data=json.dumps(err)).encode()]

    def _event(self, ev: mcpwire.SSEEvent) -> bytes:
        self.events += 1
        changed = self._check_fields(ev)
        if ev.data is None:
            # comment / keep-alive / retry-only: a checked stream keeps the keep-alive, not the text
            if not changed:
                return ev.raw
            return ev.encode() if ev.id is not None or ev.retry is not None or ev.event is not None else b":\n\n"
        if ev.type == "endpoint":
            if self.rewrite_endpoint is None:
                raise TransformError("endpoint event on a non-legacy connection")
            ev.data = self.rewrite_endpoint(ev.data)
            sid = query_session(ev.data)
            if sid is not None:
                # the client gets the session sealed (addons/core/sessionseal.py), never the raw id
                bind = self.rec.bind_session
                sealed = bind(sid) if bind is not None and plain_value(sid) else None
                if sealed is None:
                    raise TransformError("endpoint event names a session the gateway cannot seal for this caller")
                ev.data = with_query_session(ev.data, sealed)
            return ev.encode()
        if ev.type != "message":
            if self.strict:
                raise TransformError(f"unexpected SSE event type {ev.type!r}")
            return ev.raw
        if not ev.data.strip():
            return ev.encode() if changed else ev.raw     # priming event (2025-11-25)
        try:
            obj = mcpwire.strict_loads(ev.data)
        except mcpwire.McpParseError:
            if self.strict:
                raise
            return ev.raw
        items = obj if isinstance(obj, list) else [obj]
        out, any_changed = [], False
        for item in items:
            new, item_changed = transform_message(self.rec, item, ResultSource.of(ev.data, item))
            any_changed |= item_changed
            out.append(new)
            _remember(self.rec, new)
        if any_changed:
            ev.data = mcpwire.dumps(out if isinstance(obj, list) else out[0]).decode("utf-8", "surrogatepass")
        return ev.encode() if any_changed or changed else ev.raw

    def _check_fields(self, ev: mcpwire.SSEEvent) -> bool:
        """On a checked stream, drop what the masking rules cannot vouch for; True if changed."""
        if not self.strict:
            return False
        changed = ev.extra                       # comments / unknown fields: dropped by encode()
        if ev.id is not None and self.rec.mask_text is not None and self.rec.mask_text(ev.id) != ev.id:
            # a masked id could not resume the stream anyway (Last-Event-ID): drop it
            log.info("SSE event id dropped: the masking rules would change it")
            ev.id, changed = None, True
        return changed


def _error_id(rec: BastionRecord) -> Any:
    return rec.messages[0].id if len(rec.messages) == 1 else None


class ResponseRewriter:
    name = "responses"

    def __init__(self, connections: ConnectionRegistry | None = None) -> None:
        self.registry = connections or ConnectionRegistry()   # legacy endpoint events name them

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        rec = get_record(flow.metadata)
        if rec.connection is None or rec.refusal is not None or flow.response is None:
            return
        ctype = flow.response.headers.get("content-type", "").split(";")[0].strip().lower()
        if not ctype.startswith("text/event-stream"):  # the SDK client matches by prefix too
            return
        enc = flow.response.headers.get("content-encoding", "identity").lower()
        if enc not in ("", "identity"):
            # we asked for identity; a compressed stream cannot be checked event by event
            raise TransformError(f"upstream sent a {enc}-encoded event stream")
        flow.response.headers["x-accel-buffering"] = "no"
        flow.response.headers.pop("content-length", None)
        rewriter = None
        conn = self.registry.get(rec.connection)
        if conn is not None and conn.transport == "sse":
            conns = self.registry.connections
            rewriter = lambda data, n=rec.connection: rewrite_endpoint(n, data, conns)  # noqa: E731
        flow.response.stream = SSERewriter(rec, rewriter, _error_id(rec))

    def response(self, flow: http.HTTPFlow) -> None:
        rec = get_record(flow.metadata)
        resp = flow.response
        if rec.connection is None or rec.refusal is not None or resp is None or resp.stream:
            return
        if not rec.messages and not rec.response_transforms:
            return
        if resp.status_code == 202 and rec.legacy_stream:
            return  # legacy HTTP+SSE: the answer travels on the event stream (checked there)
        ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            raw = resp.get_content(strict=True)
        except ValueError:
            raw = None
        if not raw:
            # an encoding mitmproxy cannot decode may still be one the client decodes
            # ("gzip, gzip"): with transforms to apply, it must not pass unchecked
            if raw is None and (rec.mask_required or rec.response_transforms):
                self._replace(flow, rec, "undecodable response body")
            return
        if not ctype.startswith("application/json"):  # the SDK client parses any application/json*
            if rec.mask_required:
                self._replace(flow, rec, f"unexpected response content type {ctype or '(none)'}")
            return
        try:
            new = transform_json_body(rec, raw)
        except Exception as e:  # noqa: BLE001
            if rec.mask_required or rec.response_transforms:
                self._replace(flow, rec, f"{type(e).__name__}: {str(e)[:80]}")
            return
        if new is not None:
            resp.content = new  # re-encoded with the response's Content-Encoding

    def _replace(self, flow: http.HTTPFlow, rec: BastionRecord, why: str) -> None:
        log.warning("response replaced (fail closed): %s", why)
        rec.refuse(f"unsafe response: {why}")
        flow.response = json_response(
            200, mcpwire.jsonrpc_error(_error_id(rec), mcpwire.INTERNAL_ERROR, "the gateway could not check the response"))
