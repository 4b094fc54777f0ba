"""Metrics counted from bastion records; no values in labels; the endpoint is off by default."""
from __future__ import annotations

from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow, tutils
from prometheus_client import generate_latest

import pytest

from addons import mcp
from addons.metrics import GatewayMetrics, Metrics
from addons.record import Decision, MaskEvent, get_record


def _flow(tool: str, action: str | None, rule: str | None = None, masks=(), refusal: str | None = None):
    f = tflow.tflow(resp=True)
    rec = get_record(f.metadata)
    rec.connection = "demo"
    rec.messages = [mcp.parse_message({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
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


def test_unknown_methods_collapse_to_a_bounded_label():
    m = GatewayMetrics()
    f = _flow("t", "deny")
    rec = get_record(f.metadata)
    rec.messages = [mcp.Message(kind="request", raw={}, id=1, method="evil/" + "x" * 50)]
    m.observe(rec, 0.01)
    assert _value(m, 'bastion_requests_total{connection="demo",decision="deny",method="other"}') == 1


def test_off_by_default_and_port_validated():
    a = Metrics()
    with taddons.context(a) as tctx:
        a.running()
        assert a.server is None
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(a, bastion_metrics_port=70000)
