"""Issue 16 building blocks: the quote-aware shell lexer, GNU option parsing by program
model, lexical path roots, inputSchema validation and the rules syntax for them."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from addons.core.policy import argschema

from addons.core.shell import paths as pathguard
from addons.core.policy.rules import load_policy
from addons.core.shell.programs import SHIPPED, analyse, load_models
from addons.core.rules import RulesError
from addons.core.shell.syntax import SyntaxRefused, Word, parse

MODELS = load_models(SHIPPED)


def words(*texts: str) -> list[Word]:
    return [Word(t) for t in texts]


# --- lexer -----------------------------------------------------------------------------------

def test_lexer_keeps_what_quoting_hid():
    cl = parse("grep -e '*.py' \"a b\" *.txt 'x$' | wc -l && echo '|'")
    first, second, third = cl.commands
    assert [w.text for w in first.words] == ["grep", "-e", "*.py", "a b", "*.txt", "x$"]
    assert [w.glob for w in first.words] == [False, False, False, False, True, False]
    assert cl.connectors == ["pipe", "and"] and third.words[1].text == "|"
    assert [w.text for w in second.words] == ["wc", "-l"]


@pytest.mark.parametrize("cmd,why", [
    ("echo $HOME", "variables"), ("echo \"$(id)\"", "variables"), ("echo `id`", "substitution"),
    ("echo $'\\x41'", "variables"), ("cat <(id)", "process substitution"), ("ls #x", "comments"),
    ("a\0b", "NUL"), ("cat <<E\nx\nE", "here-documents"), ("(ls)", "subshells"), ("ls |", "ends with an operator"),
    ("| ls", "without a command"), ("echo 'x", "unbalanced"), ("x" * 70000, "longer than"),
])
def test_lexer_refuses_what_it_cannot_prove(cmd, why):
    with pytest.raises(SyntaxRefused, match=why):
        parse(cmd)


def test_redirections_and_descriptors():
    cl = parse("ls 2>&1 > out < in")
    (c,) = cl.commands
    assert [w.text for w in c.words] == ["ls"]
    assert [(r.op, r.target.text) for r in c.redirects] == [(">&", "1"), (">", "out"), ("<", "in")]
    assert parse("echo a#b").commands[0].words[1].text == "a#b"      # # inside a word is not a comment


# --- option parsing ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv,problem,accesses", [
    (["-o", "f", "x"], None, [("f", "write"), ("x", "read")]),
    (["-of", "x"], None, [("f", "write"), ("x", "read")]),
    (["-nro", "f", "x"], None, [("f", "write"), ("x", "read")]),
    (["--output=f", "x"], None, [("f", "write"), ("x", "read")]),
    (["--outp", "f", "x"], None, [("f", "write"), ("x", "read")]),
    (["x", "-o", "f"], None, [("f", "write"), ("x", "read")]),             # options after operands
    (["--", "-o", "f"], None, [("-o", "read"), ("f", "read")]),            # -- ends options
    (["-k", "-o", "x"], None, [("x", "read")]),                             # -k's value is -o
    (["--compress-program=sh"], "runs a program", []),
    (["--c", "sh"], "is ambiguous", []),                                    # --check / --compress-program
    (["-o"], "needs a value", []),
    (["--debug=1"], "takes no value", []),
    (["-q"], "not in the model", []),
])
def test_sort_options_every_way_they_are_written(argv, problem, accesses):
    a = analyse(MODELS["sort"], words(*argv))
    if problem:
        assert problem in (a.problem or ""), a
    else:
        assert a.problem is None and [(x.path, x.access) for x in a.accesses] == accesses


def test_rule_can_allow_an_extra_option_and_wrappers_expose_their_command():
    assert "not in the model" in analyse(MODELS["cat"], words("-z")).problem
    assert analyse(MODELS["cat"], words("-z"), frozenset({"-z"})).problem is None
    a = analyse(MODELS["timeout"], words("-s", "KILL", "5", "sort", "-o", "x"))
    assert a.problem is None and [w.text for w in a.wrapped] == ["sort", "-o", "x"]
    assert "without a command" in analyse(MODELS["env"], words("A=1")).problem
    assert "runs a program" in analyse(MODELS["env"], words("-S", "sh -c id")).problem
    assert "runs other programs" in analyse(MODELS["find"], words(".", "-name", "x")).problem


def test_grep_pattern_and_default_operand():
    a = analyse(MODELS["grep"], words("-r", "x"))
    assert [(x.path, x.via) for x in a.accesses] == [(".", "default")]
    a = analyse(MODELS["grep"], words("-e", "x", "f1", "f2"))
    assert [x.path for x in a.accesses] == ["f1", "f2"]
    a = analyse(MODELS["grep"], words("-ffile", "g"))
    assert [(x.path, x.via) for x in a.accesses] == [("file", "-f"), ("g", "operand")]


def test_every_shipped_model_cites_a_source():
    assert all(m.source for m in MODELS.values())
    assert {"ls", "cat", "grep", "head", "tail", "wc", "echo", "pwd", "whoami", "date", "uname", "df", "du", "stat",
            "sort", "uniq", "find", "xargs", "awk", "sed", "tar", "git", "env", "timeout", "less", "vim",
            "python"} <= set(MODELS)


# --- paths ------------------------------------------------------------------------------------

R = pathguard.Roots(read=("/srv/data/**", "./**", "/etc/hostname"), write=("/srv/data/out/**",))


@pytest.mark.parametrize("path,access,glob,ok", [
    ("/srv/data/a.csv", "read", False, True), ("/srv/data", "read", False, True),
    ("/srv/data/../secret", "read", False, False), ("/srv//data/./x", "read", False, True),
    ("/srv/dataX", "read", False, False), ("x/../y", "read", False, True), ("x/../../y", "read", False, False),
    ("/srv/data/*.csv", "read", True, True), ("/srv/*/x", "read", True, False), ("/srv/data/*/../../x", "read", True, False),
    ("/srv/data/a", "write", False, False), ("/srv/data/out/a", "write", False, True), ("~/x", "read", False, False),
    ("/etc/hostname", "read", False, True), ("/etc/hostnamex", "read", False, False),
])
def test_roots_are_lexical(path, access, glob, ok):
    assert (pathguard.check(path, access, R, (), glob) is None) is ok


def test_protected_directories_win_over_any_root(tmp_path):
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    everything = pathguard.Roots(read=("/**",))
    prot = pathguard.protected_dirs(str(secrets))
    assert "never readable" in pathguard.check(str(secrets / "k"), "read", everything, prot)
    assert "never readable" in pathguard.check(str(tmp_path), "read", everything, prot)     # would recurse into it
    assert pathguard.check(str(tmp_path / "other"), "read", everything, prot) is None
    assert "never readable" in pathguard.check(f"{pathguard.REPO}/.secrets/x", "read", everything,
                                                pathguard.protected_dirs())


def test_symlinks_that_exist_here_must_resolve_inside(tmp_path):
    data, secrets = tmp_path / "data", tmp_path / "secrets"
    data.mkdir()
    secrets.mkdir()
    (secrets / "key").write_text("k")
    os.symlink(secrets / "key", data / "link")
    os.symlink(tmp_path / "elsewhere", data / "out")
    roots = pathguard.Roots(read=(f"{data}/**",))
    assert "symlink leads into the gateway's own files" in pathguard.check(
        str(data / "link"), "read", roots, pathguard.protected_dirs(str(secrets)))
    assert "symlink leads outside" in pathguard.check(str(data / "out" / "x"), "read", roots, ())
    assert pathguard.check(str(data / "plain"), "read", roots, ()) is None


# --- inputSchema ------------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"image": {"type": "string"}, "privileged": {"type": "boolean"}},
          "required": ["image"], "additionalProperties": False}


@pytest.mark.parametrize("args,why", [
    ({"image": "a", "privileged": "yes"}, "$.privileged: must be of type boolean"),
    ({"image": "a", "privileged": 1}, "$.privileged: must be of type boolean"),
    ({"privileged": True}, "missing required argument(s) image"),
    ({"image": "a", "extra": 1}, "argument(s) not in the tool's schema: extra"),
    ({"image": None}, "$.image: must be of type string"),
    ({"image": "a"}, None), ({"image": "a", "privileged": False}, None),
])
def test_arguments_against_the_schema(args, why):
    got = argschema.problem(SCHEMA, args, argschema.SchemaBook())
    assert got == why if why is None else why in got


def test_schema_problems_never_echo_the_value_and_bad_schemas_refuse():
    secret = "sk_live_DO_NOT_LOG"
    assert secret not in argschema.problem(SCHEMA, {"image": "a", "privileged": secret})
    assert "invalid" in argschema.problem({"type": "objekt"}, {})
    assert "no usable inputSchema" in argschema.problem(None, {})


def test_schema_book_remembers_the_last_list_per_connection():
    book = argschema.SchemaBook(max_tools=2)
    book.learn("a", [{"name": "t", "inputSchema": SCHEMA}, {"name": "u", "inputSchema": {}}])
    assert book.listed("a") and not book.listed("b") and book.get("a", "t") == SCHEMA
    book.learn("a", [{"name": "v", "inputSchema": {}}])
    assert not book.known("a", "t") and book.known("a", "v")          # bounded


# --- rules syntax -----------------------------------------------------------------------------

@pytest.mark.parametrize("shell,msg", [
    ("{commands: [ls], operators: [pipe, substitution]}", r"unknown operator\(s\) substitution"),
    ("{commands: [ls], operators: maybe}", "'operators' takes a list"),
    ("{commands: [ls], paths: {read: [/x], exec: []}}", "'paths' takes"),
    ("{commands: [ls], cwd: relative}", "'cwd' must be an absolute path"),
])
def test_bad_shell_rules_name_file_and_line(tmp_path, shell, msg):
    (tmp_path / "policy.yaml").write_text(f"rules:\n  - name: a\n    when:\n      shell: {shell}\n    allow: true\n")
    with pytest.raises(RulesError, match=msg):
        load_policy(tmp_path)


def test_bad_programs_file_is_refused(tmp_path):
    (tmp_path / "programs.yaml").write_text("programs:\n  ls:\n    options:\n      '-l': sometimes\n")
    with pytest.raises(RulesError, match="unknown option kind") as e:
        load_policy(tmp_path)
    assert "programs.yaml:4" in str(e.value)


def test_operators_true_means_lists_not_redirects(tmp_path):
    from addons.core.mcpwire import Message
    from addons.core.policy.rules import evaluate
    from addons.core.record import Identity
    (tmp_path / "policy.yaml").write_text(
        "rules:\n  - name: a\n    when: {tool: t, shell: {commands: [ls, wc], operators: true}}\n    allow: true\n"
        "  - name: b\n    when: {tool: r, shell: {commands: [ls], operators: [redirect], paths: {read: [./**], write: [/tmp/o/**]}}}\n"
        "    allow: true\n")
    p = load_policy(tmp_path)

    def ok(tool, cmd):
        raw = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": {"command": cmd}}}
        return evaluate(p, Identity("x"), "c", Message(kind="request", raw=raw, id=1, method="tools/call")).action == "allow"
    assert ok("t", "ls | wc -l") and ok("t", "ls; ls") and not ok("t", "ls > x")
    assert ok("r", "ls > /tmp/o/list") and not ok("r", "ls > /tmp/x") and not ok("r", "ls | wc")
    assert Path(SHIPPED).name == "programs.yaml"


def test_wrapped_commands_are_checked_like_any_other(tmp_path):
    from addons.core.mcpwire import Message
    from addons.core.policy.rules import evaluate
    from addons.core.record import Identity
    (tmp_path / "policy.yaml").write_text(
        "rules:\n  - name: w\n    when: {tool: t, shell: {commands: [timeout, nice, ls, sort]}}\n    allow: true\n"
        "  - name: x\n    when: {tool: x, shell: {commands: [awk], exec: [awk]}}\n    allow: true\n")
    p = load_policy(tmp_path)

    def verdict(tool, cmd):
        raw = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": {"command": cmd}}}
        return evaluate(p, Identity("x"), "c", Message(kind="request", raw=raw, id=1, method="tools/call"))
    assert verdict("t", "timeout 5 ls -la").action == "allow"
    assert verdict("t", "timeout -s KILL 5 nice -n 5 sort hello.txt").action == "allow"
    assert "program sh is not in the rule's allow-list" in verdict("t", "timeout 5 sh").reason
    assert "outside the write roots" in verdict("t", "timeout 5 sort -o x y").reason
    assert "timeout without a command is refused" in verdict("t", "timeout 5").reason
    # exec: the rule accepts that awk runs anything (its model is not consulted)
    assert verdict("x", "awk 'BEGIN{print 1}'").action == "allow"


@pytest.mark.parametrize("evil", ["{" * 65000 + "}", "a" * 65000, "| " * 30000, "\\a" * 32000, "x " * 4000,
                                  "'" + "a" * 64000 + "'", "$" * 65000])
def test_lexer_is_bounded_on_pathological_input(evil):
    import time
    t = time.perf_counter()
    try:
        parse(evil)
    except SyntaxRefused:
        pass
    assert time.perf_counter() - t < 2
