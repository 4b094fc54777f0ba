"""The `metrics` addon: Prometheus metrics on a separate admin port.

Off by default (`bastion_metrics_port=0`). Counted from each flow's bastion record when
the flow ends, so the figures are what the gateway decided and did, and never a value:
labels are connection names, MCP methods, decisions, rule names and mask types. Label
sets are bounded (unknown methods collapse to "other", rule names come from the rules, mask
types are capped).
"""
from __future__ import annotations

import re
import threading
from typing import Callable, Iterator, Sequence
from wsgiref.simple_server import WSGIServer

from mitmproxy import ctx, exceptions, http
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from addons.core import mcpwire
from addons.core.record import BastionRecord, get_record
from addons.core.textsafe import get_logger

log = get_logger("bastion.metrics")

KNOWN_METHODS = mcpwire.CLIENT_REQUEST_METHODS | mcpwire.CLIENT_NOTIFICATION_METHODS
MAX_MASK_TYPES = 64                  # mask types may be field names from upstream data: bound them
MASK_TYPE_RE = re.compile(r"[A-Za-z0-9_.-]{1,40}")
MAX_CHILDREN = 10_000               # labelled series remembered by GatewayMetrics.child
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120)


class GatewayMetrics:
    """The metric families, in a registry of their own (no global state)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("bastion_requests", "MCP messages by connection, method and decision",
                                ["connection", "method", "decision"], registry=r)
        self.refusals = Counter("bastion_refusals", "Requests the gateway answered itself, by rule",
                                ["rule"], registry=r)
        self.masked = Counter("bastion_masked_values", "Values masked in responses, by type", ["type"], registry=r)
        self.latency = Histogram("bastion_request_seconds", "Request start to response end, by connection",
                                 ["connection"], buckets=LATENCY_BUCKETS, registry=r)
        self._mask_types: set[str] = set()
        self._children: dict[tuple, object] = {}     # (metric, label values) -> its series

    def child(self, metric, *values: str):
        """metric.labels(*values), remembered: prometheus_client takes a lock and checks the
        values on every labels() call (most of a small call's metrics cost). The series
        themselves live as long as the metric, so an entry never goes stale; bounded."""
        key = (metric, values)
        series = self._children.get(key)
        if series is None:
            if len(self._children) >= MAX_CHILDREN:
                self._children.clear()
            series = self._children[key] = metric.labels(*values)
        return series

    def live(self, read: Callable[[], dict[str, float]]) -> None:
        """Values read from the other addons at scrape time (they keep the state, not us)."""
        self.registry.register(_Live(read))

    def observe(self, rec: BastionRecord, duration: float | None) -> None:
        conn = rec.connection or "-"
        for i, m in enumerate(rec.messages):
            d = rec.decisions[i] if i < len(rec.decisions) else None
            method = m.method if m.method in KNOWN_METHODS else ("response" if m.method is None else "other")
            self.child(self.requests, conn, method, d.action if d else "none").inc()
        if rec.refusal is not None:
            self.child(self.refusals, rec.refusal_rule or _refusal_kind(rec.refusal)).inc()
        masked: dict[str, int] = {}         # one increment per type, not per (path, type)
        for ev in rec.masks:
            label = self._mask_type(ev.type)
            masked[label] = masked.get(label, 0) + ev.count
        for label, count in masked.items():
            self.child(self.masked, label).inc(count)
        if duration is not None and rec.connection is not None:
            self.child(self.latency, conn).observe(max(duration, 0.0))

    def _mask_type(self, t: str) -> str:
        """A bounded label: untyped rules tag a mask with the (upstream-chosen) field name."""
        if t in self._mask_types:
            return t
        if not MASK_TYPE_RE.fullmatch(t) or len(self._mask_types) >= MAX_MASK_TYPES:
            return "other"
        self._mask_types.add(t)
        return t


# name -> (kind, help). Counters are exposed with the `_total` suffix.
LIVE = {
    "bastion_approvals_pending": ("gauge", "Calls held for a human decision"),
    "bastion_recorder_queue": ("gauge", "Audit commits waiting for the background fdatasync (bastion_audit_sync=fsync: the recorder lag)"),
    "bastion_recorder_healthy": ("gauge", "1 while the audit store accepts writes"),
    "bastion_state_up": ("gauge", "1 while the shared state engine (bastion_state) answers; 1 when embedded"),
    "bastion_state_shared": ("gauge", "1 when approvals and limits live in a shared state engine (bastion_state)"),
    "bastion_recorder_events": ("counter", "Events written to the audit journal since start"),
    "bastion_recorder_errors": ("counter", "Audit store write failures since start"),
}


class _Live:
    def __init__(self, read: Callable[[], dict[str, float]]):
        self.read = read

    def describe(self) -> list:
        return []               # names vary with the addons loaded: no registration-time check

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        try:
            values = self.read()
        except Exception:  # noqa: BLE001 - a scrape must not fail because another addon changed
            log.exception("reading live metrics failed")
            return
        for name, (kind, doc) in LIVE.items():
            if name in values:
                family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                yield family(name, doc, value=values[name])


def _refusal_kind(reason: str) -> str:
    """Refusals without a rule (parse errors, authentication): a bounded label."""
    r = reason.lower()
    for kind in ("default-deny", "token", "audit store", "internal error", "unsafe", "body", "session", "origin", "path"):
        if kind in r:
            return kind.replace(" ", "-")
    return "other"


class Metrics:
    name = "metrics"

    def __init__(self, live: Sequence[Callable[[], dict[str, float]]] = ()) -> None:
        # live: read-only gauges of other stages (approval, recorder), read on each scrape
        self.live_sources = tuple(live)
        self.m = GatewayMetrics()
        self.m.live(self._read_live)
        self.server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._running = False

    def load(self, loader):
        loader.add_option("bastion_metrics_port", int, 0,
                          "Serve Prometheus metrics at http://HOST:PORT/metrics (0 = off).")
        loader.add_option("bastion_metrics_host", str, "127.0.0.1", "Address the metrics endpoint binds to.")

    def configure(self, updated):
        if "bastion_metrics_port" in updated and not 0 <= ctx.options.bastion_metrics_port <= 65535:
            raise exceptions.OptionsError("bastion_metrics_port must be 0 (off) or a TCP port")
        if self._running and updated & {"bastion_metrics_port", "bastion_metrics_host"}:
            self._stop()        # options changed at runtime (mitmweb): rebind
            self._start()

    def running(self):
        self._running = True
        self._start()

    def _start(self) -> None:
        port = ctx.options.bastion_metrics_port
        if not port or self.server is not None:
            return
        try:
            self.server, self._thread = start_http_server(port, ctx.options.bastion_metrics_host,
                                                          registry=self.m.registry)
        except OSError as e:
            log.error("metrics endpoint not started on %s:%s: %s", ctx.options.bastion_metrics_host, port, e)
            return
        log.info("metrics at http://%s:%s/metrics", ctx.options.bastion_metrics_host, port)

    def _read_live(self) -> dict[str, float]:
        """The other stages' live gauges (scrape thread: each source only reads)."""
        out: dict[str, float] = {}
        for read in self.live_sources:
            out.update(read())
        return out

    def done(self):
        self._running = False
        self._stop()

    def _stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def response(self, flow: http.HTTPFlow) -> None:
        self._observe(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._observe(flow)

    def _observe(self, flow: http.HTTPFlow) -> None:
        try:
            rec = get_record(flow.metadata)
            if rec.metrics_counted or (rec.connection is None and rec.refusal is None):
                return          # counted already, or not an MCP exchange (metadata, admin API)
            rec.metrics_counted = True
            end = flow.response.timestamp_end if flow.response is not None else None
            start = flow.request.timestamp_start
            self.m.observe(rec, (end - start) if end and start else None)
        except Exception:  # noqa: BLE001 - metrics must never refuse or alter a flow
            log.exception("metrics update failed")
