"""Issue 10 fault injection: an exception inside each addon, a misbehaving or absent
upstream, identity keys unreachable, an unwritable audit store. Expected every time:
a clear error to the caller, nothing unchecked forwarded, the gateway still up, and the
refusal in the audit store."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest

from tests.e2e import bad_upstream
from tests.e2e.conftest import ROOT, free_port

POLICY = """\
rules:
  - name: e2e-everything
    when: {roles: [e2e-all], method: "*"}
    allow: true
"""
CALL = {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "get_customer", "arguments": {"id": 1}}}
HDRS = {"content-type": "application/json", "accept": "application/json, text/event-stream",
        "mcp-protocol-version": "2025-06-18"}
SSN = "123-45-6789"


def post(gw, token: str | None, body: dict = CALL, connection: str = "demo") -> httpx.Response:
    h = dict(HDRS, **({"authorization": f"Bearer {token}"} if token else {}))
    with httpx.Client(timeout=30) as c:
        return c.post(gw.mcp_url(connection), content=json.dumps(body), headers=h)


def still_up(gw) -> None:
    assert gw.proc.popen.poll() is None, "the gateway process died"
    with httpx.Client(timeout=10) as c:       # still answering HTTP (whatever the fault refuses)
        assert c.get(f"{gw.url}/.well-known/oauth-protected-resource").status_code in (200, 502)


def audited_refusals(gw) -> list[dict]:
    """Refusal events in the audit store (read while the gateway runs, via the CLI)."""
    deadline = time.monotonic() + 10
    while True:
        r = subprocess.run([sys.executable, "-m", "addons.cli", "sql", "--store", str(gw.recordings), "--format",
                            "json", "SELECT rule, reason FROM refusals"], capture_output=True, text=True,
                           cwd=ROOT, timeout=60)
        rows = json.loads(r.stdout or "[]") if r.returncode == 0 else []
        if rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.3)


REQUEST_SIDE = ["addons.hooks.connections:Router.requestheaders", "addons.hooks.identity:Identity.request",
                "addons.hooks.mcpflow:McpParser.request", "addons.hooks.schemacheck:ArgSchema.request", "addons.hooks.policy:Policy.request", "addons.hooks.approval:Approval.request",
                "addons.hooks.masking:Masking.request", "addons.hooks.recorder:Recorder.request",
                "addons.hooks.legacyrefusal:LegacyRefusals.request", "addons.hooks.connections:Injector.request"]


@pytest.mark.parametrize("target", REQUEST_SIDE)
def test_exception_in_a_request_hook_refuses_and_forwards_nothing(demo_server, rules_dir, gateway, target):
    demo = demo_server("stateless")
    gw = gateway(rules_dir(demo, **{"policy.yaml": POLICY}), pre_scripts=(str(ROOT / "tests/e2e/fault_inject.py"),),
                 env={"BASTION_FAULT": target})
    r = post(gw, gw.token("eve", ["e2e-all"]))
    assert r.status_code == 502 and r.json()["error"] == "gateway_error", r.text
    assert demo.client_requests() == []
    assert f"injected fault in {target}" in gw.log_text()
    still_up(gw)


@pytest.mark.parametrize("target", ["addons.hooks.responses:ResponseRewriter.response",
                                    "addons.hooks.responses:ResponseRewriter.responseheaders",
                                    "addons.hooks.recorder:Recorder.response"])
def test_exception_in_a_response_hook_never_releases_the_unchecked_answer(demo_server, rules_dir, gateway, target):
    demo = demo_server("json")     # JSON answers: the SSN is in the body the hook would have masked
    gw = gateway(rules_dir(demo, **{"policy.yaml": POLICY}), pre_scripts=(str(ROOT / "tests/e2e/fault_inject.py"),),
                 env={"BASTION_FAULT": target})
    tok = gw.token("eve", ["e2e-all"])
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "f", "version": "1"}}}
    r = post(gw, tok, init)
    assert r.status_code == 502 and "gateway_error" in r.text
    still_up(gw)


@pytest.fixture
def bad(tmp_path, procs, rules_dir, gateway):
    port = bad_upstream.start(tmp_path, procs)
    dead = free_port()
    conns = {"connections": {name: {"upstream": f"http://127.0.0.1:{port}/{name}"}
                             for name in ("garbage", "html", "truncated", "reset", "slow", "close")}}
    conns["connections"]["down"] = {"upstream": f"http://127.0.0.1:{dead}/mcp"}
    # these stand-ins cannot answer tools/list, so argument validation (which would refuse
    # their calls before forwarding) is off: the forward path's fault handling is under test
    gw = gateway(rules_dir(**{"policy.yaml": POLICY, "connections.yaml": json.dumps(conns)}),
                 extra_args=("--set", "bastion_validate_args=false"))
    return gw, gw.token("eve", ["e2e-all"])


@pytest.mark.parametrize("connection", ["garbage", "html", "truncated"])
def test_unparsable_upstream_answers_are_replaced(bad, connection):
    gw, tok = bad
    r = post(gw, tok, connection=connection)
    assert SSN not in r.text
    assert r.status_code in (200, 502) and ("error" in r.text), r.text
    still_up(gw)


def test_upstream_down(bad):
    gw, tok = bad
    r = post(gw, tok, connection="down")
    assert r.status_code == 502, r.text
    still_up(gw)


def test_upstream_closes_without_answering(bad):
    gw, tok = bad
    r = post(gw, tok, connection="close")
    assert r.status_code == 502 and SSN not in r.text
    still_up(gw)


def test_upstream_reset_mid_stream(bad):
    gw, tok = bad
    with _anything():
        r = post(gw, tok, connection="reset")
        assert SSN not in r.text
    still_up(gw)


def test_slow_upstream_still_answers_masked(bad):
    gw, tok = bad
    t0 = time.monotonic()
    r = post(gw, tok, connection="slow")
    assert r.status_code == 200 and 1.4 < time.monotonic() - t0 < 15
    assert SSN not in r.text and "[MASKED:ssn]" in r.text
    still_up(gw)


class _anything:
    """A reset stream may end as a short answer or a transport error; both are fine."""

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        return et is not None and issubclass(et, httpx.HTTPError)


def test_jwks_down_is_503_not_a_crash(demo_server, rules_dir, gateway):
    demo = demo_server("stateless")
    dead = free_port()
    gw = gateway(rules_dir(demo, **{"policy.yaml": POLICY}),
                 extra_args=("--set", f"bastion_jwks_url=http://127.0.0.1:{dead}/jwks.json",
                             "--set", "bastion_issuer=https://idp.example"))
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec
    tok = jwt.encode({"iss": "https://idp.example", "sub": "eve", "aud": "mcp-bastion", "iat": int(time.time()),
                      "exp": int(time.time()) + 600, "roles": ["e2e-all"]},
                     ec.generate_private_key(ec.SECP256R1()), algorithm="ES256", headers={"kid": "k1"})
    r = post(gw, tok)
    assert r.status_code == 503 and r.headers.get("retry-after"), r.text
    assert demo.received() == []
    still_up(gw)


def test_unwritable_store_at_startup_stops_the_gateway(demo_server, rules_dir, gateway, tmp_path):
    """No audit, no traffic: mitmdump exits on the logged error (a store that fails while
    running answers 503 and recovers: tests/unit/test_recorder.py)."""
    demo = demo_server("stateless")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a regular file where the recordings directory should be")
    try:
        gw = gateway(rules_dir(demo, **{"policy.yaml": POLICY}), recordings=blocker / "recordings")
        gw.proc.popen.wait(15)
        log, code = gw.log_text(), gw.proc.popen.returncode
    except RuntimeError as e:                     # exited before it was seen listening
        log, code = str(e), 1
    assert code != 0
    assert "audit store unavailable" in log and "Not a directory" in log
    assert demo.received() == []


def test_refusals_after_faults_are_audited(demo_server, rules_dir, gateway):
    demo = demo_server("stateless")
    gw = gateway(rules_dir(demo, **{"policy.yaml": POLICY}), pre_scripts=(str(ROOT / "tests/e2e/fault_inject.py"),),
                 env={"BASTION_FAULT": "addons.hooks.masking:Masking.request"})
    assert post(gw, gw.token("eve", ["e2e-all"])).status_code == 502
    rows = audited_refusals(gw)
    assert any("internal error in masking" in (r.get("reason") or "") for r in rows), rows
