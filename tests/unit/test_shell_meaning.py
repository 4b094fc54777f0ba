"""Issue 16: the shipped dev-shell rule judged on meaning. Every row is a command line a dev
token could send to run_command, the verdict of the shipped rules/ and the reason a refusal
must name (GTFOBins execution, file-read and file-write vectors for every shipped program,
and legitimate pipelines that must keep working)."""
from __future__ import annotations

from pathlib import Path

import dataclasses

import pytest

from addons.core.mcpwire import Message
from addons.core.policy.rules import evaluate, explain, load_policy
from addons.core.record import Identity

ROOT = Path(__file__).resolve().parents[2]
POLICY = load_policy(ROOT / "rules")
MEANING_ONLY = dataclasses.replace(POLICY, blocklist=())     # the rules alone, without the blocklist
DEV = Identity("dan", ("dev",))
SECRETS = f"{ROOT}/.secrets/demo-service-token"
RULES = f"{ROOT}/rules/policy.yaml"

# (command, reason a refusal names); every row must be refused
REFUSED = [
    # --- execution: an allowed program's option or operand runs another program ---
    ("sort --compress-program=sh hello.txt", "option --compress-program of sort runs a program"),
    ("sort --compress-program sh hello.txt", "option --compress-program of sort runs a program"),
    ("sort --compress=sh hello.txt", "option --compress-program of sort runs a program"),   # unique prefix
    ("sort --comp sh hello.txt", "option --compress-program of sort runs a program"),
    ("sort hello.txt --compress-program=sh", "option --compress-program of sort runs a program"),  # after operand
    ("sort -S 1 --compress-program=/bin/sh -T . hello.txt", "runs a program"),
    ("sort '--compress-program=sh' hello.txt", "option --compress-program of sort runs a program"),   # quoted
    ("sort --comp\\ress-program=sh hello.txt", "option --compress-program of sort runs a program"),  # escaped
    ("sort \"--com\"press-prog=sh hello.txt", "option --compress-program of sort runs a program"),
    ("sort -'o' /tmp/x hello.txt", "/tmp/x: outside the write roots"),
    ("ls | sh", "program sh is not in the rule's allow-list"),
    ("ls | bash -i", "program bash is not in the rule's allow-list"),
    ("cat hello.txt | python3 -c 'import os'", "program python3 is not in the rule's allow-list"),
    ("ls && id", "program id is not in the rule's allow-list"),
    ("ls || touch x", "program touch is not in the rule's allow-list"),
    ("ls; id", "operator(s) not allowed by the rule: sequence"),
    ("ls\nid", "operator(s) not allowed by the rule: sequence"),
    ("ls & id", "operator(s) not allowed by the rule: background"),
    ("echo $(id)", "variables and substitutions"),
    ("echo `id`", "command substitution"),
    ("cat <(id)", "process substitution"),
    ("echo \"$(id)\"", "variables and substitutions"),
    ("(id)", "subshells"),
    ("timeout 1 sh", "program timeout is not in the rule's allow-list"),
    ("env sh", "program env is not in the rule's allow-list"),
    ("find . -exec sh ;", "program find is not in the rule's allow-list"),
    ("xargs sh", "program xargs is not in the rule's allow-list"),
    ("awk 'BEGIN {system(\"sh\")}'", "program awk is not in the rule's allow-list"),
    ("sed -n 1e\\ id hello.txt", "program sed is not in the rule's allow-list"),
    ("tar -cf /dev/null x --checkpoint-action=exec=sh", "program tar is not in the rule's allow-list"),
    ("git -c core.pager=sh log", "program git is not in the rule's allow-list"),
    ("less hello.txt", "program less is not in the rule's allow-list"),
    ("vim -c ':!sh'", "program vim is not in the rule's allow-list"),
    ("/tmp/ls", "only programs from"),                        # a binary that is only named ls
    ("./ls -la", "only programs from"),
    ("l?", "program name 'l?' cannot be proven"),
    ("LD_PRELOAD=./x.so ls", "environment assignment LD_PRELOAD= is refused"),
    ("PATH=. ls", "environment assignment PATH= is refused"),
    ("GCONV_PATH=. ls", "environment assignment GCONV_PATH= is refused"),
    ("ls #; id", "comments are not accepted"),
    ("cat hello.txt <<EOF\nid\nEOF", "here-documents"),
    ("du --files0-from=list", "option --files0-from of du reads file names from a file"),
    ("wc --files0-from list", "option --files0-from of wc reads file names from a file"),
    ("sort --files0-from=list", "option --files0-from of sort reads file names from a file"),
    ("date -s 2020-01-01", "option -s of date is refused"),
    ("date --set=2020-01-01", "option --set of date is refused"),
    ("date 010100002020", "operand '010100002020' is not accepted"),
    ("tail --pid", "option --pid needs a value"),
    ("ls --bogus", "option --bogus is not in the model of ls"),
    ("cat -z hello.txt", "option -z is not in the model of cat"),
    ("sort --s x", "option --s is ambiguous"),
    ("wc -l *.txt", "a glob could expand to an option of wc"),   # a file named --files0-from=x
    ("sort * ", "a glob could expand to an option of sort"),
    ("pwd x", "pwd takes no operands"),
    ("uname -a extra", "uname takes no operands"),
    ("grep", "grep needs a pattern"),
    ("grep * hello.txt", "a glob as the pattern expands to file names"),
    ("grep -e * hello.txt", "option -e needs a value (not a glob)"),
    ("sort -o ./* hello.txt", "option -o needs a value (not a glob)"),
    ("uniq ./h*", "a glob could expand to several operands"),
    ("grep -r --include=*.py x .", "a glob in an option position cannot be proven"),
    # --- writes: an allowed program writes a file ---
    ("sort -o /tmp/x hello.txt", "/tmp/x: outside the write roots"),
    ("sort -o/tmp/x hello.txt", "/tmp/x: outside the write roots"),
    ("sort --output=/tmp/x hello.txt", "/tmp/x: outside the write roots"),
    ("sort --out=/tmp/x hello.txt", "/tmp/x: outside the write roots"),
    ("sort -nro out.txt hello.txt", "out.txt: outside the write roots"),
    ("sort hello.txt -o out.txt", "out.txt: outside the write roots"),
    ("sort -T /tmp hello.txt", "/tmp: outside the write roots"),
    ("uniq hello.txt out.txt", "out.txt: outside the write roots"),
    ("uniq -c hello.txt /etc/cron.d/x", "outside the write roots"),
    ("uniq a b c", "uniq takes at most 2 operand(s)"),
    ("echo x > out.txt", "operator(s) not allowed by the rule: redirect"),
    ("echo x >> ~/.bashrc", "operator(s) not allowed by the rule: redirect"),
    ("ls 2> err.txt", "operator(s) not allowed by the rule: redirect"),
    ("ls >&out.txt", "operator(s) not allowed by the rule: redirect"),
    ("ls &>1", "operator(s) not allowed by the rule: redirect"),
    ("LC_ALL=../x ls", "environment assignment LC_ALL= is refused"),
    ("ls | tee out.txt", "program tee is not in the rule's allow-list"),
    # --- reads: the gateway's own files and anything outside the read roots ---
    (f"cat {SECRETS}", "outside the read roots"),
    (f"grep -r key {ROOT}/rules", "outside the read roots"),
    (f"head -c 100 {RULES}", "outside the read roots"),
    (f"tail {ROOT}/recordings/x", "outside the read roots"),
    (f"date -f {SECRETS}", "outside the read roots"),
    (f"date -r {SECRETS}", "outside the read roots"),
    (f"date --file={SECRETS}", "outside the read roots"),
    (f"grep -f {SECRETS} hello.txt", "outside the read roots"),
    (f"grep --file {SECRETS} hello.txt", "outside the read roots"),
    (f"du --exclude-from={SECRETS}", "outside the read roots"),
    (f"sort --random-source={SECRETS} hello.txt", "outside the read roots"),
    (f"stat {ROOT}/.secrets", "outside the read roots"),
    ("cat /etc/passwd", "/etc/passwd: outside the read roots"),
    ("cat /etc/shadow", "outside the read roots"),
    ("cat ../../service-token", "climbs out of the working directory"),
    ("cat .secrets/demo-service-token", "names a directory like the gateway's own (.secrets)"),
    ("grep -r key ./rules", "names a directory like the gateway's own (rules)"),
    ("cat ./a/../../x", "climbs out of the working directory"),
    ("grep -r x ..", "climbs out of the working directory"),
    ("cat ~/.ssh/id_rsa", "~ (a home directory) cannot be proven"),
    ("cat ~root/x", "cannot be proven"),
    ("cat $HOME/.ssh/id_rsa", "variables and substitutions"),
    ("cat ${HOME}/x", "variables and substitutions"),
    ("cat /etc/*", "outside the read roots"),
    ("cat ./*/../../x", "a glob with .. cannot be proven"),
    ("cat .*/x", "a glob with .. cannot be proven"),                 # .* matches ..
    ("cat ./.?/.?/x", "a glob with .. cannot be proven"),
    ("cat {/etc/passwd,hello.txt}", "brace expansion turns one word into several"),
    ("cat x{/../..,}/y", "brace expansion"),
    ("{cat,/etc/passwd}", "cannot be proven"),
    ("ls {-R,/}", "brace expansion"),
    ("ls /", "/: outside the read roots"),
    ("df -h ../..", "climbs out of the working directory"),
    ("du -sh /var/log", "/var/log: outside the read roots"),
    ("cat /proc/self/environ", "outside the read roots"),
    ("cat hello.txt | grep x /etc/passwd", "/etc/passwd: outside the read roots"),
    ("cat 'unbalanced", "unbalanced single quote"),
    ("cat hello\\", "trailing backslash"),
]

ALLOWED = [
    "ls", "ls -la", "ls -la .", "ls *.py", "ls --color=never -l", "ls -lR ./src",
    "cat hello.txt", "cat -n hello.txt", "cat 'file with spaces.txt'", "cat a\\ b.txt",
    "grep -r foo .", "grep -rn 'x$' .", "grep -e foo -- -f", "grep -c x /etc/hostname || true",
    "grep x hello.txt | wc -l", "grep -i --color=auto demo hello.txt", "grep -E 'a|b' hello.txt",
    "head -n 5 hello.txt", "head -5 hello.txt", "head -c10 hello.txt", "tail -n1 hello.txt", "tail -20 hello.txt",
    "wc -l hello.txt", "wc -l ./*.txt", "wc -l -- *.txt", "wc -l src/*.txt", "echo hello | wc -c",
    "echo hello world", "echo -n 'a > b'", "echo 'the word ; is text'", "pwd", "pwd -P", "whoami", "date -u",
    "date +%Y-%m-%d", "date -d yesterday", "uname -a", "uname -srm", "df -h", "df -h .", "du -sh .", "du -sh",
    "stat hello.txt", "stat -c %s hello.txt", "sort hello.txt", "sort -k2 -t, -n data.csv", "sort -nr hello.txt",
    "sort -u hello.txt | uniq -c", "uniq -c hello.txt", "uniq hello.txt", "cat /etc/os-release",
    "cat hello.txt | sort | uniq -c | sort -nr | head -3", "ls && pwd", "grep -q x hello.txt || echo none",
    "LC_ALL=C sort hello.txt", "cat hello.txt -", "/bin/ls -la", "/usr/bin/wc -l hello.txt",
    "ls &&\n pwd", "ls nothing 2>&1 | wc -l", "cat ./.hidden*", "echo '{a,b}'", "ls ./src/*.py", "grep -r --include='*.py' x .", "cat ./*.txt | wc -l",
]


def _call(cmd: str, tool: str = "run_command", key: str = "command") -> Message:
    raw = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": {key: cmd}}}
    return Message(kind="request", raw=raw, id=1, method="tools/call")


@pytest.mark.parametrize("command,reason", REFUSED)
def test_refused_with_its_reason(command, reason):
    """The rules refuse every row on meaning alone, naming the option or path ..."""
    d = evaluate(MEANING_ONLY, DEV, "demo", _call(command))
    assert d.action == "deny", (command, d)
    assert reason in (d.reason or ""), (command, d.reason)


@pytest.mark.parametrize("command,reason", REFUSED)
def test_refused_with_the_blocklist_too(command, reason):
    """... and with the blocklist on top (which may name its own pattern first)."""
    assert evaluate(POLICY, DEV, "demo", _call(command)).action == "deny"


@pytest.mark.parametrize("command", ALLOWED)
def test_legitimate_commands_allowed(command):
    d = evaluate(POLICY, DEV, "demo", _call(command))
    assert (d.action, d.rule) == ("allow", "dev-shell"), (command, d)


def test_table_meets_the_acceptance_size():
    assert len(REFUSED) + len(ALLOWED) >= 80 and len(ALLOWED) >= 20
    shipped = {"ls", "cat", "grep", "head", "tail", "wc", "date", "du", "stat", "sort", "uniq", "df"}
    named = {c.split()[0] for c, _ in REFUSED if c.split()}
    assert shipped <= named, shipped - named


@pytest.mark.parametrize("path,ok", [
    ("hello.txt", True), ("./sub/x.txt", True), ("../x", False), ("/etc/passwd", False),
    (f"{ROOT}/.secrets/demo-service-token", False), ("~/x", False), ("a\nb", False), ("a\0b", False),
])
def test_read_file_path_predicate(path, ok):
    d = evaluate(POLICY, DEV, "demo", _call(path, "read_file", "path"))
    assert (d.action == "allow") is ok, (path, d)
    if not ok:
        assert "nearest rule dev-files: its path condition does not hold" in d.reason


def test_long_argument_lists_are_bounded():
    import time
    t = time.perf_counter()
    d = evaluate(POLICY, DEV, "demo", _call("cat " + "hello.txt " * 5000))
    assert d.action == "deny" and "more than 4096 words" in d.reason
    d = evaluate(POLICY, DEV, "demo", _call("ls " + "-l " * 3000))
    assert d.action == "allow"
    assert time.perf_counter() - t < 5


def test_explain_lists_every_command_and_path():
    lines = "\n".join(explain(POLICY, DEV, "demo", _call("grep -c x /etc/hostname | sort -o out hello.txt")))
    assert "command `grep -c x /etc/hostname`: model ok" in lines
    assert "read /etc/hostname (operand): ok" in lines
    assert "write out (-o): out: outside the write roots" in lines
    assert "read hello.txt (operand): ok" in lines
    assert "decision: DENY" in lines
