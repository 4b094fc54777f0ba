"""The `recorder` addon: every MCP message and decision into the audit store.

Last of the checking addons (before the Injector). What it records, per HTTP exchange:
client->server messages and the decisions on them (request hook), every server->client
message exactly as the caller received it — after masking — (per SSE event while
streaming, or the whole JSON body in the response hook), approval outcome, refusal,
masks, and one `http` summary with status, sizes, latency and redacted headers.

Durability: before a response is released (and, with bastion_audit_before_forward, before a
request is forwarded) the hook writes its events to the journal itself (write(2), on the event
loop, microseconds: addons/core/audit/store.py): a completed write is in the kernel's page
cache and survives the gateway being killed (SIGKILL), so nothing that reached a client is
missing after a crash of the process. fdatasync runs on a background thread (group commit,
within 20 ms); it only matters for power loss or a kernel crash, and
`bastion_audit_sync=fsync` makes the hook wait for it too. If the store
cannot write, new MCP requests are refused with 503 until a probe succeeds again (fail
closed: no unaudited traffic).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from mitmproxy import ctx, exceptions, http

from addons.core import mcpwire
from addons.hooks.httputil import json_response
from addons.core.connections import ConnectionRegistry
from addons.core.record import BastionRecord, Decision, MaskEvent, get_record
from addons.core.masking.secretscan import find_spans, redact_bytes, redact_obj, redact_url
from addons.core.audit.chain import DEFAULT_AUDIT_KEY, load_or_create_signing_key
from addons.core.audit.store import (
    Sealing, StoreUnavailable, StoreWriter, encode_event, recover_store,
)
from addons.core.textsafe import get_logger

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


BODY_KEYS = frozenset({"result", "error", "params"})   # a recorded message's payload


def encode_lines(events: list[dict], secrets: list | None, flow: "FlowEvents | None" = None,
                 scanned: frozenset[int] = frozenset()) -> list[bytes]:
    """Journal lines with every known secret redacted, in one scan. Events of one flow all
    carry its base fields (caller, session, connection: most of a small line): those are
    scanned once per flow (again only if they change), then what each event adds (a scan
    costs a few ns a byte). The payload of events in `scanned` (ids) was scanned already,
    as the body the caller received. Only on a hit is each line taken through
    encode_redacted."""
    lines = [encode_event(ev) for ev in events]
    if not secrets:
        return lines
    if flow is None:
        parts = lines
    else:
        shared = flow.base
        base = encode_event(shared)
        memo = (base, tuple(map(id, secrets)))          # a reloaded index scans it again
        parts = [] if memo == flow.clean_base else [base]
        parts += [encode_event({k: v for k, v in ev.items()
                                if (k not in shared or shared[k] is not v) and not (k in BODY_KEYS and id(ev) in scanned)})
                  for ev in events]
    if not find_spans(secrets, b"".join(parts))[1]:
        if flow is not None:
            flow.clean_base = memo
        return lines
    return [encode_redacted(ev, secrets) for ev in events]


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
    clean_base: tuple = ()        # encode_lines: (base, indexes) last scanned without a hit

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

    def __init__(self, connections: ConnectionRegistry | None = None) -> None:
        self.registry = connections or ConnectionRegistry()   # credential header names to redact
        self.writer: StoreWriter | None = None
        self._seq = itertools.count(int(time.time() * 1_000_000))
        self._instance = ""
        self._sealing: Sealing | None = None

    def live_metrics(self) -> dict[str, float]:
        w = self.writer
        if w is None:
            return {}
        return {"bastion_recorder_events": w.stats.events, "bastion_recorder_errors": w.stats.failures,
                "bastion_recorder_healthy": 1 if w.healthy else 0, "bastion_recorder_queue": getattr(w, "queued", 0)}

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
        loader.add_option("bastion_audit_sync", str, "write",
                          "When a call's audit record counts as stored: 'write' (written to the journal: "
                          "survives a crash or kill -9 of the gateway; fdatasync follows within 20 ms, so "
                          "power loss can lose that window) or 'fsync' (after fdatasync).",
                          choices=("write", "fsync"))
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
                                             "bastion_retention_mb", "bastion_record_roll_mb", "bastion_audit_key",
                                             "bastion_audit_sync"}:
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
                                  retention_mb=o.bastion_retention_mb, sealing=self._sealing,
                                  ack=o.bastion_audit_sync).start()
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
            self._submit(events, wait=False, secrets=rec.known_secrets, flow=st.events)
            return
        try:
            await self._commit(events, rec.known_secrets, st.events)
        except (StoreUnavailable, asyncio.TimeoutError) as e:
            self._refuse_unavailable(flow, rec, str(e) or "commit timed out")

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        rec = get_record(flow.metadata)
        st: _FlowState | None = rec.audit_state
        if st is None or flow.response is None or not flow.response.stream:
            return
        inner = flow.response.stream if callable(flow.response.stream) else None
        st.streamed = True
        self._update_session(flow, st)
        flow.response.stream = StreamTap(inner, st, self, rec)

    def _finish(self, flow: http.HTTPFlow) -> tuple[BastionRecord, _FlowState] | None:
        """The flow's state, marked done; None if there is nothing (more) to record."""
        rec = get_record(flow.metadata)
        st: _FlowState | None = rec.audit_state
        if st is None:
            if rec.connection is None and rec.refusal is None:
                return None
            st = self._state(flow, rec)
        if st.done:
            return None
        st.done = True
        return rec, st

    async def response(self, flow: http.HTTPFlow) -> None:
        if (finished := self._finish(flow)) is None:
            return
        rec, st = finished
        self._update_session(flow, st)
        events, scanned = self._final_events(flow, rec, st, time.time())
        try:
            await self._commit(events, rec.known_secrets, st.events, scanned)
        except (StoreUnavailable, asyncio.TimeoutError) as e:
            log.error("response not recorded (%s); not releasing it", e or "commit timed out")
            rec.refuse("audit store unavailable", None)
            if st.streamed:
                if flow.killable:
                    flow.kill()
            else:
                flow.response = _unavailable_response()

    def error(self, flow: http.HTTPFlow) -> None:
        if (finished := self._finish(flow)) is None:
            return
        rec, st = finished
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
        self._submit(events, wait=False, secrets=rec.known_secrets, flow=st.events)

    # -- helpers ---------------------------------------------------------------------

    def _healthy(self) -> bool:
        return self.writer is not None and self.writer.healthy

    def _refuse_unavailable(self, flow: http.HTTPFlow, rec: BastionRecord, why: str | None = None) -> None:
        why = why or (self.writer.failure if self.writer else "recorder not configured")
        log.error("refusing %s %s: audit store unavailable (%s)", flow.request.method, flow.request.path, why)
        flow.response = _unavailable_response()
        rec.refuse("audit store unavailable", None)

    async def _commit(self, events: list[dict], secrets: list | None = None, flow: FlowEvents | None = None,
                      scanned: frozenset[int] = frozenset()) -> None:
        """Write events and return once they are stored per bastion_audit_sync: at once after
        write(2), or after the background fdatasync (raises StoreUnavailable / TimeoutError)."""
        lines = self._encode(events, secrets, flow, scanned)
        if self.writer is None:
            raise StoreUnavailable("recorder not configured")
        synced = self.writer.commit(lines)
        if synced is not None:
            await asyncio.wait_for(synced, COMMIT_TIMEOUT)

    def _encode(self, events: list[dict], secrets: list | None = None, flow: FlowEvents | None = None,
                scanned: frozenset[int] = frozenset()) -> list[bytes]:
        for ev in events:
            ev["seq"] = next(self._seq)
        return encode_lines(events, secrets, flow, scanned)

    def _submit(self, events: list[dict], wait: bool, secrets: list | None = None, flow: FlowEvents | None = None,
                scanned: frozenset[int] = frozenset()):
        lines = self._encode(events, secrets, flow, scanned)
        if self.writer is None:
            if wait:
                import concurrent.futures
                f: concurrent.futures.Future = concurrent.futures.Future()
                f.set_exception(StoreUnavailable("recorder not configured"))
                return f
            return None
        return self.writer.submit(lines, wait=wait)

    def _state(self, flow: http.HTTPFlow, rec: BastionRecord) -> _FlowState:
        st: _FlowState | None = rec.audit_state
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
        rec.audit_state = st
        return st

    def _credential_headers(self, rec: BastionRecord) -> set[str]:
        out = set()
        if rec.injected_header:
            out.add(rec.injected_header)
        for c in self.registry.connections.values():
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
        # the upstream's session id (the client holds it sealed: addons/core/sessionseal.py)
        named = flow.response.headers.get("mcp-session-id") if flow.response is not None else None
        key = get_record(flow.metadata).session_key
        sid = key[1] if key is not None and named else named
        if base["session_synthetic"] and sid:
            base["session_id"], base["session_synthetic"] = sid, False

    def _final_events(self, flow: http.HTTPFlow, rec: BastionRecord, st: _FlowState,
                      now: float) -> tuple[list[dict], frozenset[int]]:
        """The exchange's last events, and the ids of those whose payload is the response body
        redaction already scanned clean."""
        ev = st.events
        events = self._c2s_events(st, rec, now)
        if rec.approval is not None and not st.approval_done:
            st.approval_done = True
            events.append(ev.approval(rec.approval, now))
        resp = flow.response
        scanned: frozenset[int] = frozenset()
        status = resp.status_code if resp is not None else None
        if rec.refusal is not None:
            events.append(ev.refusal(rec.refusal, rec.refusal_rule, status, (resp.timestamp_start if resp else None) or now,
                                     http_method=st.http_method, path=st.path, credential=rec.credential_kind))
        if resp is not None and not st.streamed:
            via = "gateway" if rec.refusal is not None else "json"
            t_resp = resp.timestamp_end or now
            s2c = [ev.s2c(m, via, t_resp) for m in _caller_messages(resp, rec)]
            events += s2c
            if rec.response_body_clean and rec.refusal is None:
                scanned = frozenset(map(id, s2c))
            st.response_bytes = len(resp.raw_content or b"")
        profile = next((d.mask_profile for d in rec.decisions if d.mask_profile), None)
        events += [ev.mask(m, profile, now) for m in rec.masks]
        note = None
        if rec.response_messages_dropped:
            note = f"{rec.response_messages_dropped} response message(s) not recorded (limit)"
        events.append(ev.http(
            now, http_method=st.http_method, path=st.path, status=status, request_bytes=st.request_bytes,
            request_sha256=_forwarded_sha256(rec), response_bytes=st.response_bytes,
            latency_ms=_ms(ev.t0, (resp.timestamp_end if resp else None) or now),
            req_headers=st.req_headers, note=note, credential=rec.credential_kind,
            resp_headers=redact_headers(resp.headers.fields, st.extra_redact) if resp is not None else None))
        return events, scanned


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
        whole = not self.parser.pending           # the events this output completes are all in it
        self.rec.stream_chunk_clean = False
        out = self.inner(data) if self.inner is not None else data
        if not isinstance(out, bytes):
            out = b"".join(out)
        clean = whole and self.rec.stream_chunk_clean    # redaction scanned exactly these bytes
        sent = [out] if out else []
        self.st.response_bytes += len(out)
        try:
            events, final = self._events(out, final=not data)
        except Exception as e:  # noqa: BLE001 - unparseable output is passed as is, but noted
            events, final = [self.st.events.http(time.time(), note=f"unrecorded SSE bytes: {type(e).__name__}")], False
        if not events:
            return sent
        scanned = frozenset(map(id, events)) if clean else frozenset()
        fut = self.recorder._submit(events, wait=final, secrets=self.rec.known_secrets, flow=self.st.events,
                                    scanned=scanned)
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
            try:
                items = list(mcpwire.iter_sse_messages(ev))
            except mcpwire.McpParseError:
                events.append(self.st.events.http(now, note="SSE message event that is not JSON"))
                continue
            for item in items:
                e = self.st.events.s2c(item, "sse", now)
                is_final = is_final or e["kind"] in FINAL_KINDS
                events.append(e)
        return events, is_final


def _caller_messages(resp: http.Response, rec: BastionRecord) -> list[Any]:
    """The JSON-RPC messages of a non-streamed response as the caller receives them."""
    if rec.refusal is None and rec.response_messages and not rec.response_messages_dropped:
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
            try:
                out.extend(mcpwire.iter_sse_messages(ev))
            except mcpwire.McpParseError:
                continue
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
