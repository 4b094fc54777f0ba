"""Issue 21: what was checked is what is forwarded and recorded, and nothing secret reaches
mitmweb. A real mitmweb with the bastion addons, the demo server, the SDK client; mitmweb
driven through its own REST API (as its UI does) and watched through its /updates websocket."""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import subprocess
import sys

import pytest
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from demo.client import connect
from tests.e2e.conftest import ROOT
from tests.e2e.test_approval_browser import MitmwebApi
from tests.e2e.test_approval_e2e import POLICY, launches



def approval_id(comment: str) -> str:
    """The approval id in a held flow's comment ("APPROVAL <id> needed, …")."""
    return comment.split("APPROVAL ", 1)[1].split()[0]

def audit(gw, sql: str) -> list[dict]:
    r = subprocess.run([sys.executable, "-m", "addons.cli", "sql", "--store", str(gw.recordings), "--format", "json",
                        sql], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout or "[]")


async def audit_eventually(gw, sql: str, want: int = 1) -> list[dict]:
    for _ in range(50):
        rows = audit(gw, sql)
        if len(rows) >= want:
            return rows
        await asyncio.sleep(0.2)
    return rows


class Watcher:
    """Every message of mitmweb's /updates websocket, and REST reads of the flow list and
    the flow dump every few milliseconds, for as long as the test runs."""

    def __init__(self, gw, web: MitmwebApi):
        self.gw, self.web = gw, web
        self.messages: list[str] = []
        self.rest: list[bytes] = []
        self.dumps = 0

    async def __aenter__(self):
        req = HTTPRequest(f"ws://127.0.0.1:{self.gw.web_port}/updates",
                          headers={"Authorization": f"Bearer {self.gw.web_password}"})
        self.ws = await websocket_connect(req)
        self.tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._poll())]
        return self

    async def _read(self):
        while (msg := await self.ws.read_message()) is not None:
            self.messages.append(msg if isinstance(msg, str) else msg.decode("utf-8", "replace"))

    async def _poll(self):
        n = 0
        while True:
            r = await self.web.http.get("/flows")
            self.rest.append(r.content)
            if n % 5 == 0:
                d = await self.web.http.get("/flows/dump")
                assert d.status_code == 200, d.text      # saving/exporting flows works
                self.rest.append(d.content)
                self.dumps += 1
            n += 1
            await asyncio.sleep(0.02)

    async def __aexit__(self, *exc):
        for t in self.tasks:
            t.cancel()
        self.ws.close()

    def assert_never_seen(self, *secrets: str) -> None:
        blob = "\n".join(self.messages).encode() + b"\n".join(self.rest)
        for s in secrets:
            assert s.encode() not in blob, f"secret …{s[-8:]} seen by a mitmweb watcher"


# plus a slow tool: a call that stays in flight (JSON answer after ~2 s) while watched
WEB_POLICY = POLICY % {"timeout": 60} + """\
  - name: dev-report
    when: {roles: [dev], tool: stream_report}
    allow: true
"""


@pytest.fixture
def web_stack(demo_server, rules_dir, gateway):
    def start(*extra: str):
        demo = demo_server("json")
        gw = gateway(rules_dir(demo, **{"policy.yaml": WEB_POLICY}), web=True, extra_args=extra)
        return demo, gw
    return start


async def test_mitmweb_watchers_never_see_a_token_or_the_service_credential_and_export_works(web_stack):
    from mitmproxy import io as mio
    demo, gw = web_stack()
    dev, approver = gw.token("dan", ["dev"]), gw.token("alice", ["approver"])
    async with MitmwebApi(gw) as web, Watcher(gw, web) as watch, connect(gw.mcp_url(), dev) as c:
        ok = await c.call_tool("run_command", {"command": "echo hi"})                 # in flight, finished
        assert not ok.is_error
        n = len(watch.rest)
        slow = await c.call_tool("stream_report", {"steps": 4, "delay": 0.5})         # ~2 s upstream
        assert not slow.is_error and len(watch.rest) - n > 20                       # read while in flight
        call = asyncio.create_task(c.call_tool("launch_container", {"image": "redis:7"}))   # held
        held = await web.held_flow()
        pid = approval_id(held["comment"])
        await asyncio.sleep(0.5)                                                      # watched while held
        r = await web.http.get(f"/flows/{held['id']}/request/content.data")
        assert b"redis:7" in r.content
        cli = subprocess.run([sys.executable, "-m", "addons.cli", "approve", pid, "--gateway", gw.url,
                              "--token", approver], capture_output=True, text=True, cwd=ROOT, timeout=30)
        assert cli.returncode == 0, cli.stdout + cli.stderr
        res = await asyncio.wait_for(call, 20)
        assert not res.is_error
        await asyncio.sleep(0.5)
        dump = (await web.http.get("/flows/dump")).content
    # the upstream got the credential (it answers 401 without): it was on the wire
    assert [l["image"] for l in launches(demo)] == ["redis:7"]
    assert len(watch.messages) > 5 and watch.dumps > 3 and any("flows/update" in m for m in watch.messages)
    watch.assert_never_seen(dev, approver, demo.token)
    flows = list(mio.FlowReader(io.BytesIO(dump)).stream())                           # a valid flow file
    assert len(flows) >= 3 and all(demo.token not in str(f.get_state()) for f in flows)


def body_sha(demo, needle: str) -> str:
    bodies = [r["body"] for r in demo.received() if needle in r["body"]]
    assert len(bodies) == 1, bodies
    return hashlib.sha256(bodies[0].encode()).hexdigest()


EDITS = {
    "body": {"content": json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "launch_container", "arguments": {"image": "evil:latest", "privileged": True}}})},
    "headers": {"headers": [["content-type", "application/json"], ["accept", "application/json, text/event-stream"],
                            ["mcp-protocol-version", "2025-06-18"], ["x-privileged", "true"]]},
    "path": {"path": "/mcp/demo/../admin"},
}


@pytest.mark.parametrize("mode", ["identified", "console"])
@pytest.mark.parametrize("edit", sorted(EDITS))
async def test_edit_then_resume_of_a_held_call_never_reaches_the_upstream(web_stack, edit, mode):
    demo, gw = web_stack("--set", f"bastion_web_approvals={mode}")
    dev, approver = gw.token("dan", ["dev"]), gw.token("alice", ["approver"])
    async with MitmwebApi(gw) as web, connect(gw.mcp_url(), dev) as c:
        call = asyncio.create_task(c.call_tool("launch_container", {"image": "redis:7"}))
        held = await web.held_flow()
        pid = approval_id(held["comment"])
        r = await web.http.put(f"/flows/{held['id']}", json={"request": EDITS[edit]})     # the UI's edit button
        assert r.status_code == 200, r.text
        r = await web.http.post(f"/flows/{held['id']}/resume")
        assert r.status_code == 200
        if mode == "identified":          # Resume approves nothing; the identified approver does
            await asyncio.sleep(0.5)
            assert not call.done()
            cli = subprocess.run([sys.executable, "-m", "addons.cli", "approve", pid, "--gateway", gw.url,
                                  "--token", approver], capture_output=True, text=True, cwd=ROOT, timeout=30)
            assert cli.returncode == 0, cli.stdout
        with pytest.raises(Exception) as e:
            await asyncio.wait_for(call, 20)
        assert "changed while it was held" in str(e.value)
        # the session still works, and the next (unedited) call is the one approved and forwarded
        assert not (await c.call_tool("run_command", {"command": "true"})).is_error
    assert launches(demo) == [] and "launch_container" not in demo.received_bodies()
    rows = await audit_eventually(gw, "SELECT outcome, approver, approval FROM approvals")
    assert rows[0]["outcome"] == "cancelled"
    approval = json.loads(rows[0]["approval"]) if isinstance(rows[0]["approval"], str) else rows[0]["approval"]
    # the approval names the body the approver was shown, which was never forwarded
    assert approval["request_sha256"] and approval["request_sha256"] not in json.dumps(
        audit(gw, "SELECT request_sha256 FROM exchanges WHERE request_sha256 IS NOT NULL"))


async def test_approved_call_audit_digest_is_the_forwarded_body(web_stack):
    demo, gw = web_stack()
    dev, approver = gw.token("dan", ["dev"]), gw.token("alice", ["approver"])
    async with MitmwebApi(gw) as web, connect(gw.mcp_url(), dev) as c:
        call = asyncio.create_task(c.call_tool("launch_container", {"image": "redis:7"}))
        held = await web.held_flow()
        cli = subprocess.run([sys.executable, "-m", "addons.cli", "approve", approval_id(held["comment"]), "--gateway",
                              gw.url, "--token", approver], capture_output=True, text=True, cwd=ROOT, timeout=30)
        assert cli.returncode == 0
        assert not (await asyncio.wait_for(call, 20)).is_error
    forwarded = body_sha(demo, "launch_container")
    rows = await audit_eventually(gw, "SELECT approver, approval FROM approvals")
    approval = json.loads(rows[0]["approval"]) if isinstance(rows[0]["approval"], str) else rows[0]["approval"]
    assert rows[0]["approver"] == "alice" and approval["request_sha256"] == forwarded
    ex = audit(gw, f"SELECT count(*) AS n FROM exchanges WHERE request_sha256 = '{forwarded}'")
    assert ex == [{"n": 1}]
    # the join docs/approval.md shows
    joined = audit(gw, "SELECT a.approver, e.status FROM approvals a JOIN exchanges e "
                       "ON a.approval->>'request_sha256' = e.request_sha256")
    assert joined == [{"approver": "alice", "status": 200}]


async def test_edit_while_intercepted_after_the_checks_is_refused(web_stack):
    """mitmweb's own intercept filter holds a flow after every bastion check: an edit made
    then is refused, an unedited resume goes through with the credential."""
    demo, gw = web_stack()
    dev = gw.token("dan", ["dev"])
    async with MitmwebApi(gw) as web, connect(gw.mcp_url(), dev) as c:
        r = await web.http.put("/options", json={"intercept": "~q & ~b intercept-me"})
        assert r.status_code == 200, r.text
        for edited in (True, False):
            call = asyncio.create_task(c.call_tool("run_command", {"command": "echo intercept-me"}))
            for _ in range(100):
                flows = [f for f in (await web.http.get("/flows")).json() if f.get("intercepted")]
                if flows:
                    break
                await asyncio.sleep(0.1)
            assert flows, "mitmweb did not intercept"
            fid = flows[-1]["id"]
            if edited:
                body = json.dumps({"jsonrpc": "2.0", "id": 9, "method": "tools/call",
                                   "params": {"name": "run_command", "arguments": {"command": "rm -rf /"}}})
                assert (await web.http.put(f"/flows/{fid}", json={"request": {"content": body}})).status_code == 200
            assert (await web.http.post(f"/flows/{fid}/resume")).status_code == 200
            if edited:
                with pytest.raises(Exception):        # the SDK reports the 409 as an error response
                    await asyncio.wait_for(call, 20)
            else:
                assert not (await asyncio.wait_for(call, 20)).is_error
    assert "rm -rf" not in demo.received_bodies()
    assert demo.received_bodies().count("intercept-me") == 1
    assert "changed while intercepted in mitmweb" in gw.log_text()


async def test_replay_and_duplicate_from_mitmweb_are_checked_again_and_refused(web_stack):
    demo, gw = web_stack()
    async with MitmwebApi(gw) as web, connect(gw.mcp_url(), gw.token("dan", ["dev"])) as c:
        assert not (await c.call_tool("run_command", {"command": "echo replay-me"})).is_error
        flows = (await web.http.get("/flows")).json()
        target = None
        for f in flows:
            body = (await web.http.get(f"/flows/{f['id']}/request/content.data")).content
            if b"replay-me" in body:
                target = f["id"]
        assert target
        before = len(demo.received())
        assert (await web.http.post(f"/flows/{target}/replay")).status_code == 200
        dup = (await web.http.post(f"/flows/{target}/duplicate")).text.strip('"')
        assert (await web.http.post(f"/flows/{dup}/replay")).status_code == 200
        await asyncio.sleep(2)
        statuses = [f.get("response", {}).get("status_code") for f in (await web.http.get("/flows")).json()
                    if f.get("is_replay") == "request"]
    # refused by the chain: the stored request was already pointed upstream (404 unknown path)
    # and holds no caller token (401), so it has no identity either way
    assert len(statuses) == 2 and all(s in (401, 404) for s in statuses), statuses
    assert len(demo.received()) == before                                     # nothing reached the upstream


async def test_saved_flows_hold_no_secret_and_replaying_them_with_mitmdump_is_refused(demo_server, rules_dir, gateway,
                                                                                      tmp_path):
    """`mitmdump -w` writes the flows (no record, no token, no credential); `mitmdump -C`
    replays them through the whole chain: no caller identity, so nothing is forwarded."""
    from mitmproxy import io as mio
    demo = demo_server("json")
    rules = rules_dir(demo, **{"policy.yaml": POLICY % {"timeout": 60}})
    saved = tmp_path / "flows.mitm"
    gw = gateway(rules, extra_args=("-w", str(saved)))
    dev = gw.token("dan", ["dev"])
    async with connect(gw.mcp_url(), dev) as c:
        assert not (await c.call_tool("run_command", {"command": "echo saved"})).is_error
    gw.proc.stop()
    data = saved.read_bytes()
    assert dev.encode() not in data and demo.token.encode() not in data
    flows = list(mio.FlowReader(open(saved, "rb")).stream())
    assert any(b"echo saved" in (f.request.raw_content or b"") for f in flows)
    # pointed back at the gateway's own path (as someone replaying on purpose would), so the
    # replay is judged by identity rather than refused as an unknown path
    with open(saved, "wb") as fh:
        w = mio.FlowWriter(fh)
        for f in flows:
            f.request.path, f.request.host, f.request.port = "/mcp/demo", "127.0.0.1", 1
            w.add(f)
    before = len(demo.received())
    replay = gateway(rules, extra_args=("-C", str(saved), "--set", "client_replay_concurrency=-1"),
                     recordings=tmp_path / "rec2")
    for _ in range(100):
        if replay.log_text().count("<< ") >= len(flows):
            break
        await asyncio.sleep(0.1)
    log = replay.log_text()
    assert log.count("<< ") >= len(flows), log
    assert len(demo.received()) == before, demo.received()[before:]
    assert "<< 200" not in log and log.count("<< 401") >= len(flows) - 1, log   # no caller identity
