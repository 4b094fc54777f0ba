"""Policy language and evaluation (addons/core/policy/rules.py, addons/hooks/policy.py), without
mitmproxy: one test per predicate, classifier and precedence rule, file:line errors,
list filtering, rate limits, and the policy addon's refusals."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from mitmproxy.test import taddons, tflow, tutils

from addons.core import mcpwire

from addons.core.sql import classify as sqlclass
from addons.hooks.connections import Router
from addons.hooks.policy import DENIED, RATE_LIMITED, Policy as PolicyAddon, RateLimiter, govern_server_request
from addons.core.policy.rules import evaluate, explain, filter_list_result, load_policy, visible
from addons.core.record import Identity, get_record
from addons.core.rules import RulesError

ANA = Identity("ana", ("analyst",))
DEV = Identity("dan", ("dev",), client_id="ci-runner")


def policy(tmp_path: Path, text: str, blocklist: str | None = None):
    (tmp_path / "policy.yaml").write_text(textwrap.dedent(text))
    if blocklist is not None:
        (tmp_path / "blocklist.yaml").write_text(textwrap.dedent(blocklist))
    return load_policy(tmp_path)


def call(tool: str, args: dict | None = None, msg_id=1, method="tools/call"):
    params = {"name": tool, "arguments": args or {}} if method != "resources/read" else {"uri": tool}
    return mcpwire.parse_message({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})


# --- predicates -------------------------------------------------------------------------

ARGS_POLICY = """
rules:
  - name: eq
    when: {tool: t_eq, args: [{path: $.mode, equals: "ro"}]}
    allow: true
  - name: rx
    when: {tool: t_rx, args: [{path: $.path, regex: "reports/[a-z0-9_]+\\\\.csv"}]}
    allow: true
  - name: oneof
    when: {tool: t_one, args: [{path: $.env, one_of: [dev, staging]}]}
    allow: true
  - name: range
    when: {tool: t_range, args: [{path: $.limit, min: 1}, {path: $.limit, max: 100}]}
    allow: true
  - name: absent
    when: {tool: t_abs, args: [{path: $.privileged, absent: true}]}
    allow: true
  - name: present
    when: {tool: t_pres, args: [{path: $.ticket, present: true}]}
    allow: true
  - name: nested
    when: {tool: t_nested, args: [{path: "$.items[*].qty", max: 10}]}
    allow: true
"""


@pytest.mark.parametrize("tool,args,allowed", [
    ("t_eq", {"mode": "ro"}, True), ("t_eq", {"mode": "rw"}, False), ("t_eq", {}, False),
    ("t_eq", {"mode": ["ro"]}, False),
    ("t_rx", {"path": "reports/q3_2026.csv"}, True), ("t_rx", {"path": "reports/../secrets.csv"}, False),
    ("t_rx", {"path": "reports/a.csv\n/etc/passwd"}, False),          # fullmatch, not search
    ("t_one", {"env": "dev"}, True), ("t_one", {"env": "prod"}, False),
    ("t_range", {"limit": 50}, True), ("t_range", {"limit": 0}, False), ("t_range", {"limit": 101}, False),
    ("t_range", {"limit": "50"}, False), ("t_range", {"limit": True}, False),   # types are not coerced
    ("t_abs", {}, True), ("t_abs", {"privileged": False}, False),
    ("t_pres", {"ticket": "CHG-1"}, True), ("t_pres", {}, False),
    ("t_nested", {"items": [{"qty": 1}, {"qty": 10}]}, True),
    ("t_nested", {"items": [{"qty": 1}, {"qty": 11}]}, False),        # every addressed value must pass
])
def test_argument_predicates(tmp_path, tool, args, allowed):
    p = policy(tmp_path, ARGS_POLICY)
    d = evaluate(p, DEV, "demo", call(tool, args))
    assert (d.action == "allow") is allowed, d


SQL_POLICY = """
rules:
  - name: read-only
    when: {tool: query_sql, sql: {arg: sql, class: [read]}}
    allow: true
  - name: writes-orders
    when: {tool: write_sql, sql: {arg: sql, class: [write], tables: [orders]}}
    allow: true
"""


@pytest.mark.parametrize("sql,cls", [
    ("SELECT 1", {"read"}),
    ("SELECT a.x FROM a JOIN b ON a.id = b.id", {"read"}),
    ("WITH w AS (SELECT 1) SELECT * FROM w", {"read"}),
    ("INSERT INTO t VALUES (1)", {"write"}),
    ("UPDATE t SET a = 1", {"write"}),
    ("DELETE FROM t", {"write"}),
    ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", {"read", "write"}),
    ("DROP TABLE customers", {"ddl"}),
    ("CREATE TABLE x (a INT)", {"ddl"}),
    ("ALTER TABLE t ADD COLUMN c INT", {"ddl"}),
    ("SELECT * INTO copy FROM t", {"read", "ddl"}),
    ("GRANT SELECT ON t TO bob", {"dcl"}),
    ("SELECT 1; DROP TABLE t", {"read", "ddl", "multiple"}),
    ("SELECT FROM WHERE (", {"unparsable"}),
    ("SELECT * FROM read_csv('/etc/passwd')", {"read", "files"}),
])
def test_sql_classifier(sql, cls):
    assert set(sqlclass.classify(sql).classes) == cls


@pytest.mark.parametrize("tool,sql,allowed", [
    ("query_sql", "SELECT * FROM customers WHERE notes = 'drop table customers'", True),
    ("query_sql", "SELECT 1; DROP TABLE customers", False),
    ("query_sql", "/* hi */ DROP TABLE customers", False),
    ("query_sql", "DELETE FROM customers", False),
    ("write_sql", "INSERT INTO orders VALUES (1)", True),
    ("write_sql", "INSERT INTO customers VALUES (1)", False),
    ("write_sql", "DROP TABLE orders", False),
])
def test_sql_predicate(tmp_path, tool, sql, allowed):
    d = evaluate(policy(tmp_path, SQL_POLICY), ANA, "demo", call(tool, {"sql": sql}))
    assert (d.action == "allow") is allowed, d


SHELL_POLICY = """
rules:
  - name: safe-shell
    when: {tool: run_command, shell: {commands: [ls, grep, "git*"]}}
    allow: true
  - name: pipes-ok
    when: {tool: run_piped, shell: {commands: [grep, wc, sort], operators: true}}
    allow: true
  - name: no-curl
    when: {tool: "*", shell: {any_command: [curl, wget]}}
    deny: no downloads
"""


@pytest.mark.parametrize("tool,cmd,allowed", [
    ("run_command", "ls -la", True), ("run_command", "grep -r foo .", True),
    ("run_command", "/bin/ls", True), ("run_command", "l''s", True),         # the shell joins quotes
    ("run_command", "ls; rm -rf x", False), ("run_command", "ls && id", False),
    ("run_command", "ls\nid", False), ("run_command", "ls $(id)", False), ("run_command", "ls `id`", False),
    ("run_command", "ls > /etc/hosts", False), ("run_command", "LC_ALL=C ls", True),
    # an environment assignment can load code (LD_PRELOAD, PATH, GCONV_PATH): only locale ones pass
    ("run_command", "FOO=1 ls", False), ("run_command", "PATH=. ls", False),
    ("run_command", "sudo ls", False), ("run_command", "echo \"unbalanced", False),
    ("run_command", "", False),
    ("run_piped", "grep foo x | sort | wc -l", True), ("run_piped", "grep foo x | sh", False),
    ("run_piped", "curl x", False),
])
def test_shell_predicate(tmp_path, tool, cmd, allowed):
    d = evaluate(policy(tmp_path, SHELL_POLICY), DEV, "demo", call(tool, {"command": cmd}))
    assert (d.action == "allow") is allowed, (cmd, d)


def test_shell_any_command_denies_wrapped_programs(tmp_path):
    p = policy(tmp_path, SHELL_POLICY)
    for cmd in ("curl x", "sudo -E curl x", "ls | wget y", "timeout 5 curl z"):
        d = evaluate(p, DEV, "demo", call("run_piped", {"command": cmd}))
        assert (d.action, d.rule) == ("deny", "no-curl"), cmd


# --- subjects ------------------------------------------------------------------------------

def test_subjects(tmp_path):
    p = policy(tmp_path, """
    rules:
      - {name: by-sub, when: {sub: "ci/*", tool: a}, allow: true}
      - {name: by-role, when: {roles: [dev, ops], tool: b}, allow: true}
      - {name: by-client, when: {client_id: ci-runner, tool: c}, allow: true}
      - {name: by-conn, when: {connection: "prod-*", tool: d}, allow: true}
    """)
    ok = lambda ident, tool, conn="demo": evaluate(p, ident, conn, call(tool)).action == "allow"  # noqa: E731
    assert ok(Identity("ci/job-1"), "a") and not ok(Identity("alice"), "a")
    assert ok(DEV, "b") and not ok(ANA, "b")
    assert ok(DEV, "c") and not ok(Identity("dan", ("dev",), client_id="laptop"), "c")
    assert ok(ANA, "d", "prod-db") and not ok(ANA, "d", "staging-db")
    assert evaluate(p, None, "demo", call("a")).action == "deny"       # no identity, subject rules never match


# --- precedence ----------------------------------------------------------------------------

PRECEDENCE = """
rules:
  - {name: allow-all-tools, when: {tool: "*"}, allow: true}
  - {name: approve-launch, when: {tool: launch_container}, approve: {approvers: [approver], timeout: 30}}
  - {name: deny-priv, when: {tool: launch_container, args: [{path: $.privileged, equals: true}]}, deny: never privileged}
"""


def test_precedence_deny_over_approve_over_allow(tmp_path):
    p = policy(tmp_path, PRECEDENCE, blocklist="patterns: [{name: tcp, regex: '/dev/tcp/'}]\n")
    assert evaluate(p, DEV, "demo", call("ls_tool")).rule == "allow-all-tools"
    d = evaluate(p, DEV, "demo", call("launch_container", {"image": "x"}))
    assert (d.action, d.rule, d.approvers, d.timeout) == ("approve", "approve-launch", ("approver",), 30.0)
    d = evaluate(p, DEV, "demo", call("launch_container", {"image": "x", "privileged": True}))
    assert (d.action, d.rule, d.reason) == ("deny", "deny-priv", "never privileged")
    # the blocklist outranks every rule, whatever the tool
    d = evaluate(p, DEV, "demo", call("ls_tool", {"x": "cat < /dev/tcp/1.2.3.4/80"}))
    assert (d.action, d.rule) == ("deny", "blocklist:tcp")


def test_default_deny_and_baseline(tmp_path):
    p = policy(tmp_path, "rules: []\n")
    assert evaluate(p, DEV, "demo", call("anything")).action == "deny"
    assert evaluate(p, DEV, "demo", call("anything")).rule is None
    init = mcpwire.parse_message({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert evaluate(p, DEV, "demo", init).action == "allow"            # baseline plumbing
    assert evaluate(p, None, "demo", init).action == "deny"            # only for verified identities
    # resources and prompts are default deny too
    assert evaluate(p, DEV, "demo", call("file:///etc/passwd", method="resources/read")).action == "deny"


# --- rule files ------------------------------------------------------------------------------

@pytest.mark.parametrize("text,line,fragment", [
    ("rules:\n  - name: a\n    when: {tool: x}\n", 2, "exactly one of allow / deny / approve"),
    ("rules:\n  - name: a\n    allow: true\n  - name: a\n    deny: true\n", 4, "already used"),
    ("rules:\n  - name: a\n    when: {toll: x}\n    allow: true\n", 3, "unknown 'when' key"),
    ("rules:\n  - name: a\n    when:\n      args: [{path: '$..[', equals: 1}]\n    allow: true\n", 4, "JSONPath"),
    ("rules:\n  - name: a\n    when:\n      sql: {class: [reads]}\n    allow: true\n", 4, "unknown SQL class"),
    ("rules:\n  - name: a\n    when:\n      shell: {operators: true}\n    allow: true\n", 4, "commands"),
    ("rules:\n  - name: a\n    approve: {approvers: [x], timeout: -1}\n", 3, "timeout"),
    ("rules:\n  - name: a\n    approve: true\n", 3, "needs approvers"),
    ("rules:\n  - name: a\n    when: {tool: x}\n    approve: {timeout: 30}\n", 4, "needs approvers"),
    ("rules:\n  - name: a\n    approve:\n      approvers: []\n", 4, "needs approvers"),
    ("rules:\n  - name: a\n    allow: true\n    rate_limit: {calls: 0}\n", 4, "rate_limit"),
    ("rules:\n  - name: a\n    allow: yes please\n", 3, "'allow' must be true"),
])
def test_rule_errors_name_file_and_line(tmp_path, text, line, fragment):
    (tmp_path / "policy.yaml").write_text(text)
    with pytest.raises(RulesError) as e:
        load_policy(tmp_path)
    assert e.value.file.endswith("policy.yaml") and e.value.line == line, str(e.value)
    assert fragment in str(e.value)


def test_blocklist_errors_name_file_and_line(tmp_path):
    (tmp_path / "policy.yaml").write_text("rules: []\n")
    (tmp_path / "blocklist.yaml").write_text("patterns:\n  - {name: ok, regex: 'a'}\n  - {name: bad, regex: '(('}\n")
    with pytest.raises(RulesError) as e:
        load_policy(tmp_path)
    assert e.value.line == 3 and "bad" in str(e.value)


def test_shipped_rules_load():
    p = load_policy(Path(__file__).resolve().parents[2] / "rules")
    assert len(p.rules) >= 8 and len(p.blocklist) >= 40


# --- list filtering ------------------------------------------------------------------------

def test_list_filtering(tmp_path):
    p = policy(tmp_path, """
    rules:
      - {name: ana-sql, when: {roles: [analyst], tool: query_sql, sql: {class: [read]}}, allow: true}
      - {name: dev-launch, when: {roles: [dev], tool: launch_container}, approve: {approvers: [lead]}}
      - {name: hide, when: {tool: run_command}, deny: true}
      - {name: all-run, when: {roles: [dev], tool: run_command}, allow: true}
      - {name: docs, when: {roles: [analyst], method: resources/read, resource: "docs://*"}, allow: true}
    """)
    tools = {"tools": [{"name": n} for n in ("query_sql", "launch_container", "run_command", "get_customer")]}
    names = lambda ident: [t["name"] for t in filter_list_result(p, ident, "demo", "tools/list", tools)["tools"]]  # noqa: E731
    assert names(ANA) == ["query_sql"]                  # allowed for some arguments
    assert names(DEV) == ["launch_container"]           # approvable counts; an unconditional deny hides
    res = {"resources": [{"uri": "docs://a"}, {"uri": "file:///etc/passwd"}]}
    assert filter_list_result(p, ANA, "demo", "resources/list", res)["resources"] == [{"uri": "docs://a"}]
    assert visible(p, ANA, "demo", "prompts/list", "anything") is False


# --- the addon: refusals, batches, rate limits --------------------------------------------

def _flow(tmp_path, body, ident=DEV):
    f = tflow.tflow(req=tutils.treq(method=b"POST", path=b"/mcp/demo", content=json.dumps(body).encode()))
    rec = get_record(f.metadata)
    rec.connection, rec.identity = "demo", ident
    parsed = mcpwire.parse_body(json.dumps(body).encode())
    rec.messages, rec.batch = parsed.messages, parsed.batch
    return f, rec


def _addon(tmp_path, text):
    (tmp_path / "policy.yaml").write_text(textwrap.dedent(text))
    (tmp_path / "connections.yaml").write_text("connections:\n  demo:\n    upstream: http://127.0.0.1:9/mcp\n")
    return PolicyAddon()


def _ctx(addon):
    """The policy addon with the Router that declares bastion_rules."""
    return taddons.context(Router(addon.registry), addon)


BATCH_POLICY = """
rules:
  - {name: ok, when: {tool: fine}, allow: true}
  - {name: no, when: {tool: bad}, deny: not this one}
  - {name: limited, when: {tool: limited}, allow: true, rate_limit: {calls: 2, per: 60}}
"""


def test_denied_call_gets_jsonrpc_error_naming_the_rule(tmp_path):
    addon = _addon(tmp_path, BATCH_POLICY)
    with _ctx(addon) as tctx:
        tctx.options.bastion_rules = str(tmp_path)
        f, rec = _flow(tmp_path, {"jsonrpc": "2.0", "id": 9, "method": "tools/call",
                                  "params": {"name": "bad", "arguments": {}}})
        addon.request(f)
    body = json.loads(f.response.content)
    assert f.response.status_code == 200 and body["id"] == 9 and body["error"]["code"] == DENIED
    assert "rule no" in body["error"]["message"] and "not this one" in body["error"]["message"]
    assert rec.refusal and rec.refusal_rule == "no"


def test_batch_with_one_denied_element_is_refused_whole(tmp_path):
    addon = _addon(tmp_path, BATCH_POLICY)
    batch = [{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "fine", "arguments": {}}},
             {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "bad", "arguments": {}}},
             {"jsonrpc": "2.0", "method": "notifications/initialized"}]
    with _ctx(addon) as tctx:
        tctx.options.bastion_rules = str(tmp_path)
        f, rec = _flow(tmp_path, batch)
        addon.request(f)
    out = json.loads(f.response.content)
    assert [e["id"] for e in out] == [1, 2] and all(e["error"]["code"] == DENIED for e in out)
    assert "another call in it was denied" in out[0]["error"]["message"]
    # an all-allowed batch passes
    with _ctx(addon) as tctx:
        tctx.options.bastion_rules = str(tmp_path)
        f, rec = _flow(tmp_path, [batch[0], {**batch[0], "id": 3}])
        addon.request(f)
    assert f.response is None and [d.action for d in rec.decisions] == ["allow", "allow"]


def test_rate_limit_trips_and_recovers():
    rl = RateLimiter()
    key = ("limited", "dan", "tool")
    assert [rl.take(key, 2, 60, now=t) for t in (0, 0)] == [0, 0]
    wait = rl.take(key, 2, 60, now=1)
    assert 29 <= wait <= 30                                    # one token refills in 30 s
    assert rl.take(key, 2, 60, now=31) == 0                    # recovered
    assert rl.take(("limited", "eve", "tool"), 2, 60, now=1) == 0   # per identity


def test_rate_limiter_is_bounded():
    rl = RateLimiter(max_buckets=100)
    for i in range(1000):
        rl.take(("r", f"sub{i}", "t"), 5, 60, now=0)
    assert len(rl.buckets) == 100


def test_rate_limit_refusal_through_the_addon(tmp_path):
    addon = _addon(tmp_path, BATCH_POLICY)
    codes = []
    with _ctx(addon) as tctx:
        tctx.options.bastion_rules = str(tmp_path)
        for i in range(3):
            f, rec = _flow(tmp_path, {"jsonrpc": "2.0", "id": i, "method": "tools/call",
                                      "params": {"name": "limited", "arguments": {}}})
            addon.request(f)
            codes.append(None if f.response is None else json.loads(f.response.content)["error"])
    assert codes[:2] == [None, None]
    assert "rate limit of 2 calls per 60s exceeded" in codes[2]["message"]
    assert codes[2]["code"] == RATE_LIMITED and codes[2]["data"] == {"rule": "limited"}


def test_bad_reload_keeps_the_last_good_rules(tmp_path, caplog):
    addon = _addon(tmp_path, BATCH_POLICY)
    with _ctx(addon) as tctx:
        tctx.options.bastion_rules = str(tmp_path)
        (tmp_path / "policy.yaml").write_text("rules:\n  - name: broken\n    when: [\n")
        assert addon.reload() is False
        assert [r.name for r in addon.policy.rules] == ["ok", "no", "limited"]
        assert "keeping the last good rules" in caplog.text and "policy.yaml:" in caplog.text


def test_server_to_client_requests_are_governed(tmp_path):
    p = policy(tmp_path, """
    rules:
      - {name: sampling-ok, direction: server_to_client, when: {roles: [dev], method: sampling/createMessage}, allow: true}
    """)
    sampling = {"jsonrpc": "2.0", "id": 5, "method": "sampling/createMessage", "params": {}}
    elicit = {"jsonrpc": "2.0", "id": 6, "method": "elicitation/create", "params": {}}
    assert govern_server_request(p, DEV, "demo", sampling) == sampling
    blocked = govern_server_request(p, DEV, "demo", elicit)
    assert blocked["method"] == "notifications/message" and "elicitation/create" in blocked["params"]["data"]
    assert govern_server_request(p, ANA, "demo", sampling)["method"] == "notifications/message"


def test_explain_names_rule_and_location(tmp_path):
    p = policy(tmp_path, PRECEDENCE)
    lines = explain(p, DEV, "demo", call("launch_container", {"privileged": True}))
    assert any("deny-priv" in line and "policy.yaml:" in line for line in lines)
    assert lines[-1].startswith("decision: DENY  rule: deny-priv")


# --- environments and blast radius (issue 11) -------------------------------------------

ENV_POLICY = """
rules:
  - {name: launch-dev, when: {tool: launch_container, environment: dev}, allow: true}
  - {name: launch-prod, when: {tool: launch_container, environment: [prod, "prod-*"]}, approve: {approvers: [approver]}}
"""


def test_environments_select_actions(tmp_path):
    p = policy(tmp_path, ENV_POLICY)
    m = call("launch_container", {"image": "x"})
    assert evaluate(p, DEV, "demo", m, environment="dev").rule == "launch-dev"
    assert evaluate(p, DEV, "demo", m, environment="prod-eu").action == "approve"
    assert evaluate(p, DEV, "demo", m, environment="").action == "deny"        # unset: neither rule applies
    tools = {"tools": [{"name": "launch_container"}]}
    assert filter_list_result(p, DEV, "demo", "tools/list", tools, "staging")["tools"] == []


BLAST_POLICY = """
rules:
  - name: bulk
    when: {tool: delete_rows}
    allow: true
    blast_radius: {items: $.ids, max_per_call: 10, max_per_window: 15, per: 3600}
"""


def _body(tool: str, args: dict) -> dict:
    return {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": args}}


def test_blast_radius_per_call_and_per_window(tmp_path):
    addon = _addon(tmp_path, BLAST_POLICY)
    outcomes = []
    with _ctx(addon) as tctx:
        tctx.options.bastion_rules = str(tmp_path)
        for ids in (list(range(11)), list(range(8)), list(range(6)), list(range(7)), [1]):
            f, rec = _flow(tmp_path, _body("delete_rows", {"ids": ids}))
            addon.request(f)
            outcomes.append(None if f.response is None else json.loads(f.response.content)["error"])
        # counters survive a reload of the rules
        addon.reload()
        f, rec = _flow(tmp_path, _body("delete_rows", {"ids": [1]}), Identity("dan", ("dev",)))
        addon.request(f)
        after_reload = f.response
        f, rec = _flow(tmp_path, _body("delete_rows", {"ids": [1, 2]}), Identity("eve", ("dev",)))
        addon.request(f)
        other_principal = f.response
    assert "touches 11 items ($.ids), the limit is 10 per call" in outcomes[0]["message"]
    assert outcomes[1] is None and outcomes[2] is None              # 8 + 6 = 14 <= 15
    assert "may touch 15 items per 3600s" in outcomes[3]["message"] and outcomes[3]["code"] == -32037
    assert outcomes[4] is None                                      # 14 + 1 = 15
    assert after_reload is not None                                 # 16 > 15, even after the reload
    assert other_principal is None                                  # per principal


def test_blast_radius_counts_numbers_and_validates(tmp_path):
    p = policy(tmp_path, """
    rules:
      - {name: r, when: {tool: t}, allow: true, blast_radius: {items: $.limit, max_per_call: 100}}
    """)
    b = p.rules[0].blast
    assert b.count({"limit": 250}) == 250 and b.count({}) == 0 and b.count({"limit": True}) == 1
    for bad, frag in (("{items: $.x}", "max_per_call and/or"), ("{items: $.x, max_per_call: 0}", "positive"),
                      ("{max_per_call: 1}", "items"), ("{items: $.x, max_per_call: 1, size: 2}", "unknown")):
        (tmp_path / "policy.yaml").write_text(f"rules:\n  - name: r\n    allow: true\n    blast_radius: {bad}\n")
        with pytest.raises(RulesError) as e:
            load_policy(tmp_path)
        assert frag in str(e.value) and e.value.line is not None


# --- cheap checks before scans; scan budget; the nearest rule in a refusal -------------------

BUDGET_POLICY = """
rules:
  - name: ana-sql
    when: {roles: [analyst], tool: query_sql, sql: {arg: sql, class: [read]}}
    allow: true
  - name: dev-shell
    when: {roles: [dev], tool: run_command}
    allow: true
"""
BLOCKLIST = (Path(__file__).resolve().parents[2] / "rules" / "blocklist.yaml").read_text()


def test_no_rule_for_the_caller_refuses_before_scanning(tmp_path, monkeypatch):
    from addons.core.policy import rules as policy_rules
    p = policy(tmp_path, BUDGET_POLICY, BLOCKLIST)
    scanned = []
    monkeypatch.setattr(policy_rules, "scan", lambda *a, **k: scanned.append(1))
    d = evaluate(p, ANA, "demo", call("run_command", {"command": "x" * 5_000_000}))
    assert d.action == "deny" and d.rule is None and scanned == []
    assert "nearest rule dev-shell: it needs one of the roles dev" in d.reason
    d = evaluate(p, DEV, "demo", call("run_command", {"command": "ls"}))
    assert d.action == "allow" and scanned == [1]                  # allowed callers are still scanned


def test_scan_budget_refuses_too_much_text_and_too_much_time(tmp_path):
    from addons.core.policy.rules import ScanBudget
    p = policy(tmp_path, BUDGET_POLICY, BLOCKLIST)
    d = evaluate(p, DEV, "demo", call("run_command", {"command": "ls " * 400}), budget=ScanBudget(max_chars=1000))
    assert d.action == "deny" and d.rule == "scan-budget" and "too large to check" in d.reason
    d = evaluate(p, DEV, "demo", call("run_command", {"command": "ls " * 300}), budget=ScanBudget(max_chars=1000))
    assert d.action == "allow"
    many = {f"k{i}": f"value {i}" for i in range(2000)}
    d = evaluate(p, DEV, "demo", call("run_command", many), budget=ScanBudget(seconds=1e-9))
    assert d.action == "deny" and d.rule == "scan-budget" and "within" in d.reason


def test_default_deny_names_the_nearest_rule_and_what_failed(tmp_path):
    p = policy(tmp_path, BUDGET_POLICY, BLOCKLIST)
    d = evaluate(p, ANA, "demo", call("query_sql", {"sql": "DELETE FROM customers"}))
    assert d.action == "deny" and "nearest rule ana-sql: its sql condition does not hold" in d.reason
    d = evaluate(p, ANA, "demo", call("launch_container", {}))
    assert "no rule allows tools/call launch_container for anyone" in d.reason
    lines = explain(p, ANA, "demo", call("query_sql", {"sql": "DELETE FROM customers"}))
    assert any(line.startswith("  nearest allow   ana-sql") and "sql condition" in line for line in lines), lines
