"""Metrics counted from bastion records; no values in labels; the endpoint is off by default."""
from __future__ import annotations

import socket
from types import SimpleNamespace

import httpx
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow
from prometheus_client import generate_latest

import pytest

from addons.core import mcpwire
from addons.hooks.approval import Approval
from addons.hooks.metrics import GatewayMetrics, Metrics
from addons.hooks.recorder import Recorder
from addons.core.record import Decision, MaskEvent, get_record
from addons.core.audit.store import StoreWriter
from tests.e2e.procs import free_port


def _flow(tool: str, action: str | None, rule: str | None = None, masks=(), refusal: str | None = None):
    f = tflow.tflow(resp=True)
    rec = get_record(f.metadata)
    rec.connection = "demo"
    rec.messages = [mcpwire.parse_message({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                                       "params": {"name": tool, "arguments": {"sql": "SELECT '123-45-6789'"}}})]
    if action:
        rec.decisions = [Decision(action, rule)]
    rec.masks = list(masks)
    if refusal:
        rec.refuse(refusal, rule)
    return f


def _value(m: GatewayMetrics, text: str) -> float:
    for line in generate_latest(m.registry).decode().splitlines():
        if line.startswith(text + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_counts_decisions_refusals_masks_latency():
    a = Metrics()
    with taddons.context(a):
        a.response(_flow("get_customer", "allow", "r1", masks=[MaskEvent("$.ssn", "ssn", 3)]))
        a.response(_flow("run_command", "deny", "dev-no-shell", refusal="denied"))
        a.error(_flow("x", None, refusal="invalid token"))
        f = _flow("get_customer", "allow")
        a.response(f)
        a.response(f)                                       # counted once per flow
    m = a.m
    assert _value(m, 'bastion_requests_total{connection="demo",decision="allow",method="tools/call"}') == 2
    assert _value(m, 'bastion_requests_total{connection="demo",decision="deny",method="tools/call"}') == 1
    assert _value(m, 'bastion_refusals_total{rule="dev-no-shell"}') == 1
    assert _value(m, 'bastion_refusals_total{rule="token"}') == 1
    assert _value(m, 'bastion_masked_values_total{type="ssn"}') == 3
    assert _value(m, 'bastion_request_seconds_count{connection="demo"}') == 4
    text = generate_latest(m.registry).decode()
    assert "123-45-6789" not in text and "get_customer" not in text     # never values or arguments


def test_remembered_series_are_bounded_and_every_call_still_counts(monkeypatch):
    from addons.hooks import metrics as metrics_mod
    monkeypatch.setattr(metrics_mod, "MAX_CHILDREN", 3)
    m = GatewayMetrics()
    for i in range(12):
        rec = get_record(_flow("t", "allow").metadata)
        rec.connection = f"c{i % 4}"
        m.observe(rec, 0.01)
        assert len(m._children) <= 3
    for c in range(4):
        assert _value(m, f'bastion_requests_total{{connection="c{c}",decision="allow",method="tools/call"}}') == 3
        assert _value(m, f'bastion_request_seconds_count{{connection="c{c}"}}') == 3


def test_unknown_methods_collapse_to_a_bounded_label():
    m = GatewayMetrics()
    f = _flow("t", "deny")
    rec = get_record(f.metadata)
    rec.messages = [mcpwire.Message(kind="request", raw={}, id=1, method="evil/" + "x" * 50)]
    m.observe(rec, 0.01)
    assert _value(m, 'bastion_requests_total{connection="demo",decision="deny",method="other"}') == 1


def test_off_by_default_and_port_validated():
    a = Metrics()
    with taddons.context(a) as tctx:
        a.running()
        assert a.server is None
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(a, bastion_metrics_port=70000)


def _approval(outcomes) -> Approval:
    a = Approval()
    a.pending = {str(i): SimpleNamespace(outcome=o) for i, o in enumerate(outcomes)}
    return a


def _recorder(writer) -> Recorder:
    r = Recorder()
    r.writer = writer
    return r


def _scrape(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


async def test_live_values_read_from_approval_and_recorder(tmp_path):
    writer = StoreWriter(tmp_path, "t")
    a = Metrics(live=(_approval([None, None, "approved"]).live_metrics, _recorder(writer).live_metrics))
    with taddons.context(a):
        writer.start()
        try:
            writer.submit([b'{"e": 1}\n'], wait=True).result(10)
            assert _value(a.m, "bastion_approvals_pending") == 2      # decided holds are not pending
            assert _value(a.m, "bastion_recorder_healthy") == 1
            assert _value(a.m, "bastion_recorder_events_total") >= 1
            assert _value(a.m, "bastion_recorder_errors_total") == 0
            assert _value(a.m, "bastion_recorder_queue") == 0
            text = generate_latest(a.m.registry).decode()
            assert "# TYPE bastion_recorder_errors_total counter" in text
            assert "# TYPE bastion_recorder_queue gauge" in text
        finally:
            writer.close()


async def test_live_values_absent_without_the_addons_and_never_fail_a_scrape(caplog):
    a = Metrics()
    with taddons.context(a):
        assert "bastion_approvals_pending" not in generate_latest(a.m.registry).decode()
    b = Metrics(live=(_recorder(SimpleNamespace()).live_metrics,))
    with taddons.context(b):                                      # a writer without stats
        text = generate_latest(b.m.registry).decode()             # logged, no exception
    assert "bastion_recorder" not in text
    assert "reading live metrics failed" in caplog.text


async def test_a_broken_record_never_raises_into_the_flow(monkeypatch, caplog):
    a = Metrics()
    with taddons.context(a):
        monkeypatch.setattr(a.m, "observe", lambda *_: 1 / 0)
        f = _flow("get_customer", "allow")
        a.response(f)                                             # logged, not raised
        assert f.response.status_code == 200
        assert "metrics update failed" in caplog.text


def test_endpoint_served_on_its_own_port_and_stopped_in_done():
    port = free_port()
    a = Metrics()
    with taddons.context(a) as tctx:
        tctx.configure(a, bastion_metrics_port=port)
        a.running()
        a.response(_flow("run_command", "deny", "dev-no-shell", refusal="denied"))
        text = _scrape(port)
        assert 'bastion_refusals_total{rule="dev-no-shell"} 1.0' in text
        assert 'bastion_requests_total{connection="demo",decision="deny",method="tools/call"} 1.0' in text
        other = free_port()
        tctx.configure(a, bastion_metrics_port=other)            # rebinds at runtime
        assert "bastion_refusals_total" in _scrape(other)
        with pytest.raises(httpx.TransportError):
            _scrape(port)
        a.done()
        assert a.server is None
        with pytest.raises(httpx.TransportError):
            _scrape(other)


async def test_port_in_use_is_logged_not_fatal(caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        a = Metrics()
        with taddons.context(a) as tctx:
            tctx.configure(a, bastion_metrics_port=port)
            a.running()
            assert a.server is None
            assert "metrics endpoint not started" in caplog.text


def test_mask_type_labels_are_bounded():
    """Untyped mask rules tag with the field name, which the upstream chooses: cap the labels."""
    m = GatewayMetrics()
    rec = get_record(_flow("t", "allow").metadata)
    rec.masks = [MaskEvent("$.x", f"field{i}", 1) for i in range(200)] + [MaskEvent("$.y", "bad label\n", 1)]
    m.observe(rec, None)
    text = generate_latest(m.registry).decode()
    assert text.count("bastion_masked_values_total{") <= 65
    assert _value(m, 'bastion_masked_values_total{type="other"}') == 200 - 64 + 1
    assert "bad label" not in text
