"""The `recorder` addon: every MCP message and decision into the audit store.

Last of the checking addons (before the Injector). What it records, per HTTP exchange:
client->server messages and the decisions on them (request hook), every server->client
message exactly as the caller received it — after masking — (per SSE event while
streaming, or the whole JSON body in the response hook), approval outcome, refusal,
masks, and one `http` summary with status, sizes, latency and redacted headers.

Durability: hooks only build events and queue them (addons/store.py writes them on its
own thread). Before a request is forwarded and before a response is released the hook
waits for the writer's group commit (fsync), so nothing that reached an upstream or a
client is missing after SIGKILL. If the store cannot write, new MCP requests are refused
with 503 until a probe succeeds again (fail closed: no unaudited traffic).
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import io
import itertools
import json
import os
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from mitmproxy import ctx, exceptions, http

from addons import mcpwire
from addons.httputil import json_response
from addons.record import BastionRecord, Decision, MaskEvent, get_record
from addons.secretscan import redact_bytes, redact_obj, redact_url
from addons.auditchain import DEFAULT_AUDIT_KEY, load_or_create_signing_key
from addons.store import (
    Sealing, Store, StoreUnavailable, StoreWriter, encode_event, recover_store,
)
from addons.cli import add_gateway_arg
from addons.textsafe import esc, get_logger

log = get_logger("bastion.recorder")

# Never stored: values of these headers (and of any connection's credential header).
REDACT_HEADERS = frozenset({
    "authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key",
    "x-auth-token", "x-amz-security-token", "proxy-authenticate-info",
})
SECRETISH_HEADER = re.compile(r"auth|token|secret|passw|api[-_]?key|cookie|credential|signature", re.I)
REDACTED = "[redacted]"
COMMIT_TIMEOUT = 10.0          # seconds a hook waits for the writer before failing closed
STREAM_COMMIT_TIMEOUT = 2.0    # the SSE tap blocks the event loop while it waits: keep it short
NOTES_KEY = "recorder"
FINAL_KINDS = ("response", "error")


def default_instance() -> str:
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:60] or "gateway"
    return f"{host}-{os.getpid()}"


def redact_headers(fields: Iterable[tuple[bytes | str, bytes | str]], extra: Iterable[str] = ()) -> dict[str, str]:
    """Headers as {lower-case name: value}; credential-bearing values replaced."""
    secret = REDACT_HEADERS | {h.lower() for h in extra}
    out: dict[str, str] = {}
    for k, v in fields:
        name = (k.decode("latin-1") if isinstance(k, bytes) else k).lower()
        value = v.decode("latin-1") if isinstance(v, bytes) else v
        if name in secret or SECRETISH_HEADER.search(name):
            value = REDACTED
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def redact_path(path: str, secrets: list | None = None) -> str:
    """Tokens never belong in URLs, but a careless client may put one there (query
    parameter or path segment): see secretscan.redact_url."""
    return redact_url(path, secrets or ())


def encode_redacted(event: dict, secrets: list | None) -> bytes:
    """One journal line with every known secret redacted (a one-pass scan of the encoded
    line; only a line with a hit is walked field by field and re-encoded)."""
    line = encode_event(event)
    if not secrets:
        return line
    _, hit = redact_bytes(secrets, line)
    if not hit:
        return line
    log.warning("redacted known secret(s) %s from a recorded %s event", ", ".join(sorted(hit)), event.get("kind"))
    clean = redact_obj(secrets, event)
    line, _ = redact_bytes(secrets, encode_event(clean))   # what the walk could not see (escapes)
    return line


def classify(obj: Any) -> str:
    """JSON-RPC kind of a server->client message (tolerant: it is already on the wire)."""
    if not isinstance(obj, dict):
        return "invalid"
    if "method" in obj:
        return "request" if "id" in obj else "notification"
    if "error" in obj:
        return "error"
    if "result" in obj:
        return "response"
    return "invalid"


def _id_text(v: Any) -> str | None:
    if v is None or isinstance(v, (dict, list)):
        return None
    return str(v)


def _ms(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return round((b - a) * 1000, 3)


@dataclass
class FlowEvents:
    """Builds the events of one HTTP exchange. Pure: no mitmproxy, no I/O."""

    base: dict[str, Any]
    bodies: bool = True
    t0: float = field(default_factory=time.time)      # request start
    requests: dict[str, tuple[str | None, str | None, str | None]] = field(default_factory=dict)
    mask_c2s: Any = None          # BastionRecord.request_mask: arguments as they may be stored
    request_masks: list[MaskEvent] = field(default_factory=list)

    def _ev(self, kind: str, ts: float, **kw: Any) -> dict[str, Any]:
        ev = dict(self.base)
        ev["ts"] = ts
        ev["kind"] = kind
        ev.update({k: v for k, v in kw.items() if v is not None})
        return ev

    def expect(self, msg: mcpwire.Message) -> None:
        """Remember a request so its response rows carry its method / tool."""
        rid = _id_text(msg.id)
        if msg.kind == "request" and rid is not None:
            self.requests[rid] = (msg.method, msg.target, msg.tool_name)

    def c2s(self, msg: mcpwire.Message, ts: float) -> dict[str, Any]:
        rid = _id_text(msg.id)
        tool = msg.tool_name
        self.expect(msg)
        raw = self._shown(msg) if self.bodies else msg.raw
        extra: dict[str, Any] = {}
        if msg.kind in FINAL_KINDS:             # client answering a server->client request
            if self.bodies:
                extra = {"result": raw.get("result"), "error": raw.get("error")}
            extra["error_code"] = (msg.error or {}).get("code")
        elif self.bodies and "params" in raw:
            extra["params"] = raw.get("params")
        return self._ev(msg.kind, ts, direction="c2s", rpc_id=rid, method=msg.method,
                        target=msg.target, tool=tool, **extra)

    def _shown(self, msg: mcpwire.Message) -> dict:
        """The message as it may be stored: `requests:` masking applied (fails closed)."""
        if self.mask_c2s is None or msg.kind not in ("request", "notification"):
            return msg.raw
        try:
            shown, events = self.mask_c2s(msg.raw)
        except Exception:  # noqa: BLE001 - an unmaskable argument is not stored at all
            log.exception("masking request arguments for the store failed")
            return {**msg.raw, "params": {"arguments": "[arguments hidden: could not be masked]"}}
        self.request_masks += events
        return shown

    def s2c(self, obj: Any, via: str, ts: float) -> dict[str, Any]:
        kind = classify(obj)
        o = obj if isinstance(obj, dict) else {}
        rid = _id_text(o.get("id"))
        method, target, tool = o.get("method"), None, None
        if kind in FINAL_KINDS and rid in self.requests:
            method, target, tool = self.requests[rid]
        err = o.get("error") if isinstance(o.get("error"), dict) else None
        extra: dict[str, Any] = {}
        if self.bodies:
            if kind == "response":
                extra["result"] = o.get("result")
            elif kind == "error":
                extra["error"] = err
            elif kind in ("request", "notification"):
                extra["params"] = o.get("params")
            else:
                extra["result"] = obj
        elif err is not None:
            extra["error"] = {"code": err.get("code"), "message": err.get("message")}
        return self._ev(kind, ts, direction="s2c", via=via, rpc_id=rid,
                        method=method if isinstance(method, str) else None, target=target, tool=tool,
                        error_code=err.get("code") if err and isinstance(err.get("code"), int) else None,
                        latency_ms=_ms(self.t0, ts) if kind in FINAL_KINDS else None, **extra)

    def _about(self, rid: str | None) -> dict[str, Any]:
        if rid is None and len(self.requests) == 1:
            rid = next(iter(self.requests))
        method, target, tool = self.requests.get(rid or "", (None, None, None))
        return {"rpc_id": rid, "method": method, "target": target, "tool": tool}

    def decision(self, d: Decision, ts: float) -> dict[str, Any]:
        return self._ev("decision", ts, direction="gateway", action=d.action, rule=d.rule, reason=d.reason or None,
                        mask_profile=d.mask_profile, **self._about(_id_text(d.message_id)))

    def approval(self, a: dict, ts: float) -> dict[str, Any]:
        outcome = a.get("outcome") or a.get("status") or a.get("result") or a.get("decision")
        approver = a.get("approver") or a.get("by") or a.get("approved_by")
        waited = a.get("waited") or a.get("waited_s") or a.get("duration")
        return self._ev("approval", ts, direction="gateway", approval=a,
                        approval_outcome=str(outcome) if outcome is not None else None,
                        approver=str(approver) if approver is not None else None,
                        rule=a.get("rule"), reason=a.get("reason"),
                        latency_ms=round(float(waited) * 1000, 3) if isinstance(waited, (int, float)) else None,
                        **self._about(_id_text(a.get("message_id"))))

    def refusal(self, reason: str, rule: str | None, status: int | None, ts: float, **kw: Any) -> dict[str, Any]:
        return self._ev("refusal", ts, direction="gateway", reason=reason, rule=rule, status=status,
                        **self._about(None), **kw)

    def mask(self, m: MaskEvent, profile: str | None, ts: float) -> dict[str, Any]:
        return self._ev("mask", ts, direction="gateway", mask_path=m.path, mask_type=m.type, mask_count=m.count,
                        mask_profile=profile, **self._about(None))

    def http(self, ts: float, **kw: Any) -> dict[str, Any]:
        return self._ev("http", ts, direction="gateway", **kw)


@dataclass
class _FlowState:
    events: FlowEvents
    extra_redact: set[str]
    req_headers: dict[str, str]
    http_method: str
    path: str
    request_bytes: int
    c2s_done: bool = False
    approval_done: bool = False
    streamed: bool = False
    response_bytes: int = 0
    done: bool = False


class Recorder:
    name = "recorder"

    def __init__(self) -> None:
        self.writer: StoreWriter | None = None
        self._seq = itertools.count(int(time.time() * 1_000_000))
        self._instance = ""
        self._sealing: Sealing | None = None

    # -- lifecycle -------------------------------------------------------------------

    def load(self, loader) -> None:
        loader.add_option("bastion_recordings", str, "recordings",
                          "Audit store directory (each gateway instance writes its own subdirectory).")
        loader.add_option("bastion_instance", str, "",
                          "Name of this gateway instance in the store (default: hostname-pid).")
        loader.add_option("bastion_record_bodies", bool, True,
                          "Record request params and (masked) results; off = metadata only.")
        loader.add_option("bastion_retention_days", int, 0,
                          "Delete this instance's segments older than N days when rolling (0 = keep).")
        loader.add_option("bastion_retention_mb", int, 0,
                          "Keep this instance's segments under N MiB, oldest deleted first (0 = no limit).")
        loader.add_option("bastion_record_roll_mb", int, 64,
                          "Roll the journal into a Parquet segment at this size (MiB).")
        loader.add_option("bastion_audit_key", str, DEFAULT_AUDIT_KEY,
                          "Ed25519 key that seals the audit store: chains journal lines and signs segment "
                          "manifests (created 0600 when missing). `mcp-bastion verify` checks with it.")
        loader.add_option("bastion_audit_anchor", str, "",
                          "Append each signed segment manifest's digest to this external append-only file.")
        loader.add_option("bastion_audit_before_forward", bool, False,
                          "Hold each request until its audit record is fsynced, before it goes upstream "
                          "(write-ahead audit: costs one fsync wait per call). Off: requests are durable "
                          "with the response, before the caller sees it.")

    def configure(self, updated) -> None:
        o = ctx.options
        for name in ("bastion_retention_days", "bastion_retention_mb"):
            if name in updated and getattr(o, name) < 0:
                raise exceptions.OptionsError(f"{name} must be >= 0")
        if "bastion_record_roll_mb" in updated and o.bastion_record_roll_mb <= 0:
            raise exceptions.OptionsError("bastion_record_roll_mb must be positive")
        if "bastion_instance" in updated and o.bastion_instance and not re.match(
                r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", o.bastion_instance):
            raise exceptions.OptionsError("bastion_instance: letters, digits, '.', '_' and '-' only")
        if self.writer is None or "bastion_audit_key" in updated:
            try:
                self._sealing = Sealing(load_or_create_signing_key(o.bastion_audit_key), o.bastion_audit_anchor)
            except (OSError, ValueError) as e:
                raise exceptions.OptionsError(f"bastion_audit_key: {e}") from None
        if self._sealing is not None:
            self._sealing.anchor_file = o.bastion_audit_anchor
        if self.writer is None or updated & {"bastion_recordings", "bastion_instance", "bastion_retention_days",
                                             "bastion_retention_mb", "bastion_record_roll_mb", "bastion_audit_key"}:
            self._start_writer()

    def _start_writer(self) -> None:
        o = ctx.options
        if self.writer is not None:
            self.writer.close()
        self._instance = o.bastion_instance or default_instance()
        root = Path(o.bastion_recordings)
        try:
            recover_store(root, own=self._instance, sealing=self._sealing)   # journals of gateways that died
        except OSError as e:
            log.error("recovering leftover journals in %s failed: %s", root, e)
        self.writer = StoreWriter(root, self._instance, roll_bytes=o.bastion_record_roll_mb * 1024 * 1024,
                                  retention_days=o.bastion_retention_days,
                                  retention_mb=o.bastion_retention_mb, sealing=self._sealing).start()
        if self.writer.healthy:
            log.info("recording to %s", self.writer.journal)

    def done(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    # -- hooks -----------------------------------------------------------------------

    async def request(self, flow: http.HTTPFlow) -> None:
        rec = get_record(flow.metadata)
        if rec.connection is None and rec.refusal is None:
            return                              # not MCP traffic (e.g. metadata documents)
        st = self._state(flow, rec)
        refused = flow.response is not None
        if not refused and not self._healthy():
            self._refuse_unavailable(flow, rec)
            return
        events = []
        now = time.time()
        for m in rec.messages:
            st.events.expect(m)
        if not self._defer_c2s(flow, rec):
            events += self._c2s_events(st, rec, now)
        if rec.approval is not None:
            st.approval_done = True
            events.append(st.events.approval(rec.approval, now))
        if not events:
            return
        if refused or not ctx.options.bastion_audit_before_forward:
            # the journal is written in order: the fsync the response waits for covers these
            self._submit(events, wait=False, secrets=rec.known_secrets)
            return
        try:
            await self._commit(events, rec.known_secrets)
        except (StoreUnavailable, asyncio.TimeoutError) as e:
            self._refuse_unavailable(flow, rec, str(e) or "commit timed out")

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        rec = get_record(flow.metadata)
        st: _FlowState | None = rec.notes.get(NOTES_KEY)
        if st is None or flow.response is None or not flow.response.stream:
            return
        inner = flow.response.stream if callable(flow.response.stream) else None
        st.streamed = True
        self._update_session(flow, st)
        flow.response.stream = StreamTap(inner, st, self, rec)

    async def response(self, flow: http.HTTPFlow) -> None:
        rec = get_record(flow.metadata)
        st: _FlowState | None = rec.notes.get(NOTES_KEY)
        if st is None:
            if rec.connection is None and rec.refusal is None:
                return
            st = self._state(flow, rec)
        if st.done:
            return
        st.done = True
        self._update_session(flow, st)
        events = self._final_events(flow, rec, st, time.time())
        try:
            await self._commit(events, rec.known_secrets)
        except (StoreUnavailable, asyncio.TimeoutError) as e:
            log.error("response not recorded (%s); not releasing it", e or "commit timed out")
            rec.refuse("audit store unavailable", None)
            if st.streamed:
                if flow.killable:
                    flow.kill()
            else:
                flow.response = _unavailable_response()

    def error(self, flow: http.HTTPFlow) -> None:
        rec = get_record(flow.metadata)
        st: _FlowState | None = rec.notes.get(NOTES_KEY)
        if st is None:
            if rec.connection is None and rec.refusal is None:
                return
            st = self._state(flow, rec)
        if st.done:
            return
        st.done = True
        now = time.time()
        events = self._c2s_events(st, rec, now)
        if rec.approval is not None and not st.approval_done:
            events.append(st.events.approval(rec.approval, now))
        if rec.refusal is not None:
            events.append(st.events.refusal(rec.refusal, rec.refusal_rule, None, now,
                                            http_method=st.http_method, path=st.path))
        msg = flow.error.msg if flow.error else "error"
        events.append(st.events.http(now, http_method=st.http_method, path=st.path, request_bytes=st.request_bytes,
                                     request_sha256=_forwarded_sha256(rec),
                                     response_bytes=st.response_bytes or None, latency_ms=_ms(st.events.t0, now),
                                     req_headers=st.req_headers, note=msg[:500], credential=rec.credential_kind))
        self._submit(events, wait=False, secrets=rec.known_secrets)

    # -- helpers ---------------------------------------------------------------------

    def _healthy(self) -> bool:
        return self.writer is not None and self.writer.healthy

    def _refuse_unavailable(self, flow: http.HTTPFlow, rec: BastionRecord, why: str | None = None) -> None:
        why = why or (self.writer.failure if self.writer else "recorder not configured")
        log.error("refusing %s %s: audit store unavailable (%s)", flow.request.method, flow.request.path, why)
        flow.response = _unavailable_response()
        rec.refuse("audit store unavailable", None)

    async def _commit(self, events: list[dict], secrets: list | None = None) -> None:
        """Queue events and wait until they are fsynced (raises StoreUnavailable / TimeoutError)."""
        lines = self._encode(events, secrets)
        if self.writer is None:
            raise StoreUnavailable("recorder not configured")
        await asyncio.wait_for(self.writer.submit_async(lines), COMMIT_TIMEOUT)

    def _encode(self, events: list[dict], secrets: list | None = None) -> list[bytes]:
        for ev in events:
            ev["seq"] = next(self._seq)
        return [encode_redacted(ev, secrets) for ev in events]

    def _submit(self, events: list[dict], wait: bool, secrets: list | None = None):
        lines = self._encode(events, secrets)
        if self.writer is None:
            if wait:
                import concurrent.futures
                f: concurrent.futures.Future = concurrent.futures.Future()
                f.set_exception(StoreUnavailable("recorder not configured"))
                return f
            return None
        return self.writer.submit(lines, wait=wait)

    def _state(self, flow: http.HTTPFlow, rec: BastionRecord) -> _FlowState:
        st: _FlowState | None = rec.notes.get(NOTES_KEY)
        if st is not None:
            return st
        req = flow.request
        extra = self._credential_headers(rec)
        ident = rec.identity
        session = req.headers.get("mcp-session-id")
        base = {
            "instance": self._instance, "flow_id": flow.id,
            "client_conn": flow.client_conn.id if flow.client_conn else None,
            "client_addr": _addr(flow.client_conn.peername) if flow.client_conn else None,
            "session_id": session, "session_synthetic": session is None,
            "connection": rec.connection, "protocol_version": rec.protocol_version,
            "sub": ident.sub if ident else None, "roles": list(ident.roles) if ident else None,
            "client_id": ident.client_id if ident else None, "issuer": ident.issuer if ident else None,
        }
        if session is None:
            base["session_id"] = _synthetic_session(base)
        st = _FlowState(
            events=FlowEvents(base, bodies=ctx.options.bastion_record_bodies, t0=req.timestamp_start or time.time(),
                              mask_c2s=rec.request_mask),
            extra_redact=extra, req_headers=redact_headers(req.headers.fields, extra),
            http_method=req.method, path=redact_path(req.path, rec.known_secrets),
            request_bytes=len(req.raw_content or b""),
        )
        rec.notes[NOTES_KEY] = st
        return st

    def _credential_headers(self, rec: BastionRecord) -> set[str]:
        out = set()
        if rec.notes.get("injected_header"):
            out.add(str(rec.notes["injected_header"]))
        router = ctx.master.addons.get("connections")
        conns = getattr(getattr(router, "wrapped", router), "connections", None) or {}
        for c in conns.values():
            cred = getattr(c, "credential", None)
            if cred is not None:
                out.add(cred.header)
        return out

    @staticmethod
    def _defer_c2s(flow: http.HTTPFlow, rec: BastionRecord) -> bool:
        # initialize has no session id yet: the response assigns it, record both under it
        return "mcp-session-id" not in flow.request.headers and any(m.method == "initialize" for m in rec.messages)

    @staticmethod
    def _c2s_events(st: _FlowState, rec: BastionRecord, now: float) -> list[dict]:
        if st.c2s_done:
            return []
        st.c2s_done = True
        st.events.base["protocol_version"] = rec.protocol_version
        ts = st.events.t0
        events = [st.events.c2s(m, ts) for m in rec.messages]
        events += [st.events.decision(d, ts) for d in rec.decisions]   # decided before forwarding
        events += [st.events.mask(m, "requests", ts) for m in st.events.request_masks]
        return events

    @staticmethod
    def _update_session(flow: http.HTTPFlow, st: _FlowState) -> None:
        base = st.events.base
        # the upstream's session id (the client holds it sealed: addons/sessionseal.py)
        named = flow.response.headers.get("mcp-session-id") if flow.response is not None else None
        key = get_record(flow.metadata).session_key
        sid = key[1] if key is not None and named else named
        if base["session_synthetic"] and sid:
            base["session_id"], base["session_synthetic"] = sid, False

    def _final_events(self, flow: http.HTTPFlow, rec: BastionRecord, st: _FlowState, now: float) -> list[dict]:
        ev = st.events
        events = self._c2s_events(st, rec, now)
        if rec.approval is not None and not st.approval_done:
            st.approval_done = True
            events.append(ev.approval(rec.approval, now))
        resp = flow.response
        status = resp.status_code if resp is not None else None
        if rec.refusal is not None:
            events.append(ev.refusal(rec.refusal, rec.refusal_rule, status, (resp.timestamp_start if resp else None) or now,
                                     http_method=st.http_method, path=st.path, credential=rec.credential_kind))
        if resp is not None and not st.streamed:
            via = "gateway" if rec.refusal is not None else "json"
            t_resp = resp.timestamp_end or now
            events += [ev.s2c(m, via, t_resp) for m in _caller_messages(resp, rec)]
            st.response_bytes = len(resp.raw_content or b"")
        profile = next((d.mask_profile for d in rec.decisions if d.mask_profile), None)
        events += [ev.mask(m, profile, now) for m in rec.masks]
        note = None
        if rec.notes.get("response_messages_dropped"):
            note = f"{rec.notes['response_messages_dropped']} response message(s) not recorded (limit)"
        events.append(ev.http(
            now, http_method=st.http_method, path=st.path, status=status, request_bytes=st.request_bytes,
            request_sha256=_forwarded_sha256(rec), response_bytes=st.response_bytes,
            latency_ms=_ms(ev.t0, (resp.timestamp_end if resp else None) or now),
            req_headers=st.req_headers, note=note, credential=rec.credential_kind,
            resp_headers=redact_headers(resp.headers.fields, st.extra_redact) if resp is not None else None))
        return events


def _forwarded_sha256(rec: BastionRecord) -> str | None:
    """The Injector and the Forwarder let a request go only while it matches rec.outgoing,
    so its body digest is the digest of what reached the upstream."""
    return rec.outgoing.body_sha256 if rec.outgoing is not None else None


class StreamTap:
    """Wraps the response stream callable: records every JSON-RPC message the caller
    receives (the bytes after the responses addon), and holds a final response until
    it is durable. Synchronous, as mitmproxy requires of stream callables."""

    def __init__(self, inner, st: _FlowState, recorder: Recorder, rec: BastionRecord):
        self.inner = inner
        self.st = st
        self.recorder = recorder
        self.rec = rec
        self.parser = mcpwire.SSEParser(max_event=64 * 1024 * 1024)
        self.closed = False

    def __call__(self, data: bytes) -> list[bytes]:
        """Chunks for the client; never an empty one (on a chunked body, the end)."""
        if self.closed:
            return []
        out = self.inner(data) if self.inner is not None else data
        if not isinstance(out, bytes):
            out = b"".join(out)
        sent = [out] if out else []
        self.st.response_bytes += len(out)
        try:
            events, final = self._events(out, final=not data)
        except Exception as e:  # noqa: BLE001 - unparseable output is passed as is, but noted
            events, final = [self.st.events.http(time.time(), note=f"unrecorded SSE bytes: {type(e).__name__}")], False
        if not events:
            return sent
        fut = self.recorder._submit(events, wait=final, secrets=self.rec.known_secrets)
        if fut is None:
            return sent
        try:
            fut.result(timeout=STREAM_COMMIT_TIMEOUT)   # the caller must not see what is not durable
            return sent
        except Exception as e:  # noqa: BLE001 - StoreUnavailable, timeout: fail closed
            log.error("SSE response not recorded (%s); stream cut", e)
            self.closed = True
            self.rec.refuse("audit store unavailable", None)
            err = mcpwire.jsonrpc_error(None, mcpwire.INTERNAL_ERROR, "the gateway could not record the response")
            return [mcpwire.SSEEvent(event="message", data=json.dumps(err)).encode()]

    def _events(self, out: bytes, final: bool) -> tuple[list[dict], bool]:
        now = time.time()
        events, is_final = [], False
        for ev in self.parser.feed(out, final=final):
            if ev.data is None or ev.type != "message" or not ev.data.strip():
                continue
            try:
                obj = json.loads(ev.data)
            except ValueError:
                events.append(self.st.events.http(now, note="SSE message event that is not JSON"))
                continue
            for item in obj if isinstance(obj, list) else [obj]:
                e = self.st.events.s2c(item, "sse", now)
                is_final = is_final or e["kind"] in FINAL_KINDS
                events.append(e)
        return events, is_final


def _caller_messages(resp: http.Response, rec: BastionRecord) -> list[Any]:
    """The JSON-RPC messages of a non-streamed response as the caller receives them."""
    if rec.refusal is None and rec.response_messages and not rec.notes.get("response_messages_dropped"):
        return list(rec.response_messages)
    ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        body = resp.get_content(strict=False) or b""
    except ValueError:
        return []
    if not body:
        return []
    if ctype == "application/json":
        try:
            obj = json.loads(body)
        except ValueError:
            return []
        if rec.refusal is not None and isinstance(obj, dict) and "jsonrpc" not in obj:
            return []                       # plain HTTP refusal body: the refusal event holds it
        return obj if isinstance(obj, list) else [obj]
    if ctype == "text/event-stream":
        out = []
        for ev in mcpwire.SSEParser(max_event=64 * 1024 * 1024).feed(body, final=True):
            if ev.data and ev.type == "message" and ev.data.strip():
                try:
                    obj = json.loads(ev.data)
                except ValueError:
                    continue
                out.extend(obj if isinstance(obj, list) else [obj])
        return out
    return []


def _unavailable_response() -> http.Response:
    return json_response(503, {"error": "audit_unavailable",
                               "error_description": "the gateway cannot record traffic right now; try again later"},
                         {"retry-after": "5"})


def _addr(peer: Any) -> str | None:
    if not peer:
        return None
    try:
        return f"{peer[0]}:{peer[1]}"
    except (TypeError, IndexError):
        return str(peer)


def _synthetic_session(base: dict) -> str:
    """Stateless MCP has no session id: group by caller, connection and client connection."""
    conn = (base.get("client_conn") or "")[:8]
    return f"~{base.get('sub') or 'anonymous'}@{base.get('connection') or '-'}/{conn}"


# =======================================================================================
# CLI: sql, sessions, replay, export


def add_cli(sub) -> None:
    p = sub.add_parser("sql", help="run SQL over the audit store (works while gateways are recording)",
                       description="Views: events, sessions, messages, decisions, refusals, approvals, masks, "
                                   "exchanges. See docs/audit.md.")
    p.add_argument("query", help="SQL statement, e.g. \"SELECT * FROM sessions\"")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    _store_arg(p)
    p.set_defaults(func=cli_sql)

    p = sub.add_parser("sessions", help="list recorded sessions")
    p.add_argument("--limit", type=int, default=50)
    _store_arg(p)
    p.set_defaults(func=cli_sessions)

    p = sub.add_parser("replay", help="print a readable timeline of a recorded session")
    p.add_argument("session", help="session id (or a unique prefix)")
    p.add_argument("--width", type=int, default=160, help="truncate payloads to this many characters")
    p.add_argument("--web", action="store_true", help="open the session's (redacted) flows in mitmweb instead")
    _store_arg(p)
    p.set_defaults(func=cli_replay)

    p = sub.add_parser("resend", help="re-send a recorded session's requests through a gateway to a TEST connection",
                       description="Opt-in client replay. Only connections marked `options: {test: true}` in "
                                   "connections.yaml are accepted as targets; requests go through the gateway, so "
                                   "identity, policy, masking and recording apply again.")
    p.add_argument("session", help="session id (or a unique prefix)")
    p.add_argument("--connection", required=True, help="target connection (must have options: {test: true})")
    add_gateway_arg(p)
    p.add_argument("--token", default=os.environ.get("BASTION_TOKEN"), help="bearer token (default: $BASTION_TOKEN)")
    _store_arg(p)
    p.set_defaults(func=cli_resend)

    p = sub.add_parser("export", help="a session as a (redacted) mitmproxy flow file, or the store as JSON lines "
                                      "/ OCSF for a SIEM",
                       description="--format mitm (default): one session as a flow file for mitmweb -r. "
                                   "--format jsonl | ocsf: every event of the store (or of one session) as JSON "
                                   "lines, raw or as OCSF API Activity (class 6003) events.")
    p.add_argument("session", nargs="?", help="session id (or a unique prefix); optional for jsonl / ocsf")
    p.add_argument("-o", "--output", help="output file (mitm: required; jsonl / ocsf: default stdout)")
    p.add_argument("--format", choices=("mitm", "jsonl", "ocsf"), default="mitm")
    _store_arg(p)
    p.set_defaults(func=cli_export)


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=os.environ.get("BASTION_RECORDINGS", "recordings"),
                   help="audit store directory (default: $BASTION_RECORDINGS or recordings)")


def _open(args) -> Store | None:
    if not Path(args.store).is_dir():
        print(f"error: no audit store at {args.store}", file=sys.stderr)
        return None
    st = Store(args.store)
    return st


def _report(st: Store) -> None:
    for p in st.problems:
        print(f"warning: {p} (skipped)", file=sys.stderr)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3f}".rstrip("0").rstrip(".")
    if isinstance(v, (list, dict)):
        return json.dumps(v, ensure_ascii=False, default=str)
    return str(v)


def render(columns: list[str], rows: list[tuple], fmt: str, max_width: int = 60) -> str:
    # recorded values are caller-chosen: no raw control or escape characters reach a terminal
    if fmt == "json":
        return esc(json.dumps([dict(zip(columns, r)) for r in rows], ensure_ascii=False, default=str, indent=1),
                   json_text=True) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow([esc(c) for c in columns])
        w.writerows([[esc(_cell(v)) for v in r] for r in rows])
        return buf.getvalue()
    columns = [esc(c) for c in columns]
    cells = [[esc(_cell(v)) for v in r] for r in rows]
    cells = [[c if len(c) <= max_width else c[:max_width - 1] + "…" for c in r] for r in cells]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = lambda vals: " | ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    out = [line(columns), "-+-".join("-" * w for w in widths)] + [line(r) for r in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out) + "\n"


def cli_sql(args) -> int:
    import duckdb
    st = _open(args)
    if st is None:
        return 2
    try:
        cur = st.query(args.query)
        columns = [d[0] for d in cur.description] if cur.description else []
        rows = cur.fetchall() if cur.description else []
    except duckdb.Error as e:
        _report(st)
        print(f"error: {e}", file=sys.stderr)
        return 1
    _report(st)
    sys.stdout.write(render(columns, rows, args.format))
    return 0


def cli_sessions(args) -> int:
    st = _open(args)
    if st is None:
        return 2
    cur = st.query("SELECT session_id, started, ended, subs, connections, requests, tool_calls, refusals, "
                   "denied, approvals, masked FROM sessions ORDER BY started DESC LIMIT ?", [args.limit])
    cols = [d[0] for d in cur.description]
    rows = [tuple(_short_time(v) for v in r) for r in cur.fetchall()]
    _report(st)
    sys.stdout.write(render(cols, rows, "table", max_width=48))
    return 0


def _short_time(v: Any) -> Any:
    if hasattr(v, "strftime"):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    return v


def resolve_session(st: Store, prefix: str) -> str | None:
    ids = [r[0] for r in st.query("SELECT DISTINCT session_id FROM events WHERE session_id = ? "
                                  "OR starts_with(session_id, ?)", [prefix, prefix]).fetchall()]
    if prefix in ids:
        return prefix
    if len(ids) == 1:
        return ids[0]
    if not ids:
        print(f"error: no session {prefix!r}", file=sys.stderr)
    else:
        print(f"error: {prefix!r} matches {len(ids)} sessions; give more characters", file=sys.stderr)
    return None


def session_events(st: Store, session: str) -> list[dict]:
    return _event_dicts(st.query("SELECT * FROM events WHERE session_id = ? ORDER BY ts, instance, seq", [session]))


def store_events(st: Store) -> list[dict]:
    return _event_dicts(st.query("SELECT * FROM events ORDER BY ts, instance, seq"))


def _event_dicts(cur) -> list[dict]:
    cols = [d[0] for d in cur.description]
    out = []
    for r in cur.fetchall():
        d = dict(zip(cols, r))
        for k in ("params", "result", "error", "approval", "req_headers", "resp_headers"):
            if isinstance(d.get(k), str):
                try:
                    d[k] = json.loads(d[k])
                except ValueError:
                    pass
        out.append(d)
    return out


def _clip(v: Any, width: int) -> str:
    s = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, separators=(",", ":"), default=str)
    return s if len(s) <= width else s[:width - 1] + "…"


def format_timeline(events: list[dict], width: int = 160) -> str:
    """Readable replay of one session (pure)."""
    if not events:
        return "(no events)\n"
    first = events[0]
    t0 = first["ts"]
    subs = sorted({e["sub"] for e in events if e.get("sub")})
    roles = sorted({r for e in events for r in (e.get("roles") or [])})
    clients = sorted({e["client_id"] for e in events if e.get("client_id")})
    out = [
        f"session    {first['session_id']}{'  (synthetic: stateless client)' if first.get('session_synthetic') else ''}",
        f"identity   {', '.join(subs) or '(unauthenticated)'}  roles={','.join(roles) or '-'}"
        f"  client={','.join(clients) or '-'}",
        f"connection {', '.join(sorted({e['connection'] for e in events if e.get('connection')})) or '-'}"
        f"   instance(s) {', '.join(sorted({e['instance'] for e in events if e.get('instance')}))}",
        f"started    {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(t0))}.{int(t0 % 1 * 1000):03d} UTC"
        f"   events {len(events)}",
        "",
    ]
    for e in events:
        rel = f"+{e['ts'] - t0:9.3f}s"
        kind = e["kind"]
        what = " ".join(x for x in (e.get("method"), e.get("target")) if x)
        lat = f"  ({e['latency_ms']:.1f} ms)" if e.get("latency_ms") is not None else ""
        if kind in ("request", "notification") and e["direction"] == "c2s":
            args = (e.get("params") or {}).get("arguments") if isinstance(e.get("params"), dict) else None
            line = f"→ {kind:<12} {what}" + (f" id={e['rpc_id']}" if e.get("rpc_id") else "")
            if args:
                line += f"  args {_clip(args, width)}"
        elif kind in ("request", "notification"):
            line = f"⇠ server {kind:<5} {e.get('method') or ''}" + (
                f"  {_clip(e['params'], width)}" if e.get("params") else "")
        elif kind == "response":
            line = f"← result       {what} id={e.get('rpc_id')}{lat}" + (
                f"  {_clip(e['result'], width)}" if e.get("result") is not None else "")
            if e["direction"] == "c2s":
                line = "→ client result " + line[16:]
        elif kind == "error":
            err = e.get("error") or {}
            line = f"← error        {what} id={e.get('rpc_id')}{lat}  {err.get('code', e.get('error_code'))}: " \
                   f"{_clip(err.get('message', ''), width)}"
        elif kind == "decision":
            line = f"  decision     {(e.get('action') or '').upper()} {what}" + (
                f"  rule={e['rule']}" if e.get("rule") else "  (default)") + (
                f"  reason: {e['reason']}" if e.get("reason") else "")
        elif kind == "approval":
            line = f"  approval     {e.get('approval_outcome') or '?'} {what}" + (
                f" by {e['approver']}" if e.get("approver") else "") + lat
        elif kind == "refusal":
            line = f"✗ refused      {e.get('status') or ''} {e.get('reason') or ''}" + (
                f"  rule={e['rule']}" if e.get("rule") else "")
        elif kind == "mask":
            line = f"  masked       {e.get('mask_type')} ×{e.get('mask_count')} at {e.get('mask_path')}"
        elif kind == "http":
            line = f"  http         {e.get('http_method') or ''} {e.get('path') or ''} → {e.get('status') or '-'}" \
                   f"{lat}  {e.get('request_bytes') or 0}B/{e.get('response_bytes') or 0}B" + (
                       f"  {e['note']}" if e.get("note") else "")
        else:
            line = f"  {kind}"
        out.append(f"{rel}  {line}")
    return "\n".join(esc(line) for line in out) + "\n"


def cli_replay(args) -> int:
    st = _open(args)
    if st is None:
        return 2
    sid = resolve_session(st, args.session)
    if sid is None:
        return 1
    _report(st)
    if args.web:
        import shutil
        import tempfile
        fd, path = tempfile.mkstemp(prefix="bastion-replay-", suffix=".mitm")
        os.close(fd)
        n = write_flow_file(build_flows(session_events(st, sid)), path)
        st.close()
        web = shutil.which("mitmweb") or str(Path(sys.executable).parent / "mitmweb")
        port = os.environ.get("BASTION_WEB_PORT") or "8081"
        print(f"opening {n} flow(s) of session {sid} in mitmweb at http://127.0.0.1:{port}/ ({path})",
              file=sys.stderr)
        # loopback only, both the console and mitmweb's (unused) proxy listener
        os.execv(web, [web, *replay_web_args(path, port)])
    sys.stdout.write(format_timeline(session_events(st, sid), args.width))
    return 0


def replay_web_args(path: str, web_port: str) -> list[str]:
    return ["-r", path, "--set", "web_host=127.0.0.1", "--set", f"web_port={web_port}",
            "--set", "web_open_browser=false", "--listen-host", "127.0.0.1", "--mode", "regular@0"]


def build_flows(events: list[dict]) -> list[http.HTTPFlow]:
    """Rebuild one mitmproxy flow per recorded HTTP exchange (redacted, masked bodies)."""
    from mitmproxy import connection

    by_flow: dict[str, list[dict]] = {}
    for e in events:
        by_flow.setdefault(e.get("flow_id") or f"{e['instance']}:{e['seq']}", []).append(e)
    flows = []
    for fid, evs in by_flow.items():
        hx = next((e for e in evs if e["kind"] == "http"), None)
        first = evs[0]
        t_start = first["ts"]
        t_end = (hx or evs[-1])["ts"]
        c2s = [e for e in evs if e["direction"] == "c2s"]
        s2c = [e for e in evs if e["direction"] == "s2c"]
        req_body = _jsonrpc_body(c2s)
        headers = dict((hx or {}).get("req_headers") or {})
        headers.pop("content-length", None)
        req = http.Request.make((hx or {}).get("http_method") or "POST",
                                f"http://gateway{(hx or {}).get('path') or '/mcp/' + (first.get('connection') or '')}",
                                req_body, headers)
        req.timestamp_start, req.timestamp_end = t_start, t_start
        peer = (first.get("client_addr") or "127.0.0.1:0").rsplit(":", 1)
        client = connection.Client(peername=(peer[0], int(peer[1]) if peer[1].isdigit() else 0),
                                   sockname=("127.0.0.1", 0), timestamp_start=t_start)
        client.id = first.get("client_conn") or client.id
        server = connection.Server(address=(first.get("connection") or "upstream", 0))
        f = http.HTTPFlow(client, server)
        f.request = req
        if hx is not None and hx.get("status") is not None:
            rh = dict(hx.get("resp_headers") or {})
            rh.pop("content-length", None)
            rh.pop("transfer-encoding", None)
            sse = any(e.get("via") == "sse" for e in s2c)
            body = _sse_body(s2c) if sse else _jsonrpc_body(s2c)
            f.response = http.Response.make(int(hx["status"]), body, rh)
            f.response.timestamp_start, f.response.timestamp_end = t_end, t_end
        elif hx is not None and hx.get("note"):
            from mitmproxy.flow import Error
            f.error = Error(hx["note"], t_end)
        notes = []
        for e in evs:
            if e["kind"] == "decision":
                notes.append(f"decision {e.get('action')} rule={e.get('rule') or '(default)'} {e.get('reason') or ''}")
            elif e["kind"] == "approval":
                notes.append(f"approval {e.get('approval_outcome')} by {e.get('approver') or '?'}")
            elif e["kind"] == "refusal":
                notes.append(f"refused: {e.get('reason')}")
                f.marked = ":no_entry:"
            elif e["kind"] == "mask":
                notes.append(f"masked {e.get('mask_type')} x{e.get('mask_count')} at {e.get('mask_path')}")
        ident = next((e for e in evs if e.get("sub")), None)
        if ident:
            notes.insert(0, f"identity {ident['sub']} roles={','.join(ident.get('roles') or [])}")
        f.comment = "\n".join(esc(n) for n in notes)   # recorded values are caller-chosen
        f.metadata["bastion_recorded"] = {"session_id": first.get("session_id"), "instance": first.get("instance"),
                                          "flow_id": fid}
        f.live = False
        flows.append(f)
    return flows


def _rpc_id(v: str | None) -> Any:
    if v is None:
        return None
    return int(v) if re.fullmatch(r"-?\d{1,18}", v) else v


def _message(e: dict) -> dict:
    m: dict[str, Any] = {"jsonrpc": "2.0"}
    if e.get("rpc_id") is not None:
        m["id"] = _rpc_id(e["rpc_id"])
    if e["kind"] in ("request", "notification"):
        m["method"] = e.get("method")
        if e.get("params") is not None:
            m["params"] = e["params"]
    elif e["kind"] == "error":
        m["error"] = e.get("error") or {"code": e.get("error_code"), "message": "(not recorded)"}
    else:
        m["result"] = e.get("result")
    return m


def _jsonrpc_body(evs: list[dict]) -> bytes:
    msgs = [_message(e) for e in evs if e["kind"] in ("request", "notification", "response", "error")]
    if not msgs:
        return b""
    return json.dumps(msgs[0] if len(msgs) == 1 else msgs, ensure_ascii=False).encode()


def _sse_body(evs: list[dict]) -> bytes:
    return b"".join(mcpwire.SSEEvent(event="message", data=json.dumps(_message(e), ensure_ascii=False)).encode()
                    for e in evs if e["kind"] in ("request", "notification", "response", "error"))


def write_flow_file(flows: list[http.HTTPFlow], path: str) -> int:
    from mitmproxy import io as mio
    with open(path, "wb") as fh:
        w = mio.FlowWriter(fh)
        for f in flows:
            w.add(f)
    return len(flows)


def cli_export(args) -> int:
    if args.format == "mitm" and not (args.session and args.output):
        print("error: --format mitm needs a session and -o FILE", file=sys.stderr)
        return 2
    st = _open(args)
    if st is None:
        return 2
    sid = resolve_session(st, args.session) if args.session else None
    if args.session and sid is None:
        return 1
    _report(st)
    if args.format != "mitm":
        from addons.auditexport import export_lines
        rows = session_events(st, sid) if sid else store_events(st)
        out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
        n = 0
        try:
            for line in export_lines(rows, args.format):
                out.write(line)
                n += 1
        finally:
            if args.output:
                out.close()
        print(f"exported {n} event(s) as {args.format}", file=sys.stderr)
        return 0
    n = write_flow_file(build_flows(session_events(st, sid)), args.output)
    print(f"wrote {n} flow(s) of session {sid} to {args.output} (open with: mitmweb -r {args.output})")
    return 0


def test_connection_problem(rules_dir: str, name: str) -> str | None:
    """Why `name` may not be a resend target (None = it may). Reads only names and options,
    never credentials."""
    from addons.rules import RulesError, load_yaml, rules_files, to_plain
    try:
        for f in rules_files(rules_dir, "connections"):
            if not f.exists():
                continue
            conns = (to_plain(load_yaml(f)) or {}).get("connections") or {}
            if name in conns:
                opts = (conns[name] or {}).get("options") or {}
                if opts.get("test") is True:
                    return None
                return f"connection {name!r} is not marked as a test connection (options: {{test: true}} in {f})"
    except RulesError as e:
        return str(e)
    return f"no connection {name!r} in {rules_dir}"


def resend_messages(events: list[dict]) -> list[dict]:
    """The client->server messages of a session, in order, as they were sent."""
    out = []
    for e in events:
        if e.get("direction") != "c2s" or e["kind"] not in ("request", "notification"):
            continue
        if e.get("params") is None and e.get("method") not in ("ping", "notifications/initialized"):
            raise ValueError("this session was recorded without bodies (bastion_record_bodies=false)")
        out.append(_message(e))
    return out


def resend(messages: list[dict], url: str, token: str | None, transport=None, out=sys.stdout) -> int:
    """POST each message; a new Mcp-Session-Id from initialize is used for the rest."""
    import httpx
    headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    failures = 0
    with httpx.Client(timeout=60, transport=transport) as client:
        for m in messages:
            r = client.post(url, json=m, headers=headers)
            if r.headers.get("mcp-session-id"):
                headers["mcp-session-id"] = r.headers["mcp-session-id"]
            if m.get("method") == "initialize" and r.status_code == 200:
                version = ((_first_response(r) or {}).get("result") or {}).get("protocolVersion")
                if version:
                    headers["mcp-protocol-version"] = version
            resp = _first_response(r)
            status = "error" if r.status_code >= 400 or (resp and "error" in resp) else "ok"
            failures += status == "error"
            detail = _clip((resp or {}).get("error") or (resp or {}).get("result") or r.text, 120)
            out.write(esc(f"{m.get('method')} {m.get('params', {}).get('name', '') if isinstance(m.get('params'), dict) else ''}"
                          f" -> HTTP {r.status_code} {status} {detail}") + "\n")
    return 1 if failures else 0


def _first_response(r) -> dict | None:
    ctype = r.headers.get("content-type", "")
    try:
        if ctype.startswith("text/event-stream"):
            for ev in mcpwire.SSEParser().feed(r.content, final=True):
                if ev.data and ev.type == "message":
                    obj = json.loads(ev.data)
                    if isinstance(obj, dict) and ("result" in obj or "error" in obj):
                        return obj
            return None
        obj = r.json()
        return obj if isinstance(obj, dict) else None
    except ValueError:
        return None


def cli_resend(args) -> int:
    problem = test_connection_problem(args.rules, args.connection)
    if problem:
        print(f"error: refusing to resend: {problem}", file=sys.stderr)
        return 2
    st = _open(args)
    if st is None:
        return 2
    sid = resolve_session(st, args.session)
    if sid is None:
        return 1
    try:
        messages = resend_messages(session_events(st, sid))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    url = f"{args.gateway.rstrip('/')}/mcp/{args.connection}"
    print(f"re-sending {len(messages)} message(s) of session {sid} to {url}", file=sys.stderr)
    import httpx
    try:
        return resend(messages, url, args.token)
    except httpx.HTTPError as e:
        print(f"error: gateway unreachable at {url} ({type(e).__name__}); is it running? "
              "(--gateway, $BASTION_GATEWAY or $BASTION_PORT)", file=sys.stderr)
        return 2
