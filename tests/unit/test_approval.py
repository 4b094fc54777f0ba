"""Approval addon: hold with mitmproxy interception, decisions (admin API, mitmweb resume/kill,
commands), timeout, disconnect, self-approval and role checks, grants, webhook, masking of
what the approver sees, and that waiting calls never hold up other traffic."""
from __future__ import annotations

import asyncio
import json
import time

import pytest
from mitmproxy import exceptions
from mitmproxy.connection import ConnectionState
from mitmproxy.test import taddons, tflow, tutils

from addons.core.masking import engine as maskcore

from addons.core import mcpwire
from addons.hooks.approval import (APPROVAL_CANCELLED, APPROVAL_DENIED, APPROVAL_TIMEOUT, WEB_CONSOLE, Approval, Grants,
                             display_arguments, fingerprint, redact_secret_keys)
from addons.hooks.failclosed import FailClosed
from addons.hooks.httputil import checked_snapshot
from addons.core.record import Decision, Identity, get_record

SECRET = "hunter2-Sup3rSecret"


def call_flow(tool="launch_container", args=None, sub="dan", roles=("dev",), msg_id=7, action="approve",
              approvers=("approver",), timeout=None, batch=None):
    body = batch or {"jsonrpc": "2.0", "id": msg_id, "method": "tools/call",
                     "params": {"name": tool, "arguments": {"image": "postgres:17"} if args is None else args}}
    f = tflow.tflow(req=tutils.treq(method=b"POST", path=b"/mcp/demo", content=json.dumps(body).encode(),
                                    headers=((b"content-type", b"application/json"),)))
    rec = get_record(f.metadata)
    rec.connection = "demo"
    rec.identity = Identity(sub=sub, roles=tuple(roles))
    parsed = mcpwire.parse_body(f.request.content)
    rec.messages, rec.batch = parsed.messages, parsed.batch
    rec.decisions = [Decision(action, "needs-approval" if action == "approve" else "r", approvers=tuple(approvers),
                              timeout=timeout, message_id=m.id) for m in parsed.messages]
    rec.checked = checked_snapshot(f.request)
    return f, rec


def admin_flow(path="/_bastion/approvals", method="GET", sub="alice", roles=("approver",), body=None):
    f = tflow.tflow(req=tutils.treq(method=method.encode(), path=path.encode(),
                                    content=json.dumps(body).encode() if body is not None else b""))
    rec = get_record(f.metadata)
    if sub is not None:
        rec.identity = Identity(sub=sub, roles=tuple(roles))
    return f


@pytest.fixture
def approval():
    a = Approval()
    with taddons.context(a) as tctx:
        tctx.configure(a, bastion_approval_timeout=5.0)
        yield a, tctx


async def hold(a: Approval, flow) -> tuple[asyncio.Task, str]:
    """Start the request hook and return once the flow is waiting."""
    task = asyncio.create_task(a.request(flow))
    for _ in range(200):
        pid = flow.metadata.get("bastion_approval_id")
        if pid in a.pending:
            return task, pid
        assert not task.done(), "flow was not held"
        await asyncio.sleep(0.005)
    raise AssertionError("flow never held")


def body(flow) -> dict:
    return json.loads(flow.response.content)


async def admin(a: Approval, **kw):
    f = admin_flow(**kw)
    await a.request(f)
    return f.response.status_code, json.loads(f.response.content)


# --- pure helpers -------------------------------------------------------------------------

def test_redact_secret_keys():
    out = redact_secret_keys({"image": "x", "env": {"DB_PASSWORD": SECRET, "api_key": SECRET},
                              "list": [{"token": SECRET}], "n": 3})
    assert SECRET not in json.dumps(out)
    assert out["image"] == "x" and out["n"] == 3 and out["env"]["DB_PASSWORD"] == "[MASKED]"


def test_display_arguments_applies_detectors_profiles_and_key_redaction():
    shown = display_arguments({"note": "mail alice.martin@example.com", "password": SECRET, "image": "redis:7"})
    text = json.dumps(shown)
    assert "alice.martin@example.com" not in text and SECRET not in text and "redis:7" in text
    prof = maskcore.Profile("p", [maskcore.Rule("img", "redact", fields=("image",))])
    assert "redis:7" not in json.dumps(display_arguments({"image": "redis:7"}, [prof]))


def test_display_arguments_fails_closed(monkeypatch):
    def boom(*a, **k):
        raise maskcore.MaskError("nope")
    monkeypatch.setattr(maskcore, "mask_value", boom)
    assert display_arguments({"image": "redis:7"}) == "[arguments hidden: could not be masked]"


def test_fingerprint_is_identity_connection_tool_and_canonical_arguments():
    _, r1 = call_flow(args={"a": 1, "b": 2})
    _, r2 = call_flow(args={"b": 2, "a": 1}, msg_id=99)          # key order and id do not matter
    _, other_sub = call_flow(args={"a": 1, "b": 2}, sub="eve")
    _, other_args = call_flow(args={"a": 1, "b": 3})
    _, other_tool = call_flow(tool="drop_table", args={"a": 1, "b": 2})
    _, other_conn = call_flow(args={"a": 1, "b": 2})
    other_conn.connection = "prod"
    assert fingerprint(r1) == fingerprint(r2)
    assert len({fingerprint(r) for r in (r1, other_sub, other_args, other_tool, other_conn)}) == 5


def test_grants_expire_and_are_bounded():
    g = Grants(limit=3)
    g.add("a", 10, now=0)
    assert g.valid("a", now=5) and not g.valid("a", now=11) and not g.valid("a", now=5)  # expired entries go
    for k in "bcde":
        g.add(k, 10, now=0)
    assert len(g) == 3 and not g.valid("b", now=1) and g.valid("e", now=1)


# --- options ---------------------------------------------------------------------------------

def test_configure_rejects_bad_values(approval):
    a, tctx = approval
    with pytest.raises(exceptions.OptionsError):
        tctx.configure(a, bastion_approval_timeout=0.0)
    with pytest.raises(exceptions.OptionsError):
        tctx.configure(a, bastion_approval_grant_ttl=-1.0)
    with pytest.raises(exceptions.OptionsError):
        tctx.configure(a, bastion_approval_webhook="file:///etc/passwd")
    tctx.configure(a, bastion_approval_webhook="https://chat.example/hook", bastion_approval_grant_ttl=60.0)


# --- the hold ---------------------------------------------------------------------------------

async def test_allowed_and_refused_flows_pass_untouched(approval):
    a, _ = approval
    f, rec = call_flow(action="allow")
    await a.request(f)
    assert not f.intercepted and f.response is None and rec.approval is None
    f, rec = call_flow()
    f.response = tutils.tresp()            # policy already refused
    await a.request(f)
    assert not f.intercepted and rec.approval is None and not a.pending


async def test_held_flow_is_intercepted_marked_and_commented(approval):
    a, _ = approval
    f, rec = call_flow(args={"image": "postgres:17", "env": {"DB_PASSWORD": SECRET}}, roles=("dev", "ops"))
    task, pid = await hold(a, f)
    assert f.intercepted and not f.marked                 # mitmweb shows interception itself; no emoji
    first = f.comment.splitlines()[0]
    assert first.startswith("HELD dan -> launch_container | rule needs-approval | until ") and first.endswith(f"| id {pid}")
    for needle in (pid, "dan", "dev, ops", "demo", "launch_container", "postgres:17", "needs-approval",
                   "approver", "Deadline:"):
        assert needle in f.comment, needle
    assert SECRET not in f.comment                       # the approver never sees secrets
    assert SECRET not in json.dumps(a.pending[pid].public())
    a.decide(pid, "approved", "alice")
    await asyncio.wait_for(task, 2)
    assert not f.intercepted and f.response is None and not f.marked
    assert f.comment.startswith(f"APPROVED dan -> launch_container | rule needs-approval | by alice | id {pid}")
    assert rec.approval["outcome"] == "approved" and rec.approval["approver"] == "alice" and rec.approval["id"] == pid
    assert not a.pending and "Outcome: approved by alice" in f.comment


async def test_denied_gets_jsonrpc_error_with_id_and_reason(approval):
    a, _ = approval
    f, rec = call_flow(msg_id="req-1")
    task, pid = await hold(a, f)
    a.decide(pid, "denied", "alice", "not in a change window")
    await asyncio.wait_for(task, 2)
    assert f.response.status_code == 200
    err = body(f)
    assert err["id"] == "req-1" and err["error"]["code"] == APPROVAL_DENIED
    assert "approval denied" in err["error"]["message"] and "change window" in err["error"]["message"]
    assert rec.approval["outcome"] == "denied" and rec.approval["reason"] == "not in a change window"
    assert rec.refusal is not None and not f.intercepted


async def test_timeout_per_rule(approval):
    a, _ = approval
    f, rec = call_flow(timeout=0.3)
    t0 = time.monotonic()
    await asyncio.wait_for(a.request(f), 3)
    assert 0.25 <= time.monotonic() - t0 < 1.5
    err = body(f)
    assert f.response.status_code == 200 and err["id"] == 7
    assert err["error"]["code"] == APPROVAL_TIMEOUT and "approval timed out" in err["error"]["message"]
    assert rec.approval["outcome"] == "timeout" and rec.approval["approver"] is None
    assert f.comment.startswith("EXPIRED -32034 dan -> launch_container | rule needs-approval | - | id ")


async def test_default_timeout_from_option(approval):
    a, tctx = approval
    tctx.configure(a, bastion_approval_timeout=0.2)
    f, rec = call_flow()
    await asyncio.wait_for(a.request(f), 3)
    assert rec.approval["outcome"] == "timeout"


async def test_mitmweb_resume_is_not_an_approval_by_default(approval):
    a, _ = approval
    f, rec = call_flow()
    task, pid = await hold(a, f)
    f.resume()                                     # what mitmweb's Resume button does
    await asyncio.sleep(0.3)
    assert not task.done() and f.intercepted and a.pending[pid].outcome is None   # still held
    a.approve_cmd([f])                             # nor is the command bar (shared password)
    await asyncio.sleep(0.15)
    assert not task.done()
    status, out = await admin(a, path=f"/_bastion/approvals/{pid}/approve", method="POST")
    assert status == 200
    await asyncio.wait_for(task, 2)
    assert f.response is None and rec.approval["outcome"] == "approved" and rec.approval["approver"] == "alice"
    assert rec.approval["request_sha256"] == rec.checked.body_sha256


async def test_mitmweb_resume_approves_in_console_mode(approval):
    a, tctx = approval
    tctx.configure(a, bastion_web_approvals="console")
    f, rec = call_flow()
    task, _ = await hold(a, f)
    f.resume()
    await asyncio.wait_for(task, 2)
    assert f.response is None and rec.approval["outcome"] == "approved"
    assert rec.approval["approver"] == WEB_CONSOLE


@pytest.mark.parametrize("edit", [
    lambda r: setattr(r, "content", r.content.replace(b"postgres:17", b"alpine:3\",\"privileged\":true,\"x\":\"")),
    lambda r: setattr(r, "path", "/mcp/other"),
    lambda r: r.headers.__setitem__("mcp-name", "run_command"),
])
async def test_an_edit_while_held_voids_the_approval(approval, edit):
    a, _ = approval
    f, rec = call_flow()
    task, pid = await hold(a, f)
    f.backup()
    edit(f.request)                                # mitmweb's flow editor, while held
    status, _ = await admin(a, path=f"/_bastion/approvals/{pid}/approve", method="POST")
    assert status == 200
    await asyncio.wait_for(task, 2)
    assert rec.approval["outcome"] == "cancelled" and "changed while it was held" in rec.approval["reason"]
    assert body(f)["error"]["code"] == APPROVAL_CANCELLED and body(f)["id"] == 7


async def test_mitmweb_kill_denies_with_jsonrpc_error_not_a_reset(approval):
    a, _ = approval
    f, rec = call_flow()
    task, _ = await hold(a, f)
    f.kill()                                       # mitmweb's Abort / flow.kill
    await asyncio.wait_for(task, 2)
    assert f.error is None and f.live               # the proxy will send our answer instead of resetting
    assert body(f)["error"]["code"] == APPROVAL_DENIED and rec.approval["outcome"] == "denied"
    assert rec.approval["approver"] == WEB_CONSOLE and "killed" in rec.approval["reason"]


async def test_commands_approve_and_deny(approval):
    a, tctx = approval
    tctx.configure(a, bastion_web_approvals="console")
    f1, r1 = call_flow()
    f2, r2 = call_flow()
    t1, _ = await hold(a, f1)
    t2, _ = await hold(a, f2)
    a.approve_cmd([f1])
    a.deny_cmd([f2], "no containers on fridays")
    await asyncio.wait_for(asyncio.gather(t1, t2), 2)
    assert r1.approval["outcome"] == "approved" and f1.response is None
    assert r2.approval["outcome"] == "denied" and "fridays" in body(f2)["error"]["message"]
    a.deny_cmd([f2], "again")                       # already decided: ignored, no crash


async def test_commands_are_registered_through_failclosed():
    a = Approval()
    with taddons.context(FailClosed(a)) as tctx:
        assert "bastion.approve" in tctx.master.commands.commands
        assert "bastion.deny" in tctx.master.commands.commands


async def test_client_disconnect_cancels_the_hold(approval):
    a, _ = approval
    f, rec = call_flow()
    task, pid = await hold(a, f)
    f.client_conn.state = ConnectionState.CLOSED
    await asyncio.wait_for(task, 2)
    assert rec.approval["outcome"] == "cancelled" and "disconnected" in rec.approval["reason"]
    assert pid not in a.pending and body(f)["error"]["code"] == APPROVAL_CANCELLED


async def test_shutdown_cancels_pending_holds(approval):
    a, _ = approval
    f, rec = call_flow()
    task, _ = await hold(a, f)
    a.done()
    await asyncio.wait_for(task, 2)
    assert rec.approval["outcome"] == "cancelled" and f.response is not None


async def test_batch_with_one_approve_holds_all_and_denies_all(approval):
    a, _ = approval
    batch = [{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "launch_container", "arguments": {}}},
             {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "run_command", "arguments": {}}}]
    f, rec = call_flow(batch=batch)
    rec.decisions[1] = Decision("allow", "r", message_id=2)
    task, pid = await hold(a, f)
    a.decide(pid, "denied", "alice")
    await asyncio.wait_for(task, 2)
    errs = body(f)
    assert isinstance(errs, list) and [e["id"] for e in errs] == [1, 2]


async def test_exception_while_waiting_fails_closed_and_releases_the_flow(approval, monkeypatch):
    a, _ = approval
    wrapped = FailClosed(a)

    async def broken(p):
        raise RuntimeError("boom")
    monkeypatch.setattr(a, "_wait", broken)
    f, rec = call_flow()
    await wrapped.request(f)
    assert f.response.status_code == 502 and not f.intercepted
    assert rec.approval["outcome"] == "cancelled" and not a.pending


# --- admin API ----------------------------------------------------------------------------------

async def test_admin_requires_identity(approval):
    a, _ = approval
    status, data = await admin(a, sub=None)
    assert status == 401


async def test_admin_lists_only_what_the_caller_may_approve(approval):
    a, _ = approval
    f, _ = call_flow(args={"image": "x", "password": SECRET})
    task, pid = await hold(a, f)
    status, data = await admin(a)
    assert status == 200 and [p["id"] for p in data["pending"]] == [pid]
    item = data["pending"][0]
    assert item["requester"] == "dan" and item["rule"] == "needs-approval" and item["calls"][0]["target"] == "launch_container"
    assert SECRET not in json.dumps(data)
    status, data = await admin(a, sub="bob", roles=("analyst",))
    assert status == 200 and data["pending"] == []
    a.decide(pid, "denied", "alice")
    await task


async def test_requester_cannot_approve_own_request_even_with_the_role(approval):
    a, _ = approval
    f, rec = call_flow(sub="dan", roles=("dev", "approver"))
    task, pid = await hold(a, f)
    status, data = await admin(a, path=f"/_bastion/approvals/{pid}/approve", method="POST", sub="dan",
                               roles=("dev", "approver"))
    assert status == 403 and "own request" in data["error_description"]
    assert pid in a.pending and f.intercepted and not task.done()   # still waiting
    a.decide(pid, "denied", "alice")
    await task


async def test_approver_role_required(approval):
    a, _ = approval
    f, _ = call_flow()
    task, pid = await hold(a, f)
    status, data = await admin(a, path=f"/_bastion/approvals/{pid}/approve", method="POST", sub="bob",
                               roles=("dev",))
    assert status == 403 and data["error"] == "insufficient_scope"
    assert pid in a.pending and not task.done()
    a.decide(pid, "denied", "alice")
    await task


async def test_admin_approve_and_deny(approval):
    a, _ = approval
    f1, r1 = call_flow()
    f2, r2 = call_flow()
    t1, p1 = await hold(a, f1)
    t2, p2 = await hold(a, f2)
    status, data = await admin(a, path=f"/_bastion/approvals/{p1}/approve", method="POST")
    assert status == 200 and data == {"id": p1, "outcome": "approved", "approver": "alice"}
    status, data = await admin(a, path=f"/_bastion/approvals/{p2}/deny", method="POST", body={"reason": "risky"})
    assert status == 200 and data["outcome"] == "denied"
    await asyncio.wait_for(asyncio.gather(t1, t2), 2)
    assert r1.approval["approver"] == "alice" and f1.response is None
    assert r2.approval["reason"] == "risky" and "risky" in body(f2)["error"]["message"]
    # already decided / unknown ids: a clear 404
    status, data = await admin(a, path=f"/_bastion/approvals/{p1}/approve", method="POST")
    assert status == 404 and "already decided" in data["error_description"]
    status, _ = await admin(a, path="/_bastion/approvals/nope/deny", method="POST")
    assert status == 404


async def test_admin_rejects_wrong_methods_and_paths(approval):
    a, _ = approval
    f, _ = call_flow()
    task, pid = await hold(a, f)
    for path, method in ((f"/_bastion/approvals/{pid}/approve", "GET"), (f"/_bastion/approvals/{pid}/launch", "POST"),
                         ("/_bastion/approvals/x/y/z", "POST")):
        status, _ = await admin(a, path=path, method=method)
        assert status == 404, (path, method)
    assert not task.done()
    a.decide(pid, "denied", "alice")
    await task


async def test_admin_does_not_override_identity_refusal(approval):
    a, _ = approval
    f = admin_flow(sub=None)
    f.response = tutils.tresp(status_code=401)
    await a.request(f)
    assert f.response.status_code == 401


# --- grants ---------------------------------------------------------------------------------------

async def test_grant_off_by_default_holds_every_repeat(approval):
    a, _ = approval
    f, _ = call_flow()
    task, pid = await hold(a, f)
    a.decide(pid, "approved", "alice")
    await task
    f2, _ = call_flow()
    t2, p2 = await hold(a, f2)                      # held again
    a.decide(p2, "denied", "alice")
    await t2


async def test_grant_reuses_exact_approved_call_only(approval):
    a, tctx = approval
    tctx.configure(a, bastion_approval_grant_ttl=60.0)
    f, _ = call_flow(args={"image": "redis:7"})
    task, pid = await hold(a, f)
    a.decide(pid, "approved", "alice")
    await task
    again, rec = call_flow(args={"image": "redis:7"}, msg_id=8)
    await asyncio.wait_for(a.request(again), 1)
    assert not again.intercepted and again.response is None
    assert rec.approval["outcome"] == "approved" and rec.approval["approver"] == "grant"
    # other arguments or another caller: held again
    for kw in ({"args": {"image": "evil"}}, {"args": {"image": "redis:7"}, "sub": "eve"}):
        f3, _ = call_flow(**kw)
        t3, p3 = await hold(a, f3)
        a.decide(p3, "denied", "alice")
        await t3


async def test_denied_call_grants_nothing(approval):
    a, tctx = approval
    tctx.configure(a, bastion_approval_grant_ttl=60.0)
    f, _ = call_flow()
    task, pid = await hold(a, f)
    a.decide(pid, "denied", "alice")
    await task
    assert len(a.grants) == 0


async def test_grant_expires(approval):
    a, tctx = approval
    tctx.configure(a, bastion_approval_grant_ttl=0.2)
    f, _ = call_flow()
    task, pid = await hold(a, f)
    a.decide(pid, "approved", "alice")
    await task
    await asyncio.sleep(0.3)
    f2, _ = call_flow()
    t2, p2 = await hold(a, f2)
    a.decide(p2, "denied", "alice")
    await t2


# --- masking rules apply to what the approver sees ---------------------------------------------

async def test_comment_uses_the_masking_rules_for_the_call():
    prof = maskcore.Profile("ops", [maskcore.Rule("images", "redact", fields=("image",))])
    cfg = maskcore.MaskConfig({"ops": prof}, [], "ops")
    a = Approval(masking_config=lambda: cfg)      # the masking stage's rules, as bastion.py wires it
    with taddons.context(a) as tctx:
        tctx.configure(a)
        f, _ = call_flow(args={"image": "registry.internal/secret-project:1"})
        task, pid = await hold(a, f)
        assert "secret-project" not in f.comment and "[MASKED" in f.comment
        a.decide(pid, "denied", "alice")
        await task


# --- webhook ----------------------------------------------------------------------------------

async def test_webhook_gets_masked_summary_and_failure_approves_nothing(approval):
    a, tctx = approval
    received: list[bytes] = []

    async def handle(reader, writer):
        data = await reader.readuntil(b"\r\n\r\n")
        length = int([l for l in data.split(b"\r\n") if l.lower().startswith(b"content-length")][0].split(b":")[1])
        received.append(await reader.readexactly(length))
        writer.write(b"HTTP/1.1 500 Oops\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    tctx.configure(a, bastion_approval_webhook=f"http://127.0.0.1:{port}/hook")
    f, rec = call_flow(args={"image": "x", "password": SECRET})
    task, pid = await hold(a, f)
    for _ in range(100):
        if received:
            break
        await asyncio.sleep(0.02)
    payload = json.loads(received[0])
    assert payload["event"] == "approval.pending" and payload["id"] == pid and payload["requester"] == "dan"
    assert SECRET not in received[0].decode()
    assert not task.done() and rec.approval is None          # a 500 from the hook decides nothing
    server.close()
    tctx.configure(a, bastion_approval_webhook="http://127.0.0.1:9/unreachable")
    f2, r2 = call_flow()
    t2, p2 = await hold(a, f2)
    await asyncio.sleep(0.3)
    assert not t2.done() and r2.approval is None
    for p in (pid, p2):
        a.decide(p, "denied", "alice")
    await asyncio.gather(task, t2)


# --- concurrency ---------------------------------------------------------------------------------

async def test_twenty_waiting_calls_do_not_slow_unrelated_flows(approval, capsys):
    a, _ = approval

    async def unrelated_ms(n=200) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            f, _ = call_flow(action="allow")
            await a.request(f)
            await asyncio.sleep(0)                # give the waiting holds every chance to run
        return (time.perf_counter() - t0) / n * 1000

    await unrelated_ms(20)                        # warm-up
    idle = await unrelated_ms()
    held = [await hold(a, call_flow(args={"image": f"i{i}"})[0]) for i in range(20)]
    assert len(a.pending) == 20
    loaded = await unrelated_ms()
    # the event loop stays responsive: a 10 ms sleep is not delayed by the holds
    t0 = time.perf_counter()
    await asyncio.sleep(0.01)
    lag = (time.perf_counter() - t0 - 0.01) * 1000
    for i, (_, pid) in enumerate(held):
        a.decide(pid, "approved" if i % 2 else "denied", "alice")
    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(t for t, _ in held)), 2)
    drain = (time.perf_counter() - t0) * 1000
    with capsys.disabled():
        print(f"\n[approval] unrelated flow through the hook: {idle:.3f} ms idle, {loaded:.3f} ms with 20 held; "
              f"loop lag {lag:.2f} ms; 20 decisions released in {drain:.1f} ms")
    assert loaded < idle * 5 + 0.5 and lag < 50 and drain < 500


# --- batches holding calls under different approvers -----------------------------------------

TWO_HELD = [{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "query_sql", "arguments": {}}},
            {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "launch_container", "arguments": {}}}]


def two_held_flow():
    f, rec = call_flow(batch=TWO_HELD)
    rec.decisions = [Decision("approve", "sql-writes", approvers=("dba",), message_id=1),
                     Decision("approve", "launches", approvers=("secops",), message_id=2)]
    return f, rec


async def test_batch_needs_an_allowed_approver_for_every_held_call(approval):
    a, _ = approval
    f, rec = two_held_flow()
    task, pid = await hold(a, f)
    status, data = await admin(a, path=f"/_bastion/approvals/{pid}/approve", method="POST", sub="dora", roles=("dba",))
    assert status == 200 and data["outcome"] == "pending" and data["waiting_for"] == ["secops"]
    await asyncio.sleep(0.05)
    assert pid in a.pending and f.intercepted and not task.done()      # one approver is not enough
    status, data = await admin(a, path=f"/_bastion/approvals/{pid}/approve", method="POST", sub="dora", roles=("dba",))
    assert data["outcome"] == "pending" and not task.done()              # nor the same one twice
    status, data = await admin(a)                                        # alice (approver) sees nothing
    assert data["pending"] == []
    status, data = await admin(a, sub="sam", roles=("secops",))
    assert [p["id"] for p in data["pending"]] == [pid]
    assert data["pending"][0]["needs"][0]["approved_by"] == "dora"
    status, data = await admin(a, path=f"/_bastion/approvals/{pid}/approve", method="POST", sub="sam", roles=("secops",))
    assert status == 200 and data["outcome"] == "approved" and data["approver"] == "dora, sam"
    await asyncio.wait_for(task, 2)
    assert f.response is None and rec.approval["outcome"] == "approved"


async def test_batch_one_approver_with_both_roles_or_one_denial(approval):
    a, _ = approval
    f, rec = two_held_flow()
    task, pid = await hold(a, f)
    status, data = await admin(a, path=f"/_bastion/approvals/{pid}/approve", method="POST", sub="boss",
                               roles=("dba", "secops"))
    assert data["outcome"] == "approved"
    await asyncio.wait_for(task, 2)
    f, rec = two_held_flow()
    task, pid = await hold(a, f)
    status, data = await admin(a, path=f"/_bastion/approvals/{pid}/deny", method="POST", sub="sam", roles=("secops",),
                               body={"reason": "no"})
    assert data["outcome"] == "denied"
    await asyncio.wait_for(task, 2)
    assert [e["error"]["code"] for e in body(f)] == [APPROVAL_DENIED, APPROVAL_DENIED]


async def test_comment_escapes_caller_chosen_text(approval):
    a, _ = approval
    f, rec = call_flow(tool="launch\x1b[2J_container", sub="dan\nAPPROVAL ffff approved by root", args={"x": "\u202e"})
    task, pid = await hold(a, f)
    assert "\x1b" not in f.comment and "\u202e" not in f.comment
    assert "Requester: dan\\nAPPROVAL ffff approved by root" in f.comment and "launch\\x1b[2J_container" in f.comment
    a.decide(pid, "denied", "alice", "bad\r\nline")
    await asyncio.wait_for(task, 2)
    assert f.comment.splitlines()[-1] == "Outcome: denied by alice (bad\\r\\nline)."
    assert f.comment.startswith("DENIED -32033 dan\\nAPPROVAL ffff approved by root -> launch\\x1b[2J_container")
    assert f.comment.splitlines()[0].endswith(f"| by alice (bad\\r\\nline) | id {pid}")


def test_webconsole_only_changes_mitmweb_and_default_columns():
    from addons.hooks import webconsole
    assert webconsole.install(object(), lambda f: True) is False           # mitmdump: nothing to take over
    assert webconsole.approval_columns(webconsole.DEFAULT_COLUMNS) == list(webconsole.APPROVAL_COLUMNS)
    assert "comment" in webconsole.APPROVAL_COLUMNS
    assert webconsole.approval_columns(["path", "status"]) is None           # the operator's choice stays


async def test_an_edit_reverted_while_held_is_the_request_shown_again(approval):
    a, _ = approval
    f, rec = call_flow()
    task, pid = await hold(a, f)
    f.backup()
    f.request.content = f.request.content.replace(b"postgres:17", b"evil:1")
    f.revert()                                     # mitmweb's Revert: the flow's state from a copy
    status, _ = await admin(a, path=f"/_bastion/approvals/{pid}/approve", method="POST")
    assert status == 200
    await asyncio.wait_for(task, 2)
    assert rec.approval["outcome"] == "approved" and get_record(f.metadata) is rec and b"postgres:17" in f.request.content
