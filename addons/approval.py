"""The `approval` addon: calls whose decision is `approve` wait for a human.

The flow is held with mitmproxy's own interception, inside an async `request` hook, so
the event loop keeps serving other traffic and the addons after this one (the Injector)
run only once a decision is made. A held call can be decided by
- an approver identity through the admin API (`mcp-bastion approve/deny`, JWT verified by
  the identity addon; the approver needs one of the rule's approver roles and can never
  be the requester),
- mitmweb (`./run.sh web`): Resume = approve, Kill = deny, or the commands
  `bastion.approve @focus` / `bastion.deny @focus "reason"` in the command bar — mitmweb's
  own authentication (web_password / token) is what identifies that console,
- the deadline: the call is refused with "approval timed out".
A denial is always a JSON-RPC error for the caller, never a dropped connection.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import command, ctx, exceptions, flow as mflow, hooks, http

from addons.httputil import json_response, refuse_http, refuse_jsonrpc
from addons.mcp import jsonrpc_error
from addons.record import BastionRecord, get_record

log = logging.getLogger("bastion.approval")

APPROVAL_DENIED = -32033
APPROVAL_TIMEOUT = -32034
ADMIN_PREFIX = "/_bastion/approvals"
MAX_GRANTS = 10_000
POLL = 0.1


@dataclass
class Pending:
    id: str
    flow: http.HTTPFlow
    requester: str
    connection: str
    summary: dict
    approvers: tuple[str, ...]
    rule: str
    deadline: float
    created: float = field(default_factory=time.time)
    outcome: str | None = None        # approved / denied / timeout
    approver: str | None = None
    reason: str = ""

    def public(self) -> dict:
        return {"id": self.id, "requester": self.requester, "connection": self.connection, "rule": self.rule,
                "approvers": list(self.approvers), "created": self.created,
                "expires_in": round(max(0.0, self.deadline - time.monotonic()), 1), **self.summary}


def display_arguments(args: Any) -> Any:
    """Arguments as an approver may see them: masked with the masking core when present."""
    try:
        from addons import maskcore
        mask_value = getattr(maskcore, "mask_value", None)
        strict = getattr(maskcore, "STRICT_DISPLAY_PROFILE", None)
        if mask_value is not None and strict is not None:
            return mask_value(strict, args)
    except Exception:  # noqa: BLE001 - display only; fall back to key-based redaction
        pass
    return _redact_secret_keys(args)


_SECRETISH = ("password", "secret", "token", "key", "credential", "ssn", "card")


def _redact_secret_keys(obj: Any, depth: int = 0) -> Any:
    if depth > 32:
        return "[…]"
    if isinstance(obj, dict):
        return {k: ("[MASKED]" if any(s in str(k).lower() for s in _SECRETISH) else _redact_secret_keys(v, depth + 1))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_redact_secret_keys(v, depth + 1) for v in obj]
    return obj


def fingerprint(rec: BastionRecord) -> str:
    """identity + connection + normalised calls: what a grant covers."""
    calls = [[m.method, m.target, m.arguments] for m in rec.messages]
    blob = json.dumps([rec.identity.sub if rec.identity else None, rec.connection, calls],
                      sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class Approval:
    name = "approval"

    def __init__(self) -> None:
        self.pending: dict[str, Pending] = {}
        self.grants: OrderedDict[str, float] = OrderedDict()

    def load(self, loader):
        loader.add_option("bastion_approval_timeout", float, 120.0,
                          "Default seconds a held call waits for approval (a rule's timeout wins).")
        loader.add_option("bastion_approval_grant_ttl", float, 0.0,
                          "Seconds an approved call (same identity, connection, tool, arguments) may be "
                          "repeated without a new approval; 0 = off.")

    def configure(self, updated):
        if "bastion_approval_timeout" in updated and ctx.options.bastion_approval_timeout <= 0:
            raise exceptions.OptionsError("bastion_approval_timeout must be positive")
        if "bastion_approval_grant_ttl" in updated and ctx.options.bastion_approval_grant_ttl < 0:
            raise exceptions.OptionsError("bastion_approval_grant_ttl cannot be negative")

    # --- the hold ----------------------------------------------------------------------

    async def request(self, flow: http.HTTPFlow) -> None:
        rec = get_record(flow.metadata)
        if flow.request.path.startswith(ADMIN_PREFIX) and rec.connection is None:
            self.admin(flow, rec)
            return
        if flow.response is not None or rec.connection is None:
            return
        held = [d for d in rec.decisions if d.action == "approve"]
        if not held:
            return
        fp = fingerprint(rec)
        if self._granted(fp):
            rec.approval = {"outcome": "approved", "approver": "grant", "rule": held[0].rule, "decided_at": time.time()}
            log.info("approval grant reused for %s on %s", rec.identity.sub if rec.identity else "-", rec.connection)
            return
        timeout = min(d.timeout or ctx.options.bastion_approval_timeout for d in held)
        approvers = tuple(sorted({r for d in held for r in d.approvers}))
        p = Pending(id=uuid.uuid4().hex[:12], flow=flow, requester=rec.identity.sub if rec.identity else "-",
                    connection=rec.connection, approvers=approvers, rule=held[0].rule or "-",
                    deadline=time.monotonic() + timeout,
                    summary={"calls": [{"method": m.method, "target": m.target,
                                        "arguments": display_arguments(m.arguments)} for m in rec.messages],
                             "roles": list(rec.identity.roles) if rec.identity else []})
        self.pending[p.id] = p
        flow.metadata["bastion_approval_id"] = p.id
        flow.intercept()
        flow.marked = ":hourglass_flowing_sand:"
        flow.comment = self._comment(p, timeout)
        await self._update(flow)
        log.warning("approval %s: %s asks for %s on %s (rule %s, approvers %s, %gs)", p.id, p.requester,
                    ", ".join(str(c["target"] or c["method"]) for c in p.summary["calls"]), p.connection, p.rule,
                    ",".join(approvers) or "any mitmweb user", timeout)
        try:
            await self._wait(p)
        finally:
            self.pending.pop(p.id, None)
        self._finish(p, rec)
        await self._update(flow)

    async def _wait(self, p: Pending) -> None:
        flow = p.flow
        while p.outcome is None:
            if not flow.intercepted:
                killed = flow.error is not None and flow.error.msg == mflow.Error.KILLED_MESSAGE
                p.outcome, p.approver = ("denied", "mitmweb") if killed else ("approved", "mitmweb")
                p.reason = "killed in mitmweb" if killed else ""
                break
            if time.monotonic() >= p.deadline:
                p.outcome = "timeout"
                break
            await asyncio.sleep(POLL)

    def _finish(self, p: Pending, rec: BastionRecord) -> None:
        flow = p.flow
        if flow.error is not None and flow.error.msg == mflow.Error.KILLED_MESSAGE:
            # a kill in the UI is a denial the caller should be told about, not a reset
            flow.error = None
            flow.live = True
        flow.intercepted = False
        flow.marked = {"approved": ":white_check_mark:", "denied": ":no_entry:", "timeout": ":alarm_clock:"}[p.outcome]
        rec.approval = {"id": p.id, "outcome": p.outcome, "approver": p.approver, "reason": p.reason,
                        "rule": p.rule, "waited": round(time.time() - p.created, 3), "decided_at": time.time()}
        log.warning("approval %s: %s%s", p.id, p.outcome, f" by {p.approver}" if p.approver else "")
        if p.outcome == "approved":
            ttl = ctx.options.bastion_approval_grant_ttl
            if ttl > 0:
                self.grants[fingerprint(rec)] = time.monotonic() + ttl
                while len(self.grants) > MAX_GRANTS:
                    self.grants.popitem(last=False)
            return
        code, msg = ((APPROVAL_TIMEOUT, f"approval timed out (rule {p.rule})") if p.outcome == "timeout" else
                     (APPROVAL_DENIED, f"approval denied (rule {p.rule})" + (f": {p.reason}" if p.reason else "")))
        errors = [jsonrpc_error(m.id, code, msg, {"rule": p.rule, "approval": p.id})
                  for m in rec.messages if m.kind == "request"]
        refuse_jsonrpc(flow, errors or [jsonrpc_error(None, code, msg)], rec.batch, 200,
                       reason=msg, rule=p.rule)

    def _granted(self, fp: str) -> bool:
        exp = self.grants.get(fp)
        if exp is None:
            return False
        if exp < time.monotonic():
            del self.grants[fp]
            return False
        return True

    @staticmethod
    def _comment(p: Pending, timeout: float) -> str:
        calls = "\n".join(f"  {c['method']} {c['target'] or ''} {json.dumps(c['arguments'], ensure_ascii=False)[:500]}"
                          for c in p.summary["calls"])
        return (f"APPROVAL {p.id} needed (rule {p.rule})\n"
                f"requester: {p.requester} roles={','.join(p.summary['roles'])}\n"
                f"connection: {p.connection}\n{calls}\n"
                f"approvers: {', '.join(p.approvers) or 'mitmweb users'}; deadline in {timeout:g}s\n"
                f"Resume = approve · Kill or `bastion.deny @focus reason` = deny")

    @staticmethod
    async def _update(flow: http.HTTPFlow) -> None:
        await ctx.master.addons.trigger_event(hooks.UpdateHook([flow]))

    # --- decisions -----------------------------------------------------------------------

    def decide(self, approval_id: str, outcome: str, approver: str, reason: str = "") -> Pending:
        p = self.pending.get(approval_id)
        if p is None or p.outcome is not None:
            raise KeyError(approval_id)
        p.outcome, p.approver, p.reason = outcome, approver, reason[:500]
        return p

    @command.command("bastion.approve")
    def approve_cmd(self, flows: Sequence[mflow.Flow]) -> None:
        """Approve held MCP calls (mitmweb command bar: bastion.approve @focus)."""
        for f in flows:
            pid = f.metadata.get("bastion_approval_id")
            if pid in self.pending:
                self.decide(pid, "approved", "mitmweb")

    @command.command("bastion.deny")
    def deny_cmd(self, flows: Sequence[mflow.Flow], reason: str = "") -> None:
        """Deny held MCP calls with a reason the caller sees (bastion.deny @focus "why")."""
        for f in flows:
            pid = f.metadata.get("bastion_approval_id")
            if pid in self.pending:
                self.decide(pid, "denied", "mitmweb", reason)

    # --- admin API: /_bastion/approvals[/<id>/approve|deny] ----------------------------------

    def admin(self, flow: http.HTTPFlow, rec: BastionRecord) -> None:
        if flow.response is not None:
            return  # identity already refused the token
        ident = rec.identity
        if ident is None:
            refuse_http(flow, 401, "unauthorized", "an approver bearer token is required",
                        {"www-authenticate": "Bearer"})
            return
        parts = flow.request.path.split("?")[0][len(ADMIN_PREFIX):].strip("/").split("/")
        if parts == [""] and flow.request.method == "GET":
            visible = [p.public() for p in self.pending.values()
                       if p.outcome is None and (not p.approvers or set(p.approvers) & set(ident.roles))]
            flow.response = json_response(200, {"pending": visible})
            return
        if len(parts) != 2 or parts[1] not in ("approve", "deny") or flow.request.method != "POST":
            refuse_http(flow, 404, "not_found", "use GET /_bastion/approvals or POST /_bastion/approvals/<id>/approve|deny")
            return
        pid, action = parts
        p = self.pending.get(pid)
        if p is None or p.outcome is not None:
            refuse_http(flow, 404, "not_found", "no pending approval with that id")
            return
        if ident.sub == p.requester:
            log.warning("approval %s: %s tried to decide their own request", pid, ident.sub)
            refuse_http(flow, 403, "forbidden", "you cannot decide your own request", rule="approval:self")
            return
        if p.approvers and not set(p.approvers) & set(ident.roles):
            refuse_http(flow, 403, "insufficient_scope", f"approving needs one of the roles {', '.join(p.approvers)}",
                        rule="approval:role")
            return
        reason = ""
        if action == "deny":
            try:
                body = json.loads(flow.request.get_text() or "{}")
                reason = str(body.get("reason", "")) if isinstance(body, dict) else ""
            except (ValueError, UnicodeDecodeError):
                reason = ""
        self.decide(pid, "approved" if action == "approve" else "denied", ident.sub, reason)
        flow.response = json_response(200, {"id": pid, "outcome": p.outcome, "approver": ident.sub})


# --- CLI ------------------------------------------------------------------------------------

def add_cli(sub) -> None:
    def common(p):
        p.add_argument("--gateway", default="http://127.0.0.1:8080", help="gateway base URL")
        p.add_argument("--token", required=True, help="the approver's bearer token (mcp-bastion token …)")
    p = sub.add_parser("approvals", help="list calls waiting for approval")
    common(p)
    p.set_defaults(func=_cli_list)
    a = sub.add_parser("approve", help="approve a held call")
    a.add_argument("id")
    common(a)
    a.set_defaults(func=lambda args: _cli_decide(args, "approve"))
    d = sub.add_parser("deny", help="deny a held call")
    d.add_argument("id")
    d.add_argument("--reason", default="")
    common(d)
    d.set_defaults(func=lambda args: _cli_decide(args, "deny"))


def _call(args, method: str, path: str, body: dict | None = None) -> tuple[int, Any]:
    import httpx
    r = httpx.request(method, args.gateway.rstrip("/") + path, json=body, timeout=10,
                      headers={"authorization": f"Bearer {args.token}"})
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, {"error": r.text[:200]}


def _cli_list(args) -> int:
    status, data = _call(args, "GET", ADMIN_PREFIX)
    if status != 200:
        print(f"error {status}: {data.get('error_description') or data.get('error')}")
        return 1
    if not data["pending"]:
        print("no calls waiting for approval")
    for p in data["pending"]:
        calls = "; ".join(f"{c['target'] or c['method']} {json.dumps(c['arguments'], ensure_ascii=False)[:120]}"
                          for c in p["calls"])
        print(f"{p['id']}  {p['requester']:12} {p['connection']:10} rule={p['rule']}  "
              f"expires in {p['expires_in']:.0f}s  {calls}")
    return 0


def _cli_decide(args, action: str) -> int:
    body = {"reason": args.reason} if action == "deny" else None
    status, data = _call(args, "POST", f"{ADMIN_PREFIX}/{args.id}/{action}", body)
    if status != 200:
        print(f"error {status}: {data.get('error_description') or data.get('error')}")
        return 1
    print(f"{data['id']}: {data['outcome']} by {data['approver']}")
    return 0
