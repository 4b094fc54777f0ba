"""The `approval` addon: calls whose decision is `approve` wait for a human.

The flow is held with mitmproxy's own interception, inside an async `request` hook, so
the event loop keeps serving other traffic and the addons after this one (the Injector)
run only once a decision is made. A held call can be decided by
- an approver identity through the admin API (`mcp-bastion approve/deny`, JWT verified by
  the identity addon; the approver needs one of the rule's approver roles and can never
  be the requester),
- mitmweb (`./run.sh web`): Kill or `bastion.deny @focus "reason"` = deny. mitmweb has one
  shared password and no users, so by default (bastion_web_approvals=identified) Resume
  and `bastion.approve` do not approve: the call stays held until an identified approver
  approves it through the admin API. `bastion_web_approvals=console` restores console
  approvals, recorded as made by "mitmweb (shared web password)",
- the deadline: the call is refused with "approval timed out",
- the caller going away or the gateway shutting down: the hold is cancelled.
A denial is always a JSON-RPC error for the caller, never a dropped connection.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from mitmproxy import command, ctx, exceptions, flow as mflow, hooks, http
from mitmproxy.connection import ConnectionState

from addons.hooks import webconsole
from addons.hooks.httputil import checked_snapshot, json_response, refuse_http, refuse_jsonrpc, refuse_unavailable
from addons.core.mcpwire import jsonrpc_error
from addons.core.record import METADATA_KEY, BastionRecord, get_record
from addons.core.textsafe import esc, get_logger
from addons.core.masking.secretscan import redact_obj
from addons.core.statestore import SharedState, StateUnavailable

log = get_logger("bastion.approval")

APPROVAL_DENIED = -32033
APPROVAL_TIMEOUT = -32034
APPROVAL_CANCELLED = -32035
ADMIN_PREFIX = "/_bastion/approvals"
MAX_GRANTS = 10_000
MAX_REASON = 500
SHARED_POLL = 2.0  # seconds between a held call's looks at its shared record (a missed announcement)
APPROVAL_ID = re.compile(r"[0-9a-f]{12}")
POLL = 0.1  # how often a hold looks at mitmweb's resume/kill and the client connection
WEB_CONSOLE = "mitmweb (shared web password)"   # who decided, when mitmweb decided
WEB_APPROVALS = ("identified", "console")
# first word of the flow's comment, shown in mitmweb's Comment column (ASCII: no emoji boxes)
OUTCOME_LABELS = {"approved": "APPROVED", "denied": f"DENIED {APPROVAL_DENIED}",
                  "timeout": f"EXPIRED {APPROVAL_TIMEOUT}", "cancelled": f"CANCELLED {APPROVAL_CANCELLED}"}


@dataclass(frozen=True)
class Need:
    """One approval a held request needs: a held call's rule and the roles that may give it."""
    rule: str
    approvers: tuple[str, ...]


@dataclass
class Pending:
    id: str
    flow: http.HTTPFlow
    requester: str
    connection: str
    summary: dict
    needs: tuple[Need, ...]           # every held call's approval (a batch can hold several)
    rule: str
    timeout: float
    deadline: float                   # time.monotonic()
    created: float = field(default_factory=time.time)
    decided: asyncio.Event = field(default_factory=asyncio.Event)
    outcome: str | None = None        # approved / denied / timeout / cancelled
    approver: str | None = None
    reason: str = ""
    approved_by: dict[int, str] = field(default_factory=dict)   # index in needs -> approver
    fingerprint: str = ""             # shared engine: what the stored record must be bound to
    next_check: float = 0.0           # shared engine: next look at the stored record (monotonic)

    @property
    def approvers(self) -> tuple[str, ...]:
        """Roles that can still move this request forward (any of the needs not yet given)."""
        return tuple(sorted({r for i, n in enumerate(self.needs) if i not in self.approved_by for r in n.approvers}))

    def may_decide(self, roles: Sequence[str]) -> list[int]:
        """Indexes of the needs an identity with these roles may give (never an empty approver list)."""
        return may_decide(self.needs, roles)

    @property
    def deadline_utc(self) -> str:
        return datetime.fromtimestamp(self.created + self.timeout, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    def public(self) -> dict:
        return {"id": self.id, "requester": self.requester, "connection": self.connection, "rule": self.rule,
                "approvers": list(self.approvers), "created": self.created, "deadline": self.deadline_utc,
                "needs": [{"rule": n.rule, "approvers": list(n.approvers), "approved_by": self.approved_by.get(i)}
                          for i, n in enumerate(self.needs)],
                "expires_in": round(max(0.0, self.deadline - time.monotonic()), 1), **self.summary}


def may_decide(needs: Sequence[Need], roles: Sequence[str]) -> list[int]:
    return [i for i, n in enumerate(needs) if set(n.approvers) & set(roles)]


# --- what an approver sees (pure) ------------------------------------------------------

_SECRETISH = ("password", "passwd", "secret", "token", "key", "credential", "auth", "cookie", "ssn", "card")


def redact_secret_keys(obj: Any, depth: int = 0) -> Any:
    """Last line of defence for display: values under secret-looking keys are hidden."""
    if depth > 32:
        return "[…]"
    if isinstance(obj, dict):
        return {k: ("[MASKED]" if any(s in str(k).lower() for s in _SECRETISH) else redact_secret_keys(v, depth + 1))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_secret_keys(v, depth + 1) for v in obj]
    return obj


def display_arguments(args: Any, profiles: Sequence[Any] = ()) -> Any:
    """Arguments as an approver may see them: the masking profiles that apply to the call,
    then every built-in detector, then key-based redaction. Fails closed (hides all)."""
    try:
        from addons.core.masking import engine as maskcore
        for prof in [*profiles, maskcore.builtin_config().profiles[maskcore.BUILTIN_DEFAULT]]:
            args, _ = maskcore.mask_value(prof, args)
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - an unmaskable value is not shown at all
        log.exception("masking arguments for display failed")
        return "[arguments hidden: could not be masked]"
    return redact_secret_keys(args)


def fingerprint(rec: BastionRecord) -> str:
    """identity + connection + normalised calls (method, tool, arguments): what a grant covers."""
    calls = [[m.method, m.target, m.arguments] for m in rec.messages]
    blob = json.dumps([rec.identity.sub if rec.identity else None, rec.connection, calls],
                      sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class Grants:
    """Approved fingerprints reusable until they expire; bounded (oldest dropped first)."""

    def __init__(self, limit: int = MAX_GRANTS) -> None:
        self.limit = limit
        self._exp: OrderedDict[str, float] = OrderedDict()

    def add(self, fp: str, ttl: float, now: float | None = None) -> None:
        self._exp[fp] = (time.monotonic() if now is None else now) + ttl
        self._exp.move_to_end(fp)
        while len(self._exp) > self.limit:
            self._exp.popitem(last=False)

    def valid(self, fp: str, now: float | None = None) -> bool:
        exp = self._exp.get(fp)
        if exp is None:
            return False
        if exp < (time.monotonic() if now is None else now):
            del self._exp[fp]
            return False
        return True

    def __len__(self) -> int:
        return len(self._exp)


def client_gone(flow: http.HTTPFlow) -> bool:
    """The caller closed its connection (HTTP/1: nothing more can be read from it)."""
    return not (flow.client_conn.state & ConnectionState.CAN_READ)


class Approval:
    name = "approval"

    def __init__(self, masking_config: Callable[[], Any] = lambda: None, state: SharedState | None = None) -> None:
        # masking_config: the masking stage's current rules (approvers see arguments masked)
        self.masking_config = masking_config
        # state: with a shared engine (bastion_state) every pending call is also a sealed
        # record there, listed and decided through any replica (addons/core/statestore.py)
        self.state = state or SharedState()
        self.state.listeners.append(self._on_announced)
        self.pending: dict[str, Pending] = {}
        self.grants = Grants()
        self._background: set[asyncio.Task] = set()

    def load(self, loader):
        loader.add_option("bastion_approval_timeout", float, 120.0,
                          "Default seconds a held call waits for approval (a rule's timeout wins).")
        loader.add_option("bastion_approval_grant_ttl", float, 0.0,
                          "Seconds an approved call (same identity, connection, tool, arguments) may be "
                          "repeated without a new approval; 0 = off.")
        loader.add_option("bastion_web_approvals", str, "identified",
                          "identified: approving needs an approver token through the admin API (mitmweb's "
                          "Resume does not approve; Kill still denies); console: mitmweb's Resume and "
                          "bastion.approve approve, recorded as the shared web console.",
                          choices=WEB_APPROVALS)
        loader.add_option("bastion_approval_webhook", str, "",
                          "URL that receives a JSON summary (masked arguments) when a call starts waiting; "
                          "empty = off. Failures are logged and approve nothing.")

    def configure(self, updated):
        if "bastion_approval_timeout" in updated and ctx.options.bastion_approval_timeout <= 0:
            raise exceptions.OptionsError("bastion_approval_timeout must be positive")
        if "bastion_approval_grant_ttl" in updated and ctx.options.bastion_approval_grant_ttl < 0:
            raise exceptions.OptionsError("bastion_approval_grant_ttl cannot be negative")
        if "bastion_approval_webhook" in updated:
            url = ctx.options.bastion_approval_webhook
            if url and not url.startswith(("http://", "https://")):
                raise exceptions.OptionsError(f"bastion_approval_webhook must be an http(s) URL, not {url!r}")

    def running(self) -> None:
        # mitmweb: Resume All leaves held calls held; the flow list shows who/what/rule/deadline
        if webconsole.install(ctx.master, self._is_held) and "web_columns" in ctx.options:
            cols = webconsole.approval_columns(ctx.options.web_columns)
            if cols:
                ctx.options.update(web_columns=cols)

    def _is_held(self, f: mflow.Flow) -> bool:
        p = self.pending.get(f.metadata.get("bastion_approval_id"))
        return p is not None and p.outcome is None

    def done(self) -> None:
        # pending holds live only in this process: nothing may be forwarded after a restart
        for p in list(self.pending.values()):
            if p.outcome is None:
                self.decide(p.id, "cancelled", None, "gateway shutting down")

    # --- the hold ----------------------------------------------------------------------

    async def request(self, flow: http.HTTPFlow) -> None:
        rec = get_record(flow.metadata)
        if flow.request.path.startswith(ADMIN_PREFIX) and rec.connection is None:
            if self.state.shared:
                await self.admin_shared(flow, rec)
            else:
                self.admin(flow, rec)
            return
        if flow.response is not None or rec.connection is None:
            return
        held = [d for d in rec.decisions if d.action == "approve"]
        if not held:
            return
        ttl = ctx.options.bastion_approval_grant_ttl
        if ttl > 0 and self.grants.valid(fingerprint(rec)):
            rec.approval = {"id": None, "outcome": "approved", "approver": "grant", "reason": "repeat of an approved call",
                            "rule": held[0].rule, "waited": 0.0, "decided_at": time.time()}
            log.info("approval grant reused by %s on %s", rec.identity.sub if rec.identity else "-", rec.connection)
            return
        p = self._pending(flow, rec, held)
        if self.state.shared and not await self._share(p, rec):
            refuse_unavailable(flow, rec, f"the approval of rule {p.rule}")
            return
        self.pending[p.id] = p
        flow.metadata["bastion_approval_id"] = p.id
        flow.intercept()
        flow.comment = self._comment(p)
        await self._update(flow)
        log.warning("approval %s: %s asks for %s on %s (rule %s, approvers %s, %gs)", p.id, p.requester,
                    ", ".join(str(c["target"] or c["method"]) for c in p.summary["calls"]), p.connection, p.rule,
                    ",".join(p.approvers) or "any mitmweb user", p.timeout)
        self._notify(p)
        try:
            await self._wait(p)
        except asyncio.CancelledError:
            p.outcome, p.reason = p.outcome or "cancelled", p.reason or "connection handler stopped"
            raise
        except Exception:
            p.outcome, p.reason = p.outcome or "cancelled", p.reason or "internal error while waiting"
            raise
        finally:
            self.pending.pop(p.id, None)
            if p.fingerprint:
                self._spawn(self._unshare(p.id))
            # mitmweb's Revert restores the flow from a copy, which has no record
            flow.metadata[METADATA_KEY] = rec
            if p.outcome == "approved" and checked_snapshot(flow.request) != rec.checked:
                # an approval covers exactly the request shown: an edit while held voids it
                p.outcome, p.reason = "cancelled", "the request was changed while it was held; send it again"
            self._finish(p, rec)
        await self._update(flow)

    def _pending(self, flow: http.HTTPFlow, rec: BastionRecord, held: list) -> Pending:
        timeout = min(d.timeout or ctx.options.bastion_approval_timeout for d in held)
        profiles = self._mask_profiles(rec)
        calls = [{"method": m.method, "target": m.target, "arguments": display_arguments(m.arguments, profiles)}
                 for m in rec.messages]
        calls = redact_obj(rec.known_secrets, calls)     # no gateway secret or caller token shown
        ident = rec.identity
        needs = tuple(dict.fromkeys(Need(d.rule or "-", tuple(sorted(d.approvers))) for d in held))
        return Pending(id=uuid.uuid4().hex[:12], flow=flow, requester=ident.sub if ident else "-",
                       connection=rec.connection or "-", rule=", ".join(dict.fromkeys(n.rule for n in needs)),
                       needs=needs,
                       timeout=timeout, deadline=time.monotonic() + timeout,
                       summary={"calls": calls, "roles": list(ident.roles) if ident else []})

    def live_metrics(self) -> dict[str, float]:
        # decided holds leave the dict a moment later; count only the undecided ones
        return {"bastion_approvals_pending": sum(1 for p in list(self.pending.values()) if p.outcome is None)}

    def _mask_profiles(self, rec: BastionRecord) -> list:
        """The masking rules' profiles for this caller and call (masking runs after us)."""
        cfg = self.masking_config()
        if cfg is None:
            return []
        ident = rec.identity
        out: list = [cfg.requests] if getattr(cfg, "requests", None) is not None else []
        for m in rec.messages:
            for prof in cfg.select(rec.connection, m.tool_name, ident.roles if ident else (),
                                   ident.sub if ident else None, ident.client_id if ident else None):
                if prof not in out:
                    out.append(prof)
        return out

    async def _wait(self, p: Pending) -> None:
        flow = p.flow
        while p.outcome is None:
            remaining = p.deadline - time.monotonic()
            if remaining <= 0:
                p.outcome = "timeout"
                break
            try:
                # woken at once by decide(); mitmweb's resume/kill and a disconnect set no
                # event we can wait on, hence the short poll
                await asyncio.wait_for(p.decided.wait(), min(POLL, remaining))
                break
            except TimeoutError:
                pass
            if not flow.intercepted:
                killed = flow.error is not None and flow.error.msg == mflow.Error.KILLED_MESSAGE
                if killed:
                    p.outcome, p.approver, p.reason = "denied", WEB_CONSOLE, "killed in mitmweb"
                elif ctx.options.bastion_web_approvals == "console":
                    p.outcome, p.approver = "approved", WEB_CONSOLE
                else:
                    flow.intercept()     # a resume by the shared console is not an approval
                    log.warning("approval %s: resumed in mitmweb, still held: approve with an approver token "
                                "(mcp-bastion approve %s --token ...)", p.id, p.id)
                    await self._update(flow)
            elif client_gone(flow):
                p.outcome, p.reason = "cancelled", "client disconnected"
            elif p.fingerprint and time.monotonic() >= p.next_check:
                p.next_check = time.monotonic() + SHARED_POLL
                self._spawn(self._check_shared(p))

    def _finish(self, p: Pending, rec: BastionRecord) -> None:
        flow = p.flow
        if flow.error is not None and flow.error.msg == mflow.Error.KILLED_MESSAGE:
            # a kill in the UI is a denial the caller should be told about, not a reset
            flow.error = None
            flow.live = True
        if flow.intercepted:
            flow.resume()
        rec.approval = {"id": p.id, "outcome": p.outcome, "approver": p.approver, "reason": p.reason,
                        "rule": p.rule, "waited": round(time.time() - p.created, 3), "decided_at": time.time(),
                        # the body the approver was shown (and, if approved, the one forwarded)
                        "request_sha256": rec.checked.body_sha256 if rec.checked else None}
        # the summary line becomes the outcome (the list's Comment column); the details stay
        details = flow.comment.split("\n", 1)[1] if "\n" in flow.comment else ""
        by = (f" by {p.approver}" if p.approver else "") + (f" ({p.reason})" if p.reason else "")
        flow.comment = esc(f"{OUTCOME_LABELS[p.outcome or 'cancelled']} {self._what(p)} |{by or ' -'} | id {p.id}") + (
            "\n" + details + "\n") + esc(
            f"Outcome: {p.outcome}" + (f" by {p.approver}" if p.approver else "") + (f" ({p.reason})" if p.reason else "") + ".")
        log.warning("approval %s: %s%s after %.1fs%s", p.id, p.outcome, f" by {p.approver}" if p.approver else "",
                    rec.approval["waited"], f" ({p.reason})" if p.reason else "")
        if p.outcome == "approved":
            ttl = ctx.options.bastion_approval_grant_ttl
            if ttl > 0:
                self.grants.add(fingerprint(rec), ttl)
            return
        if p.outcome == "timeout":
            code, msg = APPROVAL_TIMEOUT, f"approval timed out (rule {p.rule})"
        elif p.outcome == "denied":
            code, msg = APPROVAL_DENIED, f"approval denied (rule {p.rule})" + (f": {p.reason}" if p.reason else "")
        else:
            code, msg = APPROVAL_CANCELLED, f"approval cancelled (rule {p.rule}): {p.reason or 'cancelled'}"
        errors = [jsonrpc_error(m.id, code, msg, {"rule": p.rule, "approval": p.id})
                  for m in rec.messages if m.kind == "request"]
        refuse_jsonrpc(flow, errors or [jsonrpc_error(None, code, msg)], rec.batch, 200, reason=msg, rule=p.rule)

    @staticmethod
    def _what(p: Pending) -> str:
        tools = ", ".join(dict.fromkeys(str(c["target"] or c["method"]) for c in p.summary["calls"]))
        return f"{p.requester} -> {tools} | rule {p.rule}"

    def _comment(self, p: Pending) -> str:
        # line 1 is what mitmweb's Comment column shows: state, id, who, which tool, rule, deadline;
        # then one sentence per line (the Comment tab). Every line escaped (caller-chosen text).
        deadline = datetime.fromtimestamp(p.created + p.timeout, timezone.utc).strftime("%H:%M:%SZ")
        calls = [f"Call: {c['method']} {c['target'] or ''} {json.dumps(c['arguments'], ensure_ascii=False)[:500]}."
                 for c in p.summary["calls"]]
        lines = [f"HELD {self._what(p)} | until {deadline} | approvers {', '.join(p.approvers) or '-'} | id {p.id}",
                 f"APPROVAL {p.id} needed, rule {p.rule}.",
                 f"Requester: {p.requester} (roles {', '.join(p.summary['roles']) or '-'}).",
                 f"Connection: {p.connection}.", *calls,
                 f"Approvers: {', '.join(p.approvers) or 'mitmweb users'}.",
                 f"Deadline: {p.deadline_utc} ({p.timeout:g}s).",
                 f"Approve: mcp-bastion approve {p.id} --token <approver token>"
                 f"{' (or Resume here)' if ctx.options.bastion_web_approvals == 'console' else ''}; "
                 "Abort or `bastion.deny @focus \"reason\"` = deny."]
        return "\n".join(esc(line) for line in lines)

    @staticmethod
    async def _update(flow: http.HTTPFlow) -> None:
        await ctx.master.addons.trigger_event(hooks.UpdateHook([flow]))

    def _notify(self, p: Pending) -> None:
        url = ctx.options.bastion_approval_webhook
        if not url:
            return
        self._spawn(self._post_webhook(url, {"event": "approval.pending", **p.public()}))

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    async def _post_webhook(url: str, payload: dict) -> None:
        import httpx
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                r = await client.post(url, json=payload)
            if r.status_code >= 300:
                log.warning("approval webhook answered HTTP %d", r.status_code)
        except Exception as e:  # noqa: BLE001 - a notification failure decides nothing
            log.warning("approval webhook failed: %s", type(e).__name__)

    # --- decisions -----------------------------------------------------------------------

    def decide(self, approval_id: str, outcome: str, approver: str | None, reason: str = "") -> Pending:
        p = self.pending.get(approval_id)
        if p is None or p.outcome is not None:
            raise KeyError(approval_id)
        p.outcome, p.approver, p.reason = outcome, approver, reason[:MAX_REASON]
        p.decided.set()
        return p

    def _decide_flows(self, flows: Sequence[mflow.Flow], outcome: str, reason: str = "") -> None:
        if outcome == "approved" and ctx.options.bastion_web_approvals != "console":
            log.warning("bastion.approve: the web console is not an identified approver "
                        "(bastion_web_approvals=identified); use mcp-bastion approve ID --token ...")
            return
        for f in flows:
            pid = f.metadata.get("bastion_approval_id")
            if pid in self.pending and self.pending[pid].outcome is None:
                self.decide(pid, outcome, WEB_CONSOLE, reason)
            else:
                log.warning("flow %s is not waiting for approval", f.id)

    @command.command("bastion.approve")
    def approve_cmd(self, flows: Sequence[mflow.Flow]) -> None:
        """Approve held MCP calls (mitmweb command bar: bastion.approve @focus)."""
        self._decide_flows(flows, "approved")

    @command.command("bastion.deny")
    def deny_cmd(self, flows: Sequence[mflow.Flow], reason: str = "") -> None:
        """Deny held MCP calls with a reason the caller sees (bastion.deny @focus "why")."""
        self._decide_flows(flows, "denied", reason)

    # --- admin API: /_bastion/approvals[/<id>/approve|deny] ----------------------------------

    @staticmethod
    def _admin_parts(flow: http.HTTPFlow, rec: BastionRecord) -> list[str] | None:
        """The admin path's parts once the caller is identified; None when already answered."""
        if flow.response is not None:
            return None  # identity already refused the token
        if rec.identity is None:
            refuse_http(flow, 401, "unauthorized", "an approver bearer token is required",
                        {"www-authenticate": "Bearer"})
            return None
        parts = flow.request.path.split("?")[0][len(ADMIN_PREFIX):].strip("/").split("/")
        if parts == [""] and flow.request.method == "GET":
            return parts
        if len(parts) != 2 or parts[1] not in ("approve", "deny") or flow.request.method != "POST":
            refuse_http(flow, 404, "not_found", "use GET /_bastion/approvals or POST /_bastion/approvals/<id>/approve|deny")
            return None
        return parts

    @staticmethod
    def _deny_reason(flow: http.HTTPFlow) -> str:
        try:
            body = json.loads(flow.request.get_text() or "{}")
            return str(body.get("reason", "")) if isinstance(body, dict) else ""
        except (ValueError, UnicodeDecodeError):
            return ""

    def admin(self, flow: http.HTTPFlow, rec: BastionRecord) -> None:
        parts = self._admin_parts(flow, rec)
        if parts is None:
            return
        ident = rec.identity
        if parts == [""]:
            visible = [p.public() for p in self.pending.values()
                       if p.outcome is None and set(p.approvers) & set(ident.roles)]
            flow.response = json_response(200, {"pending": visible})
            return
        pid, action = parts
        p = self.pending.get(pid)
        if p is None or p.outcome is not None:
            refuse_http(flow, 404, "not_found", "no pending approval with that id (unknown or already decided)")
            return
        if ident.sub == p.requester:
            log.warning("approval %s: %s tried to decide their own request", pid, ident.sub)
            refuse_http(flow, 403, "forbidden", "you cannot decide your own request", rule="approval:self")
            return
        mine = p.may_decide(ident.roles)
        if not mine:
            log.warning("approval %s: %s lacks an approver role (%s)", pid, esc(ident.sub), ",".join(p.approvers))
            refuse_http(flow, 403, "insufficient_scope", f"deciding needs one of the roles {', '.join(p.approvers)}",
                        rule="approval:role")
            return
        if action == "deny":
            self.decide(pid, "denied", ident.sub, self._deny_reason(flow))      # any one held call refused refuses all
        else:
            for i in mine:
                p.approved_by.setdefault(i, ident.sub)
            if len(p.approved_by) < len(p.needs):
                # a batch holding calls under other approvers: each needs its own approver
                log.warning("approval %s: approved by %s for %s; still waiting for %s", pid, esc(ident.sub),
                            ", ".join(p.needs[i].rule for i in mine), ",".join(p.approvers))
                flow.response = json_response(200, {"id": pid, "outcome": "pending", "approver": ident.sub,
                                                    "waiting_for": list(p.approvers)})
                return
            self.decide(pid, "approved", ", ".join(dict.fromkeys(p.approved_by.values())))
        flow.response = json_response(200, {"id": pid, "outcome": p.outcome, "approver": p.approver})

    # --- shared engine (bastion_state): a sealed record per hold, decided through any replica ---

    async def _share(self, p: Pending, rec: BastionRecord) -> bool:
        """Store the hold's sealed record; False when the engine is down (the call is refused)."""
        p.fingerprint, p.next_check = fingerprint(rec), time.monotonic() + SHARED_POLL
        try:
            await self.state.store.put_approval(self._record(p), p.timeout)
        except StateUnavailable as e:
            self.state.mark(False, str(e))
            log.warning("approval for %s on %s refused: the shared state engine is unavailable", p.requester,
                        p.connection)
            return False
        return True

    def _record(self, p: Pending) -> dict:
        """The hold as the engine stores it, sealed (what other replicas list and decide)."""
        return self.state.sealer.seal({
            "id": p.id, "fingerprint": p.fingerprint, "requester": p.requester, "connection": p.connection,
            "rule": p.rule, "needs": [{"rule": n.rule, "approvers": list(n.approvers)} for n in p.needs],
            "approved_by": {}, "outcome": None, "approver": None, "reason": "", "created": p.created,
            "deadline": p.created + p.timeout, "summary": p.summary})

    async def _unshare(self, pid: str) -> None:
        try:
            await self.state.store.drop_approval(pid)
        except StateUnavailable:
            pass                  # the record expires by itself (deadline + grace)

    def _on_announced(self, pid: str) -> None:
        """A replica announced a decision (pid) or the subscription restarted (""): each
        hold concerned re-reads its record; the message itself decides nothing."""
        for p in ([self.pending.get(pid)] if pid else list(self.pending.values())):
            if p is not None and p.outcome is None and p.fingerprint:
                self._spawn(self._check_shared(p))

    async def _check_shared(self, p: Pending) -> None:
        try:
            record = await self.state.store.get_approval(p.id)
            if record is None and p.outcome is None:
                # the engine restarted empty (or the key was removed): list the hold again
                await self.state.store.put_approval(self._record(p), max(1.0, p.deadline - time.monotonic()))
                log.warning("approval %s: record missing in the shared engine, written again", p.id)
                return
        except StateUnavailable:
            return                # still held; the next look or announcement decides
        if record is None or p.outcome is not None:
            return
        if not (self.state.sealer.valid(record) and record.get("id") == p.id
                and record.get("fingerprint") == p.fingerprint):
            log.warning("approval %s: ignored a stored record not sealed for this call", p.id)
            return
        if record.get("outcome") in ("approved", "denied"):
            self.decide(p.id, record["outcome"], str(record.get("approver") or ""), str(record.get("reason") or ""))

    @staticmethod
    def _shared_public(r: dict) -> dict:
        by = r.get("approved_by") or {}
        left = sorted({a for i, n in enumerate(r["needs"]) if str(i) not in by for a in n["approvers"]})
        return {"id": r["id"], "requester": r["requester"], "connection": r["connection"], "rule": r["rule"],
                "approvers": left, "created": r["created"],
                "deadline": datetime.fromtimestamp(r["deadline"], timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "needs": [{**n, "approved_by": by.get(str(i))} for i, n in enumerate(r["needs"])],
                "expires_in": round(max(0.0, r["deadline"] - time.time()), 1), **r.get("summary", {})}

    def _live_record(self, r: Any) -> bool:
        return (self.state.sealer.valid(r) and r.get("outcome") is None and isinstance(r.get("deadline"), (int, float))
                and r["deadline"] > time.time())

    async def admin_shared(self, flow: http.HTTPFlow, rec: BastionRecord) -> None:
        """The admin API over the shared records: any replica lists and decides any hold;
        the holder is told through the engine's channel and checks the sealed record."""
        parts = self._admin_parts(flow, rec)
        if parts is None:
            return
        ident, store = rec.identity, self.state.store
        try:
            if parts == [""]:
                visible = [self._shared_public(r) for r in await store.list_approvals()
                           if self._live_record(r) and set(self._shared_public(r)["approvers"]) & set(ident.roles)]
                flow.response = json_response(200, {"pending": visible})
                return
            pid, action = parts
            refusal: list = [(404, "not_found", "no pending approval with that id (unknown or already decided)", None)]
            reason = self._deny_reason(flow) if action == "deny" else ""

            def change(r: dict) -> dict | None:
                if not self._live_record(r) or r.get("id") != pid:
                    return None
                if ident.sub == r["requester"]:
                    refusal[0] = (403, "forbidden", "you cannot decide your own request", "approval:self")
                    return None
                mine = may_decide([Need(n["rule"], tuple(n["approvers"])) for n in r["needs"]], ident.roles)
                if not mine:
                    refusal[0] = (403, "insufficient_scope", "deciding needs one of the roles "
                                  f"{', '.join(self._shared_public(r)['approvers'])}", "approval:role")
                    return None
                new = {k: v for k, v in r.items() if k != "mac"}
                if action == "deny":
                    new.update(outcome="denied", approver=ident.sub, reason=reason[:MAX_REASON])
                else:
                    by = {**r["approved_by"], **{str(i): r["approved_by"].get(str(i), ident.sub) for i in mine}}
                    new["approved_by"] = by
                    if len(by) >= len(r["needs"]):
                        new.update(outcome="approved", approver=", ".join(dict.fromkeys(by.values())))
                return self.state.sealer.seal(new)

            new = await store.update_approval(pid, change) if APPROVAL_ID.fullmatch(pid) else None
            if new is None:
                status, error, text, rule = refusal[0]
                if status == 403:
                    log.warning("approval %s: %s refused (%s)", pid, esc(ident.sub), rule)
                refuse_http(flow, status, error, text, rule=rule)
                return
            try:
                await store.announce(pid)
            except StateUnavailable:
                pass              # the holder's periodic look at its record finds the decision
        except StateUnavailable as e:
            self.state.mark(False, str(e))
            refuse_http(flow, 503, "state_unavailable", "the shared state engine is unavailable: "
                        "pending approvals cannot be listed or decided right now", rule="state:unavailable")
            return
        if new["outcome"] is None:
            flow.response = json_response(200, {"id": pid, "outcome": "pending", "approver": ident.sub,
                                                "waiting_for": self._shared_public(new)["approvers"]})
            return
        log.warning("approval %s: %s by %s (through the shared engine)", pid, new["outcome"], esc(new["approver"]))
        flow.response = json_response(200, {"id": pid, "outcome": new["outcome"], "approver": new["approver"]})


# --- CLI ------------------------------------------------------------------------------------
