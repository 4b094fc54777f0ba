"""addons/core/policy/rules.py: targets (tool / resource / prompt globs), precedence between
rules of the same action, argument-predicate errors with file:line, list filtering of
resources and prompts, explain. Predicates, SQL/shell rules and environments are covered
in test_policy_engine.py; the attack table in test_blocklist_table.py."""
from __future__ import annotations

import textwrap

import pytest

from addons.core import mcpwire
from addons.core.policy.rules import evaluate, explain, filter_list_result, load_policy, visible
from addons.core.record import Identity
from addons.core.rules import RulesError

DEV = Identity("dan", ("dev",), client_id="ci-runner")
ANA = Identity("ana", ("analyst",))


def load(tmp_path, text):
    (tmp_path / "policy.yaml").write_text(textwrap.dedent(text))
    return load_policy(tmp_path)


def msg(method, **params):
    return mcpwire.parse_message({"jsonrpc": "2.0", "id": 7, "method": method, "params": params})


TARGETS = """
rules:
  - {name: reports, when: {roles: [analyst], method: resources/read, resource: "file:///reports/*.csv"}, allow: true}
  - {name: prompts, when: {roles: [analyst], method: prompts/get, prompt: "summar*"}, allow: true}
  - {name: get-tools, when: {roles: [analyst], tool: "get_*"}, allow: true}
  - {name: ci-only, when: {client_id: ci-runner, tool: deploy}, allow: true}
"""


@pytest.mark.parametrize("ident,m,rule", [
    (ANA, msg("resources/read", uri="file:///reports/q3.csv"), "reports"),
    (ANA, msg("resources/read", uri="file:///etc/passwd"), None),
    (ANA, msg("prompts/get", name="summarise"), "prompts"),
    (ANA, msg("prompts/get", name="exfiltrate"), None),
    (ANA, msg("tools/call", name="get_customer", arguments={}), "get-tools"),
    (ANA, msg("tools/call", name="GET_customer", arguments={}), None),        # names are case-sensitive
    (ANA, msg("tools/call", name="run_command", arguments={}), None),
    (DEV, msg("tools/call", name="deploy", arguments={}), "ci-only"),
    (Identity("dan", ("dev",), client_id="laptop"), msg("tools/call", name="deploy", arguments={}), None),
])
def test_targets_and_subjects(tmp_path, ident, m, rule):
    d = evaluate(load(tmp_path, TARGETS), ident, "demo", m)
    assert d.rule == rule and d.action == ("allow" if rule else "deny")
    assert d.message_id == 7


def test_first_matching_rule_names_the_decision_within_one_action(tmp_path):
    p = load(tmp_path, """
    rules:
      - {name: first, when: {tool: t}, allow: true}
      - {name: second, when: {tool: "*"}, allow: true}
      - {name: d1, when: {tool: x}, deny: one}
      - {name: d2, when: {tool: x}, deny: two}
    """)
    assert evaluate(p, DEV, "demo", msg("tools/call", name="t", arguments={})).rule == "first"
    assert evaluate(p, DEV, "demo", msg("tools/call", name="x", arguments={})).reason == "one"


def test_deny_wins_wherever_it_is_in_the_file(tmp_path):
    p = load(tmp_path, """
    rules:
      - {name: nope, when: {tool: t}, deny: no}
      - {name: yes, when: {tool: t}, allow: true}
      - {name: ask, when: {tool: t}, approve: {approvers: [boss]}}
    """)
    assert evaluate(p, DEV, "demo", msg("tools/call", name="t", arguments={})).rule == "nope"


def test_approve_carries_approvers_and_default_timeout(tmp_path):
    p = load(tmp_path, "rules:\n  - {name: ask, when: {tool: t}, approve: {approvers: [boss, secops]}}\n")
    d = evaluate(p, DEV, "demo", msg("tools/call", name="t", arguments={}))
    assert d.action == "approve" and d.approvers == ("boss", "secops") and d.timeout and d.timeout > 0


@pytest.mark.parametrize("pred,fragment", [
    ("{path: $.a, regex: '('}", "regex"),
    ("{path: $.a, min: ten}", "min"),
    ("{path: $.a, one_of: 3}", "one_of"),
    ("{path: $.a, like: x}", "exactly one of"),
    ("{equals: 1}", "path"),
])
def test_argument_predicate_errors_name_file_and_line(tmp_path, pred, fragment):
    (tmp_path / "policy.yaml").write_text(f"rules:\n  - name: r\n    when:\n      args:\n        - {pred}\n    allow: true\n")
    with pytest.raises(RulesError) as e:
        load_policy(tmp_path)
    assert e.value.file.endswith("policy.yaml") and e.value.line is not None and e.value.line >= 4
    assert fragment in str(e.value)
    assert "policy.yaml:" in str(e.value)


def test_yaml_syntax_error_names_the_line(tmp_path):
    (tmp_path / "policy.yaml").write_text("rules:\n  - name: a\n    when: {tool: [x\n    allow: true\n")
    with pytest.raises(RulesError) as e:
        load_policy(tmp_path)
    assert e.value.line is not None


LISTS = """
rules:
  - {name: res, when: {roles: [analyst], method: resources/read, resource: "file:///reports/*"}, allow: true}
  - {name: pr, when: {roles: [analyst], method: prompts/get, prompt: summarise}, allow: true}
  - {name: ask, when: {roles: [analyst], tool: export}, approve: {approvers: [boss]}}
  - {name: call, when: {roles: [analyst], tool: "*"}, allow: true}
  - {name: never, when: {roles: [analyst], tool: drop_all}, deny: no}
"""


def test_resources_and_prompts_lists_are_filtered(tmp_path):
    p = load(tmp_path, LISTS)
    res = {"resources": [{"uri": "file:///reports/a.csv", "name": "a"}, {"uri": "file:///etc/passwd", "name": "p"}]}
    assert [r["uri"] for r in filter_list_result(p, ANA, "demo", "resources/list", res)["resources"]] == \
        ["file:///reports/a.csv"]
    prompts = {"prompts": [{"name": "summarise"}, {"name": "jailbreak"}], "nextCursor": "c"}
    out = filter_list_result(p, ANA, "demo", "prompts/list", prompts)
    assert out == {"prompts": [{"name": "summarise"}], "nextCursor": "c"}      # other fields kept


def test_tools_list_shows_approval_tools_and_hides_unconditional_denies(tmp_path):
    p = load(tmp_path, LISTS)
    assert visible(p, ANA, "demo", "tools/list", "export")                    # callable with approval
    assert not visible(p, ANA, "demo", "tools/list", "drop_all")              # denied whatever the args
    assert not visible(p, DEV, "demo", "tools/list", "export")                # not this caller's
    tools = {"tools": [{"name": "export"}, {"name": "drop_all"}, {"name": "x"}]}
    assert [t["name"] for t in filter_list_result(p, ANA, "demo", "tools/list", tools)["tools"]] == ["export", "x"]


def test_explain_lists_every_matching_rule_then_the_decision(tmp_path):
    p = load(tmp_path, LISTS)
    lines = explain(p, ANA, "demo", msg("tools/call", name="export", arguments={}))
    assert any("ask" in line and "policy.yaml:" in line for line in lines)
    assert any("call" in line for line in lines)
    assert lines[-1].startswith("decision: APPROVE")
    lines = explain(p, ANA, "demo", msg("tools/call", name="zzz", arguments={}), environment="prod")
    assert lines[-1].startswith("decision: ALLOW")
    none = explain(load(tmp_path, "rules: []\n"), ANA, "demo", msg("tools/call", name="x", arguments={}))
    assert none[-1].startswith("decision: DENY") and "default" in none[-1]
