"""The `policy` addon: one decision per JSON-RPC message, from rules/policy.yaml.

Denials are answered here (JSON-RPC error, HTTP 200, the request's id, the rule's name);
`approve` decisions are left to the approval addon. List results are filtered to what the
caller may use, and server->client requests on the response stream are governed too.
"""
from __future__ import annotations

import base64
import json
import time
from collections import OrderedDict
from pathlib import Path

from mitmproxy import ctx, exceptions, http

from addons.hooks.reloading import Watching
from addons.core.connections import ConnectionRegistry
from addons.core.shell import paths as pathguard
from addons.hooks.httputil import checked_snapshot, refuse_jsonrpc
from addons.core.mcpwire import (LIST_METHODS, SERVER_REQUEST_METHODS, Message, decode_header_value, jsonrpc_error,
                         parse_message)
from addons.core.policy.rules import (Policy as RulesPolicy, ScanBudget, evaluate, filter_list_result, load_policy, policy_files)
from addons.core.record import Decision, Identity, ResultSource, SharedTake, get_record
from addons.core.statestore import SharedState
from addons.core.rules import RulesError, RulesWatch
from addons.core.textsafe import get_logger

log = get_logger("bastion.policy")

# JSON-RPC error codes of policy refusals. The JSON-RPC "server error" range
# (-32000..-32099) is implementation-defined; MCP uses -32000..-32002 and -32020..-32042,
# so the gateway takes -32030.. to stay clear of both.
DENIED = -32030
APPROVAL_UNAVAILABLE = -32031
RATE_LIMITED = -32032
BLAST_RADIUS = -32037
MAX_BUCKETS = 10_000


class RateLimiter:
    """Token buckets per (rule, sub, tool); bounded, least-recently-used evicted."""

    def __init__(self, max_buckets: int = MAX_BUCKETS):
        self.buckets: OrderedDict[tuple, tuple[float, float]] = OrderedDict()
        self.max = max_buckets

    def take(self, key: tuple, calls: int, per: float, now: float | None = None, cost: int = 1) -> float:
        """0 when allowed (and `cost` taken), else seconds until it would be."""
        now = time.monotonic() if now is None else now
        tokens, last = self.buckets.get(key, (float(calls), now))
        tokens = min(float(calls), tokens + (now - last) * calls / per)
        if tokens >= cost:
            self.buckets[key] = (tokens - cost, now)
            wait = 0.0
        else:
            self.buckets[key] = (tokens, now)
            wait = (cost - tokens) * per / calls
        self.buckets.move_to_end(key)
        while len(self.buckets) > self.max:
            self.buckets.popitem(last=False)
        return wait


def refusal_error(d: Decision) -> dict:
    if d.action == "approve":
        return jsonrpc_error(d.message_id, APPROVAL_UNAVAILABLE,
                             f"call requires approval (rule {d.rule}) but no approval addon is loaded")
    rule = d.rule or "default-deny"
    return jsonrpc_error(d.message_id, d.code or DENIED, f"denied by mcp-bastion policy rule {rule}: {d.reason or 'not allowed'}",
                         {"rule": rule})


class Policy(Watching):
    name = "policy"

    def __init__(self, connections: ConnectionRegistry | None = None, approvals: bool = False,
                 state: SharedState | None = None) -> None:
        self.registry = connections or ConnectionRegistry()
        # state: with a shared engine (bastion_state), bucket takes are left on the record
        # for the state stage (atomic across replicas); embedded, the buckets below count
        self.state = state or SharedState()
        # approvals: an approval stage follows; without one, `approve` decisions are refused
        self.approvals = approvals
        self.policy: RulesPolicy | None = None
        self.limiter = RateLimiter()
        self.blast = RateLimiter()      # items touched per principal x rule (survives reloads)
        self.environment = ""           # bastion_environment (configure)
        self._watch = RulesWatch(self.reload)
        self.watches = (self._watch,)
        self.budget = ScanBudget()

    def load(self, loader):
        loader.add_option("bastion_environment", str, "",
                          "Environment of this gateway (dev, prod, ...) for rules with `when: environment`; "
                          "a connection's own `environment:` wins.")
        loader.add_option("bastion_scan_limit", int, ScanBudget.max_chars,
                          "Characters of argument text the gateway checks per call (blocklist); more -> refused.")
        loader.add_option("bastion_scan_seconds", float, ScanBudget.seconds,
                          "Seconds the gateway spends checking one call's arguments; longer -> refused.")

    def _environment(self, connection: str) -> str:
        conn = self.registry.get(connection)
        return (conn.environment if conn is not None else None) or self.environment

    def configure(self, updated):
        if "bastion_environment" in updated:
            self.environment = ctx.options.bastion_environment     # read here, not on every call
        if updated & {"bastion_scan_limit", "bastion_scan_seconds"}:
            if ctx.options.bastion_scan_limit < 1 or ctx.options.bastion_scan_seconds <= 0:
                raise exceptions.OptionsError("bastion_scan_limit and bastion_scan_seconds must be positive")
            self.budget = ScanBudget(ctx.options.bastion_scan_limit, ctx.options.bastion_scan_seconds)
        if "bastion_rules" in updated:
            rules = Path(ctx.options.bastion_rules)
            try:
                self.policy = load_policy(rules)
            except RulesError as e:
                raise exceptions.OptionsError(f"policy: {e}") from None
            self.policy.protected = gateway_paths(str(rules))
            self._watch.watch(lambda: policy_files(rules))
            log.info("policy loaded: %d rule(s), %d blocklist pattern(s)", len(self.policy.rules),
                     len(self.policy.blocklist))

    def reload(self) -> bool:
        try:
            new = load_policy(ctx.options.bastion_rules)
        except RulesError as e:
            log.error("policy reload rejected, keeping the last good rules: %s", e)
            return False
        new.protected = gateway_paths(str(ctx.options.bastion_rules))
        self.policy = new
        log.info("policy reloaded: %d rule(s)", len(new.rules))
        return True

    def request(self, flow: http.HTTPFlow) -> None:
        rec = get_record(flow.metadata)
        if flow.response is not None or rec.connection is None or self.policy is None:
            return
        policy, conn, ident = self.policy, rec.connection, rec.identity
        env = self._environment(conn)
        # list results shown only with what the caller may use (a refused request never gets
        # its response here). Before the transform below, which changes only server->client
        # requests: the filter still sees the result as the upstream sent it
        # (rec.response_source), so its cached answer for that list can be used.
        for m in rec.messages:
            if m.method in LIST_METHODS:
                method = m.method
                rec.response_transforms.append(
                    lambda msg, method=method: _filter(policy, ident, conn, method, msg, env, rec.response_source))
        # server->client requests travelling back on this flow's response stream
        rec.response_transforms.append(lambda m: govern_server_request(policy, ident, conn, m, env))
        if flow.request.method != "POST":
            return
        deferred = rec.shared_takes if self.state.shared else None
        decisions = [self._decide(policy, ident, conn, m, env, deferred) for m in rec.messages]
        rec.decisions = decisions
        for d in decisions:
            log.info("%s %s %s -> %s (%s)", ident.sub if ident else "-", conn,
                     _what(rec.messages, d), d.action, d.rule or "default-deny")
        refused = [d for d in decisions if d.action == "deny"
                   or (d.action == "approve" and not self.approvals)]
        if refused:
            errors = []
            for d, m in zip(decisions, rec.messages):
                if m.kind != "request":
                    continue
                if d.action in ("deny", "approve") and d in refused:
                    errors.append(refusal_error(d))
                else:
                    errors.append(jsonrpc_error(m.id, DENIED, "batch refused: another call in it was denied"))
            first = refused[0]
            if not errors:  # only notifications were denied: nothing to answer
                flow.response = http.Response.make(202, b"")
                rec.refuse(f"denied notification by {first.rule or 'default-deny'}", first.rule)
                return
            refuse_jsonrpc(flow, errors, rec.batch, 200,
                           reason=f"denied by {first.rule or 'default-deny'}: {first.reason}", rule=first.rule)
            return
        if any(d.rewrites for d in decisions):
            apply_rewrites(flow, rec)

    def _decide(self, policy: RulesPolicy, ident: Identity | None, conn: str, m: Message, env: str = "",
                deferred: list[SharedTake] | None = None) -> Decision:
        d = evaluate(policy, ident, conn, m, environment=env, budget=self.budget)
        if d.action == "deny" or d.rule is None:
            return d
        rule = next((r for r in policy.rules if r.name == d.rule), None)
        sub = ident.sub if ident else ""
        if rule is not None and rule.rate_limit is not None:
            calls, per = rule.rate_limit
            key, why = (rule.name, sub, m.target or m.method), f"rate limit of {calls} calls per {per:g}s exceeded"
            if deferred is not None:
                deferred.append(SharedTake(("rate", *key), calls, per, 1, m.id, rule.name, RATE_LIMITED, why))
            else:
                wait = self.limiter.take(key, calls, per)
                if wait > 0:
                    return Decision("deny", rule.name, f"{why}; retry after {wait:.1f}s", message_id=m.id,
                                    code=RATE_LIMITED)
        if rule is not None and rule.blast is not None:
            why = self._blast(rule, sub, m, deferred)
            if why:
                return Decision("deny", rule.name, why, message_id=m.id, code=BLAST_RADIUS)
        return d

    def _blast(self, rule, sub: str, m: Message, deferred: list[SharedTake] | None = None) -> str | None:
        b = rule.blast
        n = b.count(m.arguments)
        if b.max_per_call is not None and n > b.max_per_call:
            return f"blast radius: this call touches {n} items ({b.path}), the limit is {b.max_per_call} per call"
        if b.max_per_window is not None and n:
            why = (f"blast radius: {sub or 'this caller'} may touch {b.max_per_window} items per "
                   f"{b.per:g}s under this rule; this call ({n}) would exceed it")
            if n > b.max_per_window:
                return why
            if deferred is not None:
                deferred.append(SharedTake(("blast", rule.name, sub), b.max_per_window, b.per, n, m.id, rule.name,
                                           BLAST_RADIUS, why))
            elif self.blast.take((rule.name, sub), b.max_per_window, b.per, cost=n) > 0:
                return why
        return None


def rewritten_messages(messages: list[Message], decisions: list[Decision]) -> list[Message]:
    """The messages with each decision's argument rewrites applied (pure)."""
    out = []
    for m, d in zip(messages, decisions):
        if d.rewrites and isinstance(m.params.get("arguments"), dict):
            raw = {**m.raw, "params": {**m.params, "arguments": {**m.params["arguments"], **dict(d.rewrites)}}}
            m = parse_message(raw)
        out.append(m)
    return out


def apply_rewrites(flow: http.HTTPFlow, rec) -> None:
    """The upstream (and the audit) get the rewritten arguments: re-serialise the body, and
    re-encode any Mcp-Param-* header that mirrored a rewritten argument (it must still match)."""
    originals = {m.arguments.get(arg) for m, d in zip(rec.messages, rec.decisions) for arg, _ in d.rewrites}
    news = {m.arguments.get(arg): new for m, d in zip(rec.messages, rec.decisions) for arg, new in d.rewrites}
    fields = []
    for k, v in flow.request.headers.fields:
        if k.lower().startswith(b"mcp-param-") and decode_header_value(v.decode("latin-1")) in originals:
            new = news[decode_header_value(v.decode("latin-1"))]
            v = f"=?base64?{base64.b64encode(new.encode()).decode('ascii')}?=".encode("latin-1")
        fields.append((k, v))
    flow.request.headers.fields = tuple(fields)
    rec.messages = rewritten_messages(rec.messages, rec.decisions)
    raws = [m.raw for m in rec.messages]
    flow.request.content = json.dumps(raws if rec.batch else raws[0], ensure_ascii=False,
                                      separators=(",", ":")).encode()
    rec.checked = checked_snapshot(flow.request)   # the rewritten request is the one decided on


# options naming the gateway's own files: never readable through a shell / path rule
GATEWAY_PATH_OPTIONS = ("bastion_rules", "bastion_recordings", "bastion_key_dir", "bastion_mask_key_file",
                        "bastion_vault")


def gateway_paths(rules_dir: str) -> tuple[str, ...]:
    """The running gateway's own directories and credential files (addons/core/shell/paths.py)."""
    paths = [getattr(ctx.options, o, "") if o in ctx.options else "" for o in GATEWAY_PATH_OPTIONS]
    try:
        from addons.core.connections import load_connections
        creds = [c.credential for c in load_connections(rules_dir).values() if c.credential is not None]
        # the service secret, a token-exchange client secret, the vault key
        sources = [s for c in creds for s in (c.source, getattr(c, "client_secret_source", None)) if s]
        if "bastion_vault_key" in ctx.options:
            sources.append(ctx.options.bastion_vault_key)
    except RulesError:
        sources = []                      # the Router refuses to start on a bad connections file
    return pathguard.protected_dirs(*paths, *pathguard.credential_files(rules_dir, sources))


def _what(messages: list[Message], d: Decision) -> str:
    m = next((m for m in messages if m.id == d.message_id), None)
    if m is None:
        return "?"
    return f"{m.method}:{m.target}" if m.target else str(m.method)


def _filter(policy, ident, conn, method: str, msg: dict, env: str = "", source: ResultSource | None = None) -> dict:
    if "result" in msg and "id" in msg:
        digest = source.digest() if source is not None else None
        msg = {**msg, "result": filter_list_result(policy, ident, conn, method, msg["result"], env, digest)}
    return msg


def govern_server_request(policy, ident, conn, msg: dict, env: str = "") -> dict:
    """A server->client request (sampling, elicitation, roots) on the stream: forward it only
    when a `direction: server_to_client` rule allows it; otherwise the client sees a log
    notification saying it was blocked (a JSON-RPC request cannot be answered by the gateway
    towards the upstream from inside a response stream)."""
    method = msg.get("method")
    if not isinstance(method, str) or "id" not in msg or method not in SERVER_REQUEST_METHODS or method == "ping":
        return msg
    m = Message(kind="request", raw=msg, id=msg.get("id"), method=method)
    d = evaluate(policy, ident, conn, m, direction="server_to_client", environment=env)
    if d.action == "allow":
        return msg
    log.warning("blocked server->client %s on %s (%s)", method, conn, d.rule or "default-deny")
    return {"jsonrpc": "2.0", "method": "notifications/message",
            "params": {"level": "warning", "logger": "mcp-bastion",
                       "data": f"mcp-bastion blocked a server request ({method}) by policy {d.rule or 'default-deny'}"}}
