"""addons/core/rules.py: YAML loading with file:line errors, line lookup, change detection."""
from __future__ import annotations

import os

import pytest

from addons.core.rules import ChangeWatcher, Located, RulesError, line_of, load_yaml, rules_files, to_plain


def write(tmp_path, text, name="x.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_load_and_line_numbers(tmp_path):
    p = write(tmp_path, "# header\na: 1\nb:\n  c: [1, 2]\n  d:\n    - x\n    - y\n")
    doc = load_yaml(p)
    assert to_plain(doc) == {"a": 1, "b": {"c": [1, 2], "d": ["x", "y"]}}
    assert line_of(doc, "a") == 2 and line_of(doc, "b") == 3
    assert line_of(doc["b"], "d") == 5 and line_of(doc["b"]["d"], 1) == 7
    assert line_of(doc["b"]) == 4
    assert line_of(doc, "missing") is None and line_of(5) is None and line_of({"a": 1}, "a") is None
    err = Located(str(p)).error(doc["b"], "bad d", "d")
    assert str(err) == f"{p}:5: bad d" and err.line == 5 and err.message == "bad d"


def test_syntax_error_has_line(tmp_path):
    p = write(tmp_path, "a: 1\nb: [1, 2\nc: 3\n")
    with pytest.raises(RulesError) as ei:
        load_yaml(p)
    assert ei.value.line is not None and ei.value.line >= 2
    assert str(ei.value).startswith(f"{p}:{ei.value.line}: ")


def test_duplicate_keys_refused_with_line(tmp_path):
    p = write(tmp_path, "a: 1\nb: 2\na: 3\n")
    with pytest.raises(RulesError) as ei:
        load_yaml(p)
    assert ei.value.line in (1, 3) and "duplicate" in ei.value.message.lower()


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(RulesError, match="file not found"):
        load_yaml(tmp_path / "nope.yaml")
    p = tmp_path / "latin.yaml"
    p.write_bytes("a: caf\xe9\n".encode("latin-1"))
    with pytest.raises(RulesError, match="cannot read"):
        load_yaml(p)
    with pytest.raises(RulesError):
        load_yaml(tmp_path)            # a directory


def test_empty_file_is_none(tmp_path):
    assert load_yaml(write(tmp_path, "")) is None


def test_rules_error_without_line():
    e = RulesError("f.yaml", None, "msg")
    assert str(e) == "f.yaml: msg"


def test_to_plain_converts_keys_and_nesting(tmp_path):
    doc = load_yaml(write(tmp_path, "1: [a, {b: 2}]\n"))
    out = to_plain(doc)
    assert out == {"1": ["a", {"b": 2}]} and type(out) is dict and type(out["1"][1]) is dict


def test_rules_files(tmp_path):
    assert rules_files(tmp_path, "policy") == [tmp_path / "policy.yaml"]
    d = tmp_path / "policy.d"
    d.mkdir()
    (d / "b.yaml").write_text("")
    (d / "a.yaml").write_text("")
    (d / "c.txt").write_text("")
    assert rules_files(tmp_path, "policy") == [tmp_path / "policy.yaml", d / "a.yaml", d / "b.yaml"]


def test_change_watcher(tmp_path):
    p = write(tmp_path, "a: 1\n", "policy.yaml")
    w = ChangeWatcher(lambda: rules_files(tmp_path, "policy"))
    assert not w.changed()
    p.write_text("a: 22\n")                            # size changes
    assert w.changed() and not w.changed()
    st = p.stat()
    p.write_text("a: 33\n")                            # same size: mtime changes
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    assert w.changed()
    p.unlink()
    assert w.changed() and not w.changed()
    (tmp_path / "policy.d").mkdir()
    write(tmp_path, "x: 1\n", "policy.d/extra.yaml")   # new file in the .d directory
    assert w.changed()


async def test_poll_forever_survives_a_failing_check(caplog):
    import asyncio

    from addons.core.rules import poll_forever
    calls = []

    def check():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("broken reload")
    task = asyncio.get_running_loop().create_task(poll_forever(check, 0.01))
    for _ in range(100):
        await asyncio.sleep(0.01)
        if len(calls) >= 3:
            break
    task.cancel()
    assert len(calls) >= 3 and "reload check failed" in caplog.text
