"""addons/hooks/policy.py through mitmproxy's test helpers: option validation, approval without
the approval addon, environments chosen by connection or option, rate limits on an
injected clock, hot reload that takes effect, list filtering on the response path, and
the `check` / `explain` CLI."""
from __future__ import annotations

import argparse
import json
import textwrap

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow, tutils

from addons.core import mcpwire
from addons.cli import policy as cli_policy
from addons.hooks import policy as policy_mod
from addons.hooks.connections import Router
from addons.hooks.policy import APPROVAL_UNAVAILABLE, BLAST_RADIUS, DENIED, RATE_LIMITED, Policy
from addons.core.record import Identity, get_record

DEV = Identity("dan", ("dev",))


def write(tmp_path, policy: str, environment: str | None = None):
    (tmp_path / "policy.yaml").write_text(textwrap.dedent(policy))
    env = f"    environment: {environment}\n" if environment else ""
    (tmp_path / "connections.yaml").write_text(
        "connections:\n  demo:\n    upstream: http://127.0.0.1:9/mcp\n" + env)


def flow(body, ident=DEV, conn="demo"):
    raw = json.dumps(body).encode()
    f = tflow.tflow(req=tutils.treq(method=b"POST", path=f"/mcp/{conn}".encode(), content=raw))
    rec = get_record(f.metadata)
    rec.connection, rec.identity = conn, ident
    parsed = mcpwire.parse_body(raw)
    rec.messages, rec.batch = parsed.messages, parsed.batch
    return f, rec


def tool_call(name, args=None, msg_id=1):
    return {"jsonrpc": "2.0", "id": msg_id, "method": "tools/call", "params": {"name": name, "arguments": args or {}}}


def error_of(f):
    return None if f.response is None else json.loads(f.response.content)["error"]


def run(tmp_path, addon, body, ident=DEV, **opts):
    with taddons.context(Router(addon.registry), addon) as tctx:
        tctx.options.bastion_rules = str(tmp_path)
        for k, v in opts.items():
            setattr(tctx.options, k, v)
        f, rec = flow(body, ident)
        addon.request(f)
    return f, rec


def test_broken_rules_at_startup_are_an_option_error(tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir(), bad.mkdir()
    write(good, "rules: []\n")
    write(bad, "rules:\n  - name: a\n    allow: maybe\n")
    addon = Policy()
    with taddons.context(Router(addon.registry), addon) as tctx:
        # start from a loadable directory so the failed update rolls back to it (not to the
        # shipped rules, whose demo credential file a fresh clone does not have)
        tctx.options.bastion_rules = str(good)
        with pytest.raises(exceptions.OptionsError, match=r"policy\.yaml:3"):
            tctx.configure(addon, bastion_rules=str(bad))


def test_approve_refuses_when_no_approval_addon_is_loaded(tmp_path):
    write(tmp_path, "rules:\n  - {name: ask, when: {tool: t}, approve: {approvers: [boss]}}\n")
    f, rec = run(tmp_path, Policy(), tool_call("t", msg_id=4))
    err = error_of(f)
    assert err["code"] == APPROVAL_UNAVAILABLE and "rule ask" in err["message"]
    assert json.loads(f.response.content)["id"] == 4 and rec.refusal_rule == "ask"


def test_allowed_call_passes_untouched(tmp_path):
    write(tmp_path, "rules:\n  - {name: ok, when: {tool: t}, allow: true}\n")
    f, rec = run(tmp_path, Policy(), tool_call("t"))
    assert f.response is None and rec.decisions[0].rule == "ok" and not rec.refusal


def test_default_deny_names_default_deny(tmp_path):
    write(tmp_path, "rules: []\n")
    f, rec = run(tmp_path, Policy(), tool_call("anything"))
    err = error_of(f)
    assert err["code"] == DENIED and "default-deny" in err["message"]


ENV = """
rules:
  - {name: dev-ok, when: {tool: launch, environment: dev}, allow: true}
  - {name: prod-no, when: {tool: launch, environment: prod}, deny: not in production}
"""


@pytest.mark.parametrize("conn_env,option,rule", [
    (None, "dev", "dev-ok"),        # gateway option
    (None, "prod", "prod-no"),
    ("prod", "dev", "prod-no"),     # the connection's own environment wins
    ("dev", "", "dev-ok"),
    (None, "", None),               # no environment: neither rule, default deny
])
def test_environment_from_connection_or_option(tmp_path, conn_env, option, rule):
    write(tmp_path, ENV, conn_env)
    f, rec = run(tmp_path, Policy(), tool_call("launch"), bastion_environment=option)
    assert rec.decisions[0].rule == rule
    assert (f.response is None) is (rule == "dev-ok")


def test_environment_option_change_applies_to_the_next_call(tmp_path):
    """The policy stage keeps bastion_environment from configure: a later change must reach it."""
    write(tmp_path, ENV)
    addon = Policy()
    with taddons.context(Router(addon.registry), addon) as tctx:
        tctx.options.bastion_rules = str(tmp_path)
        rules = []
        for env in ("dev", "prod", ""):
            tctx.options.bastion_environment = env
            f, rec = flow(tool_call("launch"))
            addon.request(f)
            rules.append(rec.decisions[0].rule)
    assert rules == ["dev-ok", "prod-no", None]


def test_rate_limit_trips_and_recovers_on_the_clock(tmp_path, monkeypatch):
    write(tmp_path, "rules:\n  - {name: lim, when: {tool: t}, allow: true, rate_limit: {calls: 2, per: 10}}\n")
    now = [1000.0]
    monkeypatch.setattr(policy_mod.time, "monotonic", lambda: now[0])
    addon = Policy()
    results = []
    with taddons.context(Router(addon.registry), addon) as tctx:
        tctx.options.bastion_rules = str(tmp_path)
        for t in (0, 0, 0, 4, 5, 5):
            now[0] = 1000.0 + t
            f, _ = flow(tool_call("t"))
            addon.request(f)
            results.append(error_of(f))
        f, _ = flow(tool_call("t"), Identity("eve", ("dev",)))        # another principal has its own bucket
        addon.request(f)
        other = error_of(f)
    assert results[0] is None and results[1] is None
    assert results[2]["code"] == RATE_LIMITED and "retry after 5.0s" in results[2]["message"]
    assert results[3]["code"] == RATE_LIMITED                              # 0.8 tokens at t=4
    assert results[4] is None                                              # one token back at t=5
    assert results[5]["code"] == RATE_LIMITED
    assert other is None


def test_hot_reload_takes_effect_and_keeps_counters(tmp_path):
    write(tmp_path, "rules:\n  - {name: a, when: {tool: t}, allow: true, "
                    "blast_radius: {items: $.ids, max_per_window: 3, per: 3600}}\n")
    addon = Policy()
    with taddons.context(Router(addon.registry), addon) as tctx:
        tctx.options.bastion_rules = str(tmp_path)
        f, _ = flow(tool_call("t", {"ids": [1, 2, 3]}))
        addon.request(f)
        assert f.response is None
        (tmp_path / "policy.yaml").write_text(
            "rules:\n  - {name: a, when: {tool: t}, allow: true, blast_radius: {items: $.ids, max_per_window: 3, per: 3600}}\n"
            "  - {name: b, when: {tool: u}, allow: true}\n")
        assert addon.reload() is True
        f, _ = flow(tool_call("u"))
        addon.request(f)
        assert f.response is None                                          # the new rule is in force
        f, _ = flow(tool_call("t", {"ids": [4]}))
        addon.request(f)
        assert error_of(f)["code"] == BLAST_RADIUS                         # the window survived


def test_blast_radius_per_call_on_a_numeric_argument(tmp_path):
    write(tmp_path, "rules:\n  - {name: q, when: {tool: query}, allow: true, "
                    "blast_radius: {items: $.limit, max_per_call: 100}}\n")
    f, _ = run(tmp_path, Policy(), tool_call("query", {"limit": 100}))
    assert f.response is None
    f, _ = run(tmp_path, Policy(), tool_call("query", {"limit": 5000}))
    err = error_of(f)
    assert err["code"] == BLAST_RADIUS and "5000 items ($.limit)" in err["message"]


def test_list_results_are_filtered_on_the_response_path(tmp_path):
    write(tmp_path, "rules:\n  - {name: ok, when: {tool: visible_*}, allow: true}\n")
    f, rec = run(tmp_path, Policy(), {"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
    assert f.response is None
    result = {"jsonrpc": "2.0", "id": 2, "result": {"tools": [{"name": "visible_a"}, {"name": "hidden"}]}}
    for t in rec.response_transforms:
        result = t(result)
    assert [t["name"] for t in result["result"]["tools"]] == ["visible_a"]


def test_batch_of_notifications_only_denied_gets_202(tmp_path):
    write(tmp_path, "rules:\n  - {name: no, when: {method: notifications/*}, deny: no}\n")
    f, rec = run(tmp_path, Policy(), [{"jsonrpc": "2.0", "method": "notifications/initialized"}])
    assert f.response is not None and f.response.status_code == 202 and rec.refusal


def _cli(args, capsys):
    p = argparse.ArgumentParser()
    p.add_argument("--rules", default="rules")
    s = p.add_subparsers()
    cli_policy.add_cli(s)
    ns = p.parse_args(args)
    code = ns.func(ns)
    return code, capsys.readouterr().out


def test_cli_check_ok_and_error_with_line(tmp_path, capsys):
    write(tmp_path, "rules:\n  - {name: ok, when: {tool: t}, allow: true}\n")
    code, out = _cli(["--rules", str(tmp_path), "check"], capsys)
    assert code == 0 and "OK (1 policy rules" in out
    (tmp_path / "policy.yaml").write_text("rules:\n  - name: a\n    when: {tool: x}\n")
    code, out = _cli(["check", str(tmp_path)], capsys)
    assert code == 1 and "policy.yaml:2" in out


def test_cli_explain_prints_rule_and_decision(tmp_path, capsys):
    write(tmp_path, ENV, "prod")
    code, out = _cli(["--rules", str(tmp_path), "explain", "--sub", "dan", "--roles", "dev",
                      "--connection", "demo", "--tool", "launch"], capsys)
    assert code == 0 and "prod-no" in out and out.strip().splitlines()[-1].startswith("decision: DENY")
    code, out = _cli(["--rules", str(tmp_path), "explain", "--sub", "dan", "--connection", "demo",
                      "--tool", "launch", "--environment", "dev"], capsys)
    assert "decision: ALLOW  rule: dev-ok" in out
    code, out = _cli(["--rules", str(tmp_path), "explain", "--sub", "dan", "--connection", "demo",
                      "--tool", "launch", "--args", "{nope"], capsys)
    assert code == 2 and "not JSON" in out


SQL_MASK_POLICY = """\
rules:
  - name: ana-sql
    when:
      roles: [analyst]
      tool: query_sql
      sql: {class: [read], tables: {customers: [id, ssn]}, sensitive_columns: [ssn]}
    allow: true
"""


def test_allowed_sql_is_forwarded_rewritten_and_recorded_so(tmp_path):
    write(tmp_path, SQL_MASK_POLICY)
    ana = Identity("ana", ("analyst",))
    body = [tool_call("query_sql", {"sql": "SELECT reverse(ssn) /* x */ FROM customers"}, 1),
            tool_call("query_sql", {"sql": "SELECT id FROM customers"}, 2)]
    addon = Policy()
    with taddons.context(Router(addon.registry), addon) as tctx:
        tctx.options.bastion_rules = str(tmp_path)
        f, rec = flow(body, ana)
        sql = body[0]["params"]["arguments"]["sql"]
        f.request.headers["Mcp-Param-Sql"] = sql
        addon.request(f)
    assert f.response is None
    sent = json.loads(f.request.content)
    assert [m["params"]["arguments"]["sql"] for m in sent] == [
        "SELECT REVERSE(CAST('[MASKED:ssn]' AS TEXT)) FROM customers", "SELECT id FROM customers"]
    assert [m.arguments["sql"] for m in rec.messages] == [m["params"]["arguments"]["sql"] for m in sent]
    assert mcpwire.decode_header_value(f.request.headers["Mcp-Param-Sql"]) == sent[0]["params"]["arguments"]["sql"]
    assert "original: SELECT REVERSE(ssn) FROM customers" in rec.decisions[0].reason


def test_refused_sql_is_not_rewritten(tmp_path):
    write(tmp_path, SQL_MASK_POLICY)
    body = tool_call("query_sql", {"sql": "SELECT c FROM customers c"})
    f, rec = run(tmp_path, Policy(), body, Identity("ana", ("analyst",)))
    assert error_of(f)["code"] == DENIED and "whole row" in error_of(f)["message"]
    assert json.loads(f.request.content) == body
