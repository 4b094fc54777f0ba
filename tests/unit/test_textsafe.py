"""addons/core/textsafe.py: caller-chosen text never reaches a log, table or comment raw."""
from __future__ import annotations

import json
import logging

from addons.cli.recordings import render
from addons.core.textsafe import esc, get_logger


def test_esc_escapes_controls_escapes_and_invisible_characters():
    assert esc("alice\nINFO forged") == "alice\\nINFO forged"
    assert esc("\x1b[31mred\x1b[0m") == "\\x1b[31mred\\x1b[0m"
    assert esc("a\x9bb\x7f\x00") == "a\\x9bb\\x7f\\x00"
    assert esc("evil\u202etxt.exe\u200b\u2028") == "evil\\u202etxt.exe\\u200b\\u2028"
    assert esc(7) == "7"


def test_esc_leaves_ordinary_text_alone():
    for text in ("alice@example.com", "Zoë 日本 ✓ ⏳", "C:\\dir\\file", 'json {"a": [1, 2]}'):
        assert esc(text) == text


def test_json_style_stays_valid_json():
    value = {"sub": "a\x9b\u202eb\nc", "k": ["é"]}
    text = esc(json.dumps(value, ensure_ascii=False, indent=1), json_text=True)
    assert "\x9b" not in text and "\u202e" not in text and json.loads(text) == value


def test_logger_writes_one_line_per_event(caplog):
    log = get_logger("bastion.test-textsafe")
    with caplog.at_level(logging.INFO, logger="bastion.test-textsafe"):
        log.info("denied %s on %s", "mallory\n2026-01-01 INFO approved by root", "tool\x1b]0;x\x07")
    (rec,) = caplog.records
    assert rec.getMessage() == "denied mallory\\n2026-01-01 INFO approved by root on tool\\x1b]0;x\\x07"
    assert get_logger("bastion.test-textsafe").filters.count(log.filters[0]) == 1   # added once


def test_sql_table_csv_and_json_output_are_escaped():
    rows = [("mallory\x1b[2J\nfake row", {"t": "\u202e"})]
    for fmt in ("table", "csv", "json"):
        out = render(["sub", "params"], rows, fmt)
        assert "\x1b" not in out and "\u202e" not in out, fmt
    assert json.loads(render(["sub", "params"], rows, "json"))[0]["sub"] == "mallory\x1b[2J\nfake row"


def test_exported_flow_comments_are_escaped():
    from addons.cli.recordings import build_flows
    ev = {"kind": "refusal", "flow_id": "f1", "instance": "i", "seq": 1, "ts": 1.0, "direction": "gateway",
          "sub": "eve\x1b[2J\nidentity root", "roles": ["x\u202e"], "reason": "denied\rtool\x07",
          "http_method": "POST", "path": "/mcp/demo", "connection": "demo", "session_id": "s"}
    (f,) = build_flows([ev])
    assert "\x1b" not in f.comment and "\x07" not in f.comment and "\u202e" not in f.comment
    assert f.comment.splitlines()[0] == "identity eve\\x1b[2J\\nidentity root roles=x\\u202e"
