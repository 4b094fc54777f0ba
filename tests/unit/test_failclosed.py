"""addons/hooks/failclosed.py: an exception in any bastion addon refuses the flow (HTTP 502 with a
JSON body naming no internals) instead of mitmproxy's default of logging and carrying on."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from mitmproxy import command, http
from mitmproxy.test import taddons, tflow, tutils

from addons.hooks.failclosed import FailClosed
from addons.core.record import get_record

ROOT = Path(__file__).resolve().parents[2]

INTERNAL = "SECRET_INTERNAL_DETAIL /opt/app/addons/x.py line 42"


class Boom:
    name = "boom"

    def __init__(self, hooks=("request",)):
        self.fail = set(hooks)
        self.calls: list[str] = []

    def _maybe(self, hook):
        self.calls.append(hook)
        if hook in self.fail:
            raise RuntimeError(INTERNAL)

    def requestheaders(self, flow):
        self._maybe("requestheaders")

    def request(self, flow):
        self._maybe("request")

    def responseheaders(self, flow):
        self._maybe("responseheaders")

    def response(self, flow):
        self._maybe("response")


class AsyncBoom:
    name = "asyncboom"

    async def request(self, flow):
        raise ValueError(INTERNAL)

    async def response(self, flow):
        raise ValueError(INTERNAL)


def assert_502(f):
    assert f.response.status_code == 502
    assert f.response.headers["content-type"] == "application/json"
    body = json.loads(f.response.content)
    assert body == {"error": "gateway_error", "error_description": "the gateway could not check this request"}
    assert "SECRET_INTERNAL" not in f.response.text
    assert get_record(f.metadata).refusal == "internal error in boom" or \
        get_record(f.metadata).refusal.startswith("internal error in")


@pytest.mark.parametrize("hook", ["requestheaders", "request"])
def test_request_hooks_raising_refuse_with_502(hook, caplog):
    w = FailClosed(Boom((hook,)))
    f = tflow.tflow()
    with caplog.at_level(logging.ERROR):
        getattr(w, hook)(f)
    assert_502(f)
    assert "flow refused (fail closed)" in caplog.text


async def test_async_hooks_raising_refuse_with_502():
    w = FailClosed(AsyncBoom())
    f = tflow.tflow()
    await w.request(f)
    assert_502(f)
    f = tflow.tflow(resp=True)
    await w.response(f)
    assert_502(f)


async def test_cycle_through_mitmproxy_addon_manager():
    w = FailClosed(Boom(("request",)))
    with taddons.context(w) as tctx:
        f = tflow.tflow()
        await tctx.cycle(w, f)
        assert f.response.status_code == 502
        aw = FailClosed(AsyncBoom())
        tctx.master.addons.add(aw)
        f = tflow.tflow()
        await tctx.cycle(aw, f)
        assert f.response.status_code == 502


def test_request_hook_that_set_a_response_then_raised_is_still_refused():
    class Half:
        name = "half"

        def request(self, flow):
            flow.response = http.Response.make(200, b"partial, unchecked")
            raise KeyError("x")
    f = tflow.tflow()
    FailClosed(Half()).request(f)
    assert f.response.status_code == 502 and b"unchecked" not in f.response.content


def test_response_hook_raising_replaces_response():
    w = FailClosed(Boom(("response",)))
    f = tflow.tflow(resp=tutils.tresp(content=b'{"ssn": "123-45-6789"}'))
    w.response(f)
    assert_502(f)
    assert b"123-45" not in f.response.content


def test_responseheaders_raising_discards_the_upstream_body():
    w = FailClosed(Boom(("responseheaders",)))
    f = tflow.tflow(resp=tutils.tresp(content=None))
    w.responseheaders(f)
    assert f.response.status_code == 502 and callable(f.response.stream)
    # mitmproxy now streams the upstream body through the callable: only the 502 body leaves
    chunks = f.response.stream(b'data: {"ssn": "123-45-6789"}\n\n') + f.response.stream(b"more") + f.response.stream(b"")
    assert all(chunks)                      # an empty chunk would end a chunked body
    out = b"".join(chunks)
    assert json.loads(out)["error"] == "gateway_error"
    assert int(f.response.headers["content-length"]) == len(out)


def test_responseheaders_raising_on_a_bodiless_upstream_response_keeps_the_502():
    boom = Boom(("responseheaders",))
    w = FailClosed(boom)
    f = tflow.tflow(resp=tutils.tresp(content=None))
    w.responseheaders(f)
    # a response without body skips streaming: mitmproxy writes b"" into flow.response
    f.response.data.content = b""
    w.response(f)
    assert_502(f)
    assert boom.calls == ["responseheaders", "response"]     # later hooks still run (recorder)


def test_streamed_response_hook_failure_cuts_the_stream_and_kills():
    w = FailClosed(Boom(("response",)))
    f = tflow.tflow(resp=True)
    f.response.stream = lambda data: data
    assert f.killable
    w.response(f)
    assert f.response.stream(b"unchecked") == []
    assert f.error is not None and get_record(f.metadata).refusal


def test_hooks_that_succeed_are_transparent():
    class Ok:
        name = "ok"

        def request(self, flow):
            flow.metadata["seen"] = True
            return "value"
    w = FailClosed(Ok())
    f = tflow.tflow()
    assert w.request(f) == "value" and f.metadata["seen"] and f.response is None
    assert w.wrapped.__class__ is Ok and w.name == "ok"


def test_missing_hooks_stay_missing():
    class OnlyRequest:
        def request(self, flow):
            pass
    w = FailClosed(OnlyRequest())
    assert w.name == "onlyrequest"
    assert hasattr(w, "request")
    for hook in ("requestheaders", "responseheaders", "response", "error", "running"):
        assert not hasattr(w, hook), hook


def test_non_http_flows_do_not_crash():
    w = FailClosed(Boom(("request",)))
    w.request(tflow.ttcpflow())            # logged, nothing to answer


class WithCommands:
    name = "cmdaddon"

    def __init__(self):
        self.configured = []
        self.running_called = False

    def load(self, loader):
        loader.add_option("bastion_test_option", int, 3, "test option")

    def configure(self, updated):
        self.configured.append(set(updated))

    def running(self):
        self.running_called = True

    @command.command("bastion.testcmd")
    def testcmd(self, value: str) -> str:
        return f"got {value}"

    def request(self, flow):
        raise RuntimeError("x")


def test_commands_options_and_lifecycle_pass_through():
    inner = WithCommands()
    w = FailClosed(inner)
    with taddons.context(w) as tctx:
        assert "bastion.testcmd" in tctx.master.commands.commands
        assert tctx.master.commands.execute("bastion.testcmd hello") == "got hello"
        assert tctx.options.bastion_test_option == 3
        tctx.configure(w, bastion_test_option=5)
        assert any("bastion_test_option" in u for u in inner.configured)
        assert tctx.master.addons.get("cmdaddon") is w
        w.running()
        assert inner.running_called
        f = tflow.tflow()
        w.request(f)
        assert f.response.status_code == 502


def test_the_shipped_chain_is_one_pipeline_in_order():
    from addons import bastion
    from addons.hooks.pipeline import Pipeline
    assert [a.name for a in bastion.addons] == ["bastion"]      # mitmproxy sees one addon
    p = bastion.addons[0]
    assert isinstance(p, Pipeline) and not hasattr(p, "addons")  # no nested children to walk
    names = [s.name for s in p.stages]
    assert names[0] == "connections" and names[-1] == "injector"
    assert "mcp" in names and "responses" in names
    assert names.index("mcp") < names.index("responses") < names.index("injector")
    assert names.index("identity") < names.index("policy") < names.index("approval") < names.index("recorder")


def test_stages_share_one_registry_and_pin_store():
    from addons import bastion
    stages = {s.name: s for s in bastion.build_stages()}
    reg = stages["connections"].registry
    assert all(stages[n].registry is reg for n in ("identity", "argschema", "policy", "integrity", "responses",
                                                   "recorder", "injector"))
    assert stages["argschema"].pins is stages["integrity"].pins
    assert stages["policy"].approvals and stages["injector"].identity_required


def test_production_script_has_no_stage_switch(tmp_path):
    """BASTION_SKIP (once a way to switch masking and recording off) has no effect; the
    production script builds every stage or fails to import."""
    import subprocess
    import sys
    probe = ("import sys; sys.argv = ['x']\n"
             "import runpy; ns = runpy.run_path('addons/bastion.py')\n"
             "print(','.join(s.name for s in ns['addons'][0].stages))")
    env = {"BASTION_SKIP": "masking,recorder,identity,policy", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    names = out.stdout.strip().split(",")
    assert {"masking", "recorder", "identity", "policy"} <= set(names), names
