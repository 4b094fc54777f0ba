"""Request-side masking (`requests:` in masking.yaml), the masked mitmweb view, loose file
modes in `check`, and the redaction addon's secret rotation."""
from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

import pytest

from addons import cli
from addons.core.audit.chain import loose_modes
from addons.core.masking.engine import load_masking, parse_masking
from addons.hooks.maskview import masked_body
from addons.core.mcpwire import Message
from addons.hooks.recorder import FlowEvents
from addons.hooks.redaction import SecretRedaction
from addons.core.rules import RulesError, load_yaml
from addons.core.masking.secretscan import REDACTED, redact_str

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cfg():
    return load_masking(ROOT / "rules", b"k" * 32)


def call(args: dict) -> dict:
    return {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "launch_container",
                                                                          "arguments": args}}


@pytest.mark.parametrize("args,hidden", [
    ({"image": "pg", "env": {"DB_PASSWORD": "hunter2-x"}}, "hunter2-x"),
    ({"image": "pg", "env": ["DB_PASSWORD=hunter2-x"]}, "hunter2-x"),
    ({"db_password": "hunter2-x"}, "hunter2-x"),
    ({"config": {"api_key": "hunter2-x"}}, "hunter2-x"),
    ({"GITHUB_TOKEN": "hunter2-x"}, "hunter2-x"),
    ({"client_secret": "hunter2-x"}, "hunter2-x"),
    ({"cmd": "curl -H 'Authorization: Bearer abcdefghijklmnopqrstuvwx'"}, "abcdefghijklmnopqrstuvwx"),
    ({"note": "key AKIAIOSFODNN7EXAMPLE"}, "AKIAIOSFODNN7EXAMPLE"),
])
def test_shipped_request_rules_mask_secret_arguments(cfg, args, hidden):
    shown, events = cfg.mask_request(call(args))
    assert hidden not in json.dumps(shown) and events
    assert shown["params"]["name"] == "launch_container"


def test_ordinary_arguments_untouched_and_original_not_mutated(cfg):
    msg = call({"image": "postgres:17", "id": 42, "email": "alice@example.com", "sql": "SELECT 1"})
    before = json.dumps(msg)
    shown, events = cfg.mask_request(msg)
    assert shown == msg and events == [] and json.dumps(msg) == before
    secret = call({"env": {"A_PASSWORD": "x" * 12}})
    cfg.mask_request(secret)
    assert secret["params"]["arguments"]["env"]["A_PASSWORD"] == "x" * 12     # upstream copy intact


def test_requests_section_errors_have_line_numbers(tmp_path):
    f = tmp_path / "masking.yaml"
    f.write_text("version: 1\nprofiles:\n  p: {detectors: all}\ndefault_profile: p\nrequests:\n  rules:\n"
                 "    - {name: r, fields: [x], style: sparkle}\n")
    with pytest.raises(RulesError) as e:
        parse_masking(f, load_yaml(f))
    assert ":7" in str(e.value) or "line 7" in str(e.value) or "sparkle" in str(e.value)
    f.write_text("version: 1\nprofiles:\n  p: {detectors: all}\ndefault_profile: p\nrequests:\n  bogus: 1\n")
    with pytest.raises(RulesError):
        parse_masking(f, load_yaml(f))


def test_requests_is_not_a_selectable_profile_and_may_extend_one(tmp_path):
    f = tmp_path / "masking.yaml"
    f.write_text("version: 1\nprofiles:\n  requests: {detectors: off}\n  base:\n    rules:\n"
                 "      - {name: s, fields: [ssn], style: redact}\ndefault_profile: requests\n"
                 "requests: {extends: base}\n")
    c = parse_masking(f, load_yaml(f))
    assert set(c.profiles) == {"requests", "base"}          # a user profile may be called requests
    shown, _ = c.mask_request(call({"ssn": "123-45-6789"}))
    assert shown["params"]["arguments"]["ssn"] == "[MASKED:ssn]"


def test_no_requests_section_stores_as_sent(tmp_path):
    f = tmp_path / "masking.yaml"
    f.write_text("version: 1\nprofiles:\n  p: {detectors: all}\ndefault_profile: p\n")
    c = parse_masking(f, load_yaml(f))
    msg = call({"password": "x"})
    assert c.mask_request(msg) == (msg, [])


def test_recorder_stores_the_masked_copy_with_mask_rows(cfg):
    fe = FlowEvents({"instance": "i"}, mask_c2s=cfg.mask_request)
    raw = call({"image": "pg", "env": {"DB_PASSWORD": "hunter2-x"}})
    ev = fe.c2s(Message(kind="request", raw=raw, id=7, method="tools/call"), time.time())
    assert "hunter2-x" not in json.dumps(ev) and ev["params"]["arguments"]["image"] == "pg"
    assert [m.path for m in fe.request_masks] == ["$.params.arguments.env.DB_PASSWORD"]

    def broken(_):
        raise ValueError("boom")
    fe = FlowEvents({"instance": "i"}, mask_c2s=broken)
    ev = fe.c2s(Message(kind="request", raw=raw, id=7, method="tools/call"), time.time())
    assert "hunter2-x" not in json.dumps(ev)                 # fail closed: nothing stored


def test_masked_view_body(cfg):
    body = json.dumps(call({"image": "pg", "env": {"DB_PASSWORD": "hunter2-x"}})).encode()
    text = masked_body(body, cfg, [])
    assert "hunter2-x" not in text and "[MASKED:env]" in text and text.startswith("# arguments masked")
    batch = json.dumps([call({"password": "hunter2-x"}), call({"x": 1})]).encode()
    assert "hunter2-x" not in masked_body(batch, cfg, [])


def test_check_warns_on_loose_modes(tmp_path, capsys, monkeypatch):
    rec = tmp_path / "recordings" / "gw"
    rec.mkdir(parents=True)
    (rec / "journal-00000001.jsonl").write_text("{}\n")
    os.chmod(rec / "journal-00000001.jsonl", 0o644)
    os.chmod(rec, 0o755)
    sec = tmp_path / "keys"
    sec.mkdir(mode=0o700)
    (sec / "k.pem").write_text("x")
    os.chmod(sec / "k.pem", 0o600)
    warnings = loose_modes([tmp_path / "recordings", sec])
    assert any("journal-00000001.jsonl" in w and "chmod 600" in w for w in warnings)
    assert any(w.endswith("gw is accessible by group/others (mode 755); chmod 700 it") for w in warnings)
    assert not any("k.pem" in w for w in warnings)
    monkeypatch.setenv("BASTION_RECORDINGS", str(tmp_path / "recordings"))
    cli.main(["check", str(ROOT / "rules"), "--secrets", str(sec)])
    assert "journal-00000001.jsonl is accessible" in capsys.readouterr().out
    os.chmod(rec, 0o700)                  # nobody else can enter gw/: what is inside is out of reach
    assert not any("gw" in w for w in loose_modes([tmp_path / "recordings"]))


def test_rotated_secret_file_is_picked_up(tmp_path):
    rules = tmp_path / "rules"
    rules.mkdir()
    cred = tmp_path / "svc-token"
    old, new = "svc-old-" + secrets.token_urlsafe(20), "svc-new-" + secrets.token_urlsafe(20)
    cred.write_text(old)
    (rules / "connections.yaml").write_text(json.dumps(
        {"connections": {"demo": {"upstream": "http://127.0.0.1:9/mcp", "credential": {"from": f"file:{cred}"}}}}))
    mask_key = tmp_path / "mask-key"
    mask_key.write_text("m" * 40)
    r = SecretRedaction()
    r.reload(str(rules), str(tmp_path / "no-issuer"), str(mask_key))
    assert redact_str([r.index], f"x {old}")[0] == f"x {REDACTED}"
    assert r.check_reload() is False
    cred.write_text(new)
    os.utime(cred, (time.time() + 5,) * 2)
    assert r.check_reload() is True
    assert redact_str([r.index], f"x {new}")[0] == f"x {REDACTED}"
    assert redact_str([r.index], f"x {old}")[0] == f"x {REDACTED}"   # previous generation still matched
    newer = "svc-newer-" + secrets.token_urlsafe(20)
    cred.write_text(newer)
    os.utime(cred, (time.time() + 10,) * 2)
    assert r.check_reload() is True
    assert redact_str([r.index], f"x {old}")[1] == set()             # two rotations ago: dropped
    assert redact_str([r.index], f"x {newer}")[1]


def test_log_lines_never_carry_a_known_secret(tmp_path):
    import logging
    from addons.hooks.redaction import LogRedactor
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "connections.yaml").write_text("connections: {}\n")
    key = tmp_path / "mask-key"
    value = "m" + secrets.token_hex(20)
    key.write_text(value)
    r = SecretRedaction()
    r.reload(str(rules), str(tmp_path), str(key))
    f = LogRedactor(r)
    rec = logging.LogRecord("mitmproxy", logging.WARNING, "x", 1, "upstream said %s", (f"key={value}",), None)
    assert f.filter(rec) and value not in rec.getMessage() and REDACTED in rec.getMessage()
    ok = logging.LogRecord("mitmproxy", logging.INFO, "x", 1, "client connect %s", ("127.0.0.1",), None)
    assert f.filter(ok) and ok.getMessage() == "client connect 127.0.0.1"
