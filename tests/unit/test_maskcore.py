"""Masking core: detectors (true and false positives), styles, field/JSONPath rules,
JSON-in-text, tables, where in a JSON-RPC message masking applies, bad input, rules files."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from addons.core.masking import engine as mc
from addons.core.masking.engine import DETECTORS, MaskError, Profile, Rule, mask_message, mask_value
from addons.core.rules import RulesError

KEY = b"unit-test-mask-key-0123456789abcdef"
ALL = {d: "redact" for d in DETECTORS}


def detect_only(**styles) -> Profile:
    return Profile("t", [], {**ALL, **styles}, KEY)


def scan(text: str, profile: Profile | None = None) -> str:
    out, _ = mask_value(profile or detect_only(), text)
    return out


def tool_result(structured=None, texts=(), **extra) -> dict:
    result: dict = {"content": [{"type": "text", "text": t} for t in texts], **extra}
    if structured is not None:
        result["structuredContent"] = structured
    return {"jsonrpc": "2.0", "id": 7, "result": result}


# --- detectors: true positives ----------------------------------------------------------

JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
       "6CnNCj1-xF0-5gqSFmxh1WkWhgfEp9oR3N9VOJquHFU")
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA1c7Z\nq8Yx0w==\n-----END RSA PRIVATE KEY-----"
GHP = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
STRIPE = "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc"

TRUE_POSITIVES = [
    ("email", "write to alice.martin@example.com today", "alice.martin@example.com"),
    ("payment_card", "card 4111111111111111 on file", "4111111111111111"),
    ("payment_card", "card 4111 1111 1111 1111 on file", "4111 1111 1111 1111"),
    ("payment_card", "amex 3782-822463-10005.", "3782-822463-10005"),
    ("payment_card", "mc 5500-0000-0000-0004", "5500-0000-0000-0004"),
    ("ssn", "SSN 123-45-6789 on record", "123-45-6789"),
    ("ssn", "ssn 078 05 1120", "078 05 1120"),
    ("iban", "pay to GB82 WEST 1234 5698 7654 32 please", "GB82 WEST 1234 5698 7654 32"),
    ("iban", "IBAN DE89370400440532013000", "DE89370400440532013000"),
    ("phone", "call +1 415 555 0100 now", "+1 415 555 0100"),
    ("phone", "call (415) 555-0100 now", "(415) 555-0100"),
    ("phone", "call 415-555-0100 now", "415-555-0100"),
    ("phone", "ruf an: +49 30 1234567", "+49 30 1234567"),
    ("jwt", f"token {JWT} end", JWT),
    ("private_key", f"key:\n{PEM}\nthanks", PEM),
    ("aws_access_key", "id AKIAIOSFODNN7EXAMPLE here", "AKIAIOSFODNN7EXAMPLE"),
    ("aws_secret_key", "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
     "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ("gcp_api_key", "key=AIzaSyA-1234567890abcdefghijklmnopqrstu ok", "AIzaSyA-1234567890abcdefghijklmnopqrstu"),
    ("github_token", f"GH {GHP}", GHP),
    ("github_token", "pat github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuv",
     "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuv"),
    ("slack_token", "slack xoxb-123456789012-abcdefghijkl", "xoxb-123456789012-abcdefghijkl"),
    ("stripe_key", f"stripe {STRIPE}", STRIPE),
    ("bearer_token", "Authorization: Bearer abcdef0123456789xyz", "abcdef0123456789xyz"),
    ("bearer_token", "authorization: basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA=="),
    ("secret_assignment", "login with password=hunter22 today", "hunter22"),
    ("secret_assignment", 'config {"client_secret": "abc123xyz"}', "abc123xyz"),
    ("secret_assignment", "DB_PASSWORD: s3cr3t!", "s3cr3t!"),
    ("secret_assignment", "export API_KEY='k-12345'", "k-12345"),
]


@pytest.mark.parametrize("name,text,secret", TRUE_POSITIVES, ids=[f"{t[0]}-{i}" for i, t in enumerate(TRUE_POSITIVES)])
def test_detector_true_positive(name, text, secret):
    prof = Profile("t", [], {name: "redact"}, KEY)      # only this detector
    out, events = mask_value(prof, text)
    assert secret not in out
    tag = DETECTORS[name].label
    assert f"[MASKED:{tag}]" in out
    assert events and events[0].type == tag
    # the surrounding text is kept
    assert out.replace(f"[MASKED:{tag}]", secret) == text


FALSE_POSITIVES = [
    ("payment_card", "order 4111111111111112 shipped"),       # 16 digits failing Luhn
    ("payment_card", "order 1234567812345670 shipped"),       # Luhn-valid, but no card network prefix
    ("payment_card", "timestamp 1712345678901 ms"),
    ("payment_card", "id 41111111111111111111111 too long"),  # 23 digits is not a card
    ("ssn", "on 2024-01-15 we met"),                         # a date is not an SSN
    ("ssn", "invalid 000-12-3456 area"),
    ("ssn", "invalid 666-12-3456 area"),
    ("ssn", "invalid 123-00-4567 group"),
    ("ssn", "part 123-45-67890 longer"),
    ("ssn", "mixed 123-45 6789 seps"),
    ("iban", "GB82 WEST 1234 5698 7654 33 bad checksum"),
    ("iban", "ISO 8601 and RFC 9110 say"),
    ("phone", "version 1.2.3 released 2024-01-15"),
    ("phone", "call 555-0100"),                              # 7 digits: too short
    ("phone", "ip 192.168.100.200"),
    ("jwt", "header eyJhbGciOiJIUzI1NiJ9 alone"),
    ("private_key", "-----BEGIN PUBLIC KEY-----\nMIIBIjANBg\n-----END PUBLIC KEY-----"),
    ("aws_access_key", "lowercase akiaiosfodnn7example"),
    ("aws_access_key", "XAKIAIOSFODNN7EXAMPLE glued"),
    ("gcp_api_key", "AIza short"),
    ("github_token", "ghp_short"),
    ("slack_token", "xoxb-short"),
    ("bearer_token", "the bearer of this letter"),
    ("secret_assignment", "password policy requires 12 characters"),
    ("secret_assignment", "Forgot your password? Click reset."),
    ("email", "user at example dot com, @handle"),
]


@pytest.mark.parametrize("name,text", FALSE_POSITIVES, ids=[f"{t[0]}-{i}" for i, t in enumerate(FALSE_POSITIVES)])
def test_detector_false_positive_is_left_alone(name, text):
    prof = Profile("t", [], {name: "redact"}, KEY)
    out, events = mask_value(prof, text)
    assert out == text and events == []


def test_all_detectors_leave_ordinary_prose_alone():
    text = ("Quarterly report 2024-01-15: revenue grew 12.5% to 1,234,567 USD. Order 12345 shipped "
            "on 2024-02-01 at 10:30. Version 2.3.0, build 20240115. See RFC 9728 section 3.1.")
    assert scan(text) == text


def test_luhn_and_iban_checks():
    assert mc.luhn_ok("4111111111111111") and not mc.luhn_ok("4111111111111112")
    assert mc.iban_ok("DE89370400440532013000") and not mc.iban_ok("DE89370400440532013001")


def test_overlapping_hits_do_not_corrupt_text():
    text = "contact: alice@example.com, card 4111111111111111, ssn 123-45-6789, pw password=abc12345"
    out = scan(text)
    assert out == ("contact: [MASKED:email], card [MASKED:payment_card], ssn [MASKED:ssn], "
                   "pw password=[MASKED:secret]")


def test_masking_is_idempotent():
    text = "a@b.example password=hunter22 4111 1111 1111 1111 Bearer abcdef0123456789"
    for style in ("redact", "partial", "hash"):
        prof = Profile("t", [], {d: style for d in DETECTORS}, KEY)
        once = scan(text, prof)
        assert scan(once, prof) == once


def test_non_ascii_text_keeps_offsets():
    # lower() changes the length of "İ"; values must still be cut at the right place
    text = "İİİ password=sekrit123 İ mail ünïcödé@example.com"
    out = scan(text)
    assert "sekrit123" not in out and "İİİ password=[MASKED:secret] İ" in out


# --- styles -----------------------------------------------------------------------------

def test_style_redact():
    assert mc.apply_style("redact", "ssn", "123-45-6789", KEY) == "[MASKED:ssn]"


def test_style_partial_email_keeps_first_char_and_domain():
    assert mc.apply_style("partial", "email", "alice@example.com", KEY) == "a***@example.com"


def test_style_partial_keeps_last_four_and_separators():
    assert mc.apply_style("partial", "card_number", "4111 1111 1111 1234", KEY) == "**** **** **** 1234"
    assert mc.apply_style("partial", "ssn", "123-45-6789", KEY) == "***-**-6789"


def test_style_partial_short_value_is_fully_redacted():
    assert mc.apply_style("partial", "pin", "1234", KEY) == "[MASKED:pin]"
    assert mc.apply_style("partial", "jwt", JWT, KEY) == "[MASKED:jwt]"


def test_style_hash_is_stable_keyed_and_short():
    a = mc.apply_style("hash", "email", "alice@example.com", KEY)
    assert a == mc.apply_style("hash", "other", "alice@example.com", KEY)   # joinable across fields
    assert a != mc.apply_style("hash", "email", "alice@example.com", b"another-key-xxxxxxxxxxxx")
    assert a != mc.apply_style("hash", "email", "bob@example.com", KEY)
    assert a.startswith("[HASH:") and len(a) == len("[HASH:]") + 12


def test_keep_style_leaves_field_and_skips_detectors():
    prof = Profile("t", [Rule("k", "keep", fields=("contact",))], ALL, KEY)
    msg = tool_result({"contact": "alice@example.com", "other": "alice@example.com"})
    out, _ = mask_message(prof, msg)
    assert out["result"]["structuredContent"] == {"contact": "alice@example.com", "other": "[MASKED:email]"}


# --- field and JSONPath rules -----------------------------------------------------------

def rules_profile(*rules: Rule, detectors=None) -> Profile:
    return Profile("t", list(rules), detectors or {}, KEY)


def test_field_globs_are_case_insensitive():
    prof = rules_profile(Rule("r", "redact", fields=("ssn", "*token")))
    doc = {"SSN": "1", "Api_Token": "x", "tokens": 5, "token_count": 3, "accessToken": "y"}
    out, _ = mask_value(prof, doc)
    assert out == {"SSN": "[MASKED:ssn]", "Api_Token": "[MASKED:api_token]", "tokens": 5, "token_count": 3,
                   "accessToken": "[MASKED:accesstoken]"}


def test_field_regex_rule():
    prof = rules_profile(Rule("r", "redact", regex=(r"^(api|secret)[_-]?key$",), type="key"))
    out, _ = mask_value(prof, {"api-key": "a", "secretkey": "b", "keyring": "c"})
    assert out == {"api-key": "[MASKED:key]", "secretkey": "[MASKED:key]", "keyring": "c"}


def test_recursive_descent_jsonpath_reaches_every_depth():
    prof = rules_profile(Rule("r", "redact", paths=("$..api_token",)))
    doc = {"api_token": "a", "billing": {"api_token": "b", "plans": [{"api_token": "c"}, {"x": {"api_token": "d"}}]},
           "API_TOKEN": "case-sensitive-path"}
    out, events = mask_value(prof, doc)
    assert json.dumps(out).count("[MASKED:api_token]") == 4
    assert out["API_TOKEN"] == "case-sensitive-path"
    assert {e.path for e in events} == {"$.api_token", "$.billing.api_token", "$.billing.plans[*].api_token",
                                        "$.billing.plans[*].x.api_token"}


def test_exact_jsonpath_only_matches_that_path():
    prof = rules_profile(Rule("r", "redact", paths=("$.billing.api_token",)))
    out, _ = mask_value(prof, {"billing": {"api_token": "a"}, "other": {"api_token": "b"}})
    assert out == {"billing": {"api_token": "[MASKED:api_token]"}, "other": {"api_token": "b"}}


def test_jsonpath_wildcards_indices_and_slices():
    rows = [{"ssn": str(i), "name": f"n{i}"} for i in range(5)]
    for expr, masked in (("$.rows[*].ssn", {0, 1, 2, 3, 4}), ("$.rows[0].ssn", {0}), ("$.rows[-1].ssn", {4}),
                         ("$.rows[1:3].ssn", {1, 2}), ("$.*[*].ssn", {0, 1, 2, 3, 4})):
        prof = rules_profile(Rule("r", "redact", paths=(expr,)))
        out, _ = mask_value(prof, {"rows": rows})
        got = {i for i, r in enumerate(out["rows"]) if r["ssn"].startswith("[MASKED")}
        assert got == masked, expr


def test_jsonpath_filter_falls_back_to_jsonpath_ng():
    prof = rules_profile(Rule("r", "redact", paths=("$.rows[?(@.vip == true)].email",)))
    doc = {"rows": [{"vip": True, "email": "a@x.io"}, {"vip": False, "email": "b@x.io"}]}
    out, _ = mask_value(prof, doc)
    assert [r["email"] for r in out["rows"]] == ["[MASKED:email]", "b@x.io"]


def test_rule_on_container_masks_every_leaf_and_keeps_shape():
    prof = rules_profile(Rule("r", "redact", fields=("credentials",)))
    out, _ = mask_value(prof, {"credentials": {"user": "u", "keys": ["k1", 2, None]}, "n": 1})
    assert out == {"credentials": {"user": "[MASKED:credentials]", "keys": ["[MASKED:credentials]",
                                                                           "[MASKED:credentials]", None]}, "n": 1}


def test_first_matching_rule_wins():
    prof = rules_profile(Rule("a", "partial", fields=("email",)), Rule("b", "redact", fields=("e*",)))
    out, _ = mask_value(prof, {"email": "alice@example.com", "extra": "x"})
    assert out == {"email": "a***@example.com", "extra": "[MASKED:extra]"}


def test_numbers_matched_by_rule_become_masked_strings():
    prof = rules_profile(Rule("a", "partial", fields=("card_number",)))
    out, _ = mask_value(prof, {"card_number": 4111111111111111})
    assert out == {"card_number": "************1111"}


def test_masked_field_names_are_found_in_free_text_too():
    prof = rules_profile(Rule("r", "redact", fields=("ssn", "*token")), Rule("p", "redact", paths=("$..api_key",)))
    text = 'customer ssn: 123456789, "api_token": "opaque-value", API_KEY=zzz, token_count: 5, ssn_hint: x'
    out, _ = mask_value(prof, text)
    assert out == ('customer ssn: [MASKED:ssn], "api_token": "[MASKED:api_token]", API_KEY=[MASKED:api_key], '
                   "token_count: 5, ssn_hint: x")


# --- where masking applies in a JSON-RPC message -----------------------------------------

STRICT = Profile("strict", [Rule("ids", "redact", fields=("ssn", "card_number")),
                            Rule("tok", "redact", paths=("$..api_token",)),
                            Rule("mail", "partial", fields=("email",))],
                 {**ALL, "email": "partial"}, KEY)
CUSTOMER = {"id": 1, "name": "Alice", "email": "alice@example.com", "ssn": "123-45-6789",
            "card_number": "4111111111111111", "billing": {"api_token": "tok_opaque_1"},
            "notes": "reach me at bob@example.org"}
SECRETS = ("alice@example.com", "123-45-6789", "4111111111111111", "tok_opaque_1", "bob@example.org")


def assert_clean(obj):
    dumped = json.dumps(obj)
    for s in SECRETS:
        assert s not in dumped


def test_structured_content_is_masked_structurally():
    out, events = mask_message(STRICT, tool_result(CUSTOMER))
    sc = out["result"]["structuredContent"]
    assert sc == {"id": 1, "name": "Alice", "email": "a***@example.com", "ssn": "[MASKED:ssn]",
                  "card_number": "[MASKED:card_number]", "billing": {"api_token": "[MASKED:api_token]"},
                  "notes": "reach me at b***@example.org"}
    assert {(e.path, e.type) for e in events} >= {("$.result.structuredContent.ssn", "ssn"),
                                                  ("$.result.structuredContent.billing.api_token", "api_token")}


def test_json_text_block_is_masked_structurally_and_reserialised_alike():
    compact = json.dumps(CUSTOMER, separators=(",", ":"))
    pretty = json.dumps(CUSTOMER, indent=2)
    out, events = mask_message(STRICT, tool_result(texts=(compact, pretty)))
    t0, t1 = (c["text"] for c in out["result"]["content"])
    assert json.loads(t0)["billing"]["api_token"] == "[MASKED:api_token]"
    assert ": " not in t0 and "\n" not in t0
    assert t1.startswith('{\n  "id": 1,')
    assert_clean(out)
    assert any(e.path == "$.result.content[*].text(json).ssn" for e in events)


def test_rows_as_json_text_are_masked():
    rows = json.dumps([CUSTOMER, {**CUSTOMER, "id": 2}])
    out, events = mask_message(STRICT, tool_result(texts=(rows,)))
    assert_clean(out)
    ssn = next(e for e in events if e.type == "ssn" and "(json)" in e.path)
    assert ssn.count == 2 and ssn.path == "$.result.content[*].text(json)[*].ssn"


def test_csv_text_masks_columns_by_header_and_detectors():
    csv_text = ("id,name,ssn,api_token,notes\n"
                "1,Alice,123-45-6789,tok_opaque_1,mail alice@example.com\n"
                "2,Bob,078-05-1120,tok_opaque_2,none\n")
    out, events = mask_message(STRICT, tool_result(texts=(csv_text,)))
    text = out["result"]["content"][0]["text"]
    assert text.splitlines()[1] == "1,Alice,[MASKED:ssn],[MASKED:api_token],mail a***@example.com"
    assert "tok_opaque_2" not in text and "078-05-1120" not in text


def test_markdown_table_masks_columns():
    md = "| id | email | ssn |\n|----|-------|-----|\n| 1 | alice@example.com | 123-45-6789 |\n"
    out, _ = mask_message(STRICT, tool_result(texts=(md,)))
    assert out["result"]["content"][0]["text"].splitlines()[2] == "| 1 | a***@example.com | [MASKED:ssn] |"


def test_resource_contents_and_embedded_resources():
    msg = {"jsonrpc": "2.0", "id": 2, "result": {"contents": [
        {"uri": "file:///c.json", "mimeType": "application/json", "text": json.dumps(CUSTOMER)},
        {"uri": "file:///b.bin", "blob": "AAAA"}]}}
    out, _ = mask_message(STRICT, msg)
    assert_clean(out)
    assert out["result"]["contents"][1] is msg["result"]["contents"][1]
    emb = tool_result(texts=())
    emb["result"]["content"] = [{"type": "resource", "resource": {"uri": "x:", "text": "ssn 123-45-6789"}}]
    out, _ = mask_message(STRICT, emb)
    assert out["result"]["content"][0]["resource"]["text"] == "ssn [MASKED:ssn]"


def test_error_message_and_data_are_masked():
    msg = {"jsonrpc": "2.0", "id": 3, "error": {"code": -32000, "message": "no row for alice@example.com",
                                                "data": {"row": CUSTOMER, "trace": "ssn=123-45-6789"}}}
    out, _ = mask_message(STRICT, msg)
    assert_clean(out)
    assert out["error"]["code"] == -32000 and out["id"] == 3


def test_server_notifications_are_masked():
    log_msg = {"jsonrpc": "2.0", "method": "notifications/message",
               "params": {"level": "info", "logger": "db", "data": {"row": CUSTOMER}}}
    progress = {"jsonrpc": "2.0", "method": "notifications/progress",
                "params": {"progressToken": "tok_opaque_1", "progress": 1, "message": "loading 123-45-6789"}}
    out1, _ = mask_message(STRICT, log_msg)
    out2, _ = mask_message(STRICT, progress)
    assert_clean(out1)
    assert out2["params"]["message"] == "loading [MASKED:ssn]"
    assert out2["params"]["progressToken"] == "tok_opaque_1"      # protocol field, not data


def test_sampling_request_messages_are_masked():
    msg = {"jsonrpc": "2.0", "id": 9, "method": "sampling/createMessage", "params": {
        "messages": [{"role": "user", "content": {"type": "text", "text": "summarise 123-45-6789"}}],
        "maxTokens": 100}}
    out, _ = mask_message(STRICT, msg)
    assert out["params"]["messages"][0]["content"]["text"] == "summarise [MASKED:ssn]"
    assert out["params"]["maxTokens"] == 100


def test_unchanged_message_is_the_same_object_and_input_never_mutated():
    clean = tool_result({"id": 1, "name": "Alice"}, texts=("nothing to see", '{"a": 1}'))
    out, events = mask_message(STRICT, clean)
    assert out is clean and events == []
    dirty = tool_result(dict(CUSTOMER), texts=(json.dumps(CUSTOMER),))
    before = json.dumps(dirty)
    mask_message(STRICT, dirty)
    assert json.dumps(dirty) == before


def test_protocol_fields_are_never_touched():
    msg = tool_result(CUSTOMER, texts=("x",), isError=False, _meta={"ssn": "123-45-6789"})
    msg["id"] = "123-45-6789"
    out, _ = mask_message(STRICT, msg)
    assert out["id"] == "123-45-6789" and out["jsonrpc"] == "2.0" and out["result"]["isError"] is False


def test_events_never_hold_values():
    _, events = mask_message(STRICT, tool_result(CUSTOMER, texts=(json.dumps(CUSTOMER),)))
    dumped = repr(events)
    for s in SECRETS:
        assert s not in dumped
    assert all(e.count >= 1 for e in events)


def test_empty_profile_is_a_no_op():
    prof = Profile("none", [], {}, KEY)
    msg = tool_result(CUSTOMER)
    assert prof.empty and mask_message(prof, msg) == (msg, [])


# --- bad input --------------------------------------------------------------------------

def nested(depth: int) -> dict:
    doc: dict = {"leaf": "123-45-6789"}
    for _ in range(depth - 1):
        doc = {"n": doc}
    return doc


def test_deep_nesting_fails_closed():
    with pytest.raises(MaskError):
        mask_message(STRICT, tool_result(nested(mc.MAX_DEPTH + 1)))
    with pytest.raises(MaskError):
        mask_message(STRICT, tool_result(texts=(json.dumps(nested(mc.MAX_DEPTH + 1)),)))
    out, _ = mask_message(STRICT, tool_result(nested(mc.MAX_DEPTH - 1)))
    assert "[MASKED:ssn]" in json.dumps(out)


def test_too_many_values_fail_closed(monkeypatch):
    monkeypatch.setattr(mc, "MAX_NODES", 1000)
    with pytest.raises(MaskError):
        mask_message(STRICT, tool_result({"rows": list(range(2000))}))


def test_huge_array_is_masked():
    rows = [{"id": i, "ssn": "123-45-6789"} for i in range(50_000)]
    out, events = mask_message(STRICT, tool_result({"rows": rows}))
    assert events[0].count == 50_000 and events[0].path == "$.result.structuredContent.rows[*].ssn"


def test_text_that_is_not_strict_json_falls_back_to_detectors():
    for bad in ('{"ssn": "123-45-6789", "ssn": "x"}', '{"a": "\\ud800", "b": "123-45-6789"}', "[1, 2, NaN] 123-45-6789"):
        out, _ = mask_message(STRICT, tool_result(texts=(bad,)))
        assert "123-45-6789" not in out["result"]["content"][0]["text"]


def test_non_dict_message_is_returned_untouched():
    assert mask_message(STRICT, [1, 2]) == ([1, 2], [])


def test_256k_result_is_masked_in_linear_time():
    """Complexity, not speed (bench/ measures speed): 4x the rows may cost ~4x, not ~16x."""
    def run(n_rows: int) -> tuple[float, int]:
        rows = [{"id": i, "name": f"Customer {i}", "email": f"user{i}@example.com", "ssn": "123-45-6789",
                 "card_number": "4111111111111111", "billing": {"api_token": f"tok_{i}"},
                 "notes": "Prefers phone; VIP since 2019. Order 12345 shipped on 2024-01-15."} for i in range(n_rows)]
        text = json.dumps(rows)
        best = float("inf")
        for _ in range(3):
            msg = tool_result(texts=(text,))
            t = time.perf_counter()
            out, _ = mask_message(STRICT, msg)
            best = min(best, time.perf_counter() - t)
            assert "123-45-6789" not in out["result"]["content"][0]["text"]
        return best, len(text)
    small, _ = run(275)
    large, size = run(1100)
    assert size > 256 * 1024
    assert large / small < 10, (small, large)


# --- rules files ------------------------------------------------------------------------

def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "masking.yaml").write_text(text)
    return tmp_path


def test_shipped_rules_load_and_select_per_role():
    cfg = mc.load_masking("rules", KEY)
    assert cfg.select("demo", "get_customer", ["analyst"])[0].name == "analyst"
    assert cfg.select("demo", "get_customer", ["dev"])[0].name == "strict"
    assert cfg.select("demo", "get_customer", [])[0].name == "strict"


def test_shipped_rules_analyst_vs_strict():
    cfg = mc.load_masking("rules", KEY)
    analyst, = cfg.select("demo", "get_customer", ["analyst"])
    strict, = cfg.select("demo", "get_customer", ["dev"])
    a, _ = mask_message(analyst, tool_result(CUSTOMER))
    s, _ = mask_message(strict, tool_result(CUSTOMER))
    a, s = a["result"]["structuredContent"], s["result"]["structuredContent"]
    assert a["email"] == "a***@example.com" and a["card_number"] == "************1111"
    assert s["email"].startswith("[HASH:") and s["card_number"] == "[MASKED:card_number]"
    for d in (a, s):
        assert d["ssn"] == "[MASKED:ssn]" and d["billing"]["api_token"] == "[MASKED:api_token]"


def test_missing_file_gives_builtin_all_detectors(tmp_path):
    cfg = mc.load_masking(tmp_path, KEY)
    prof, = cfg.select("demo", "t", [])
    assert scan("ssn 123-45-6789", prof) == "ssn [MASKED:ssn]"


def test_select_by_connection_tool_subject_and_client(tmp_path):
    write(tmp_path, """
default_profile: strict
profiles:
  strict: {detectors: all}
  open: {detectors: off}
  tooly: {detectors: [ssn]}
select:
  - {connection: other, profile: open}
  - {tool: "get_*", profile: tooly}
  - {subject: "job-*", client: ci, profile: open}
""")
    cfg = mc.load_masking(tmp_path, KEY)
    names = lambda *a, **k: [p.name for p in cfg.select(*a, **k)]  # noqa: E731
    assert names("other", "x") == ["open"]
    assert names("demo", "get_customer") == ["tooly"]
    assert names("demo", "query_sql", sub="job-1", client="ci") == ["open"]
    assert names("demo", "query_sql", sub="job-1", client="web") == ["strict"]
    # unknown tool (e.g. a legacy SSE stream): every profile a selector could give
    assert names("demo", None) == ["tooly", "strict"]


def test_extends_inherits_rules_and_detectors(tmp_path):
    write(tmp_path, """
profiles:
  base:
    rules: [{fields: [ssn]}, {fields: [email], style: hash}]
    detectors: {default: redact, phone: off}
  child:
    extends: base
    rules: [{fields: [email], style: partial}]
    detectors: {email: partial}
default_profile: base
""")
    cfg = mc.load_masking(tmp_path, KEY)
    child = cfg.profiles["child"]
    assert [r.fields for r in child.rules] == [("email",), ("ssn",), ("email",)]
    assert child.detectors["email"] == "partial" and "phone" not in child.detectors


@pytest.mark.parametrize("text,line,needle", [
    ("profiles:\n  p:\n    rules:\n      - fields: [a]\n        style: scramble\n", 5, "style"),
    ("profiles:\n  p:\n    rules:\n      - path: '$..[['\n", 4, "JSONPath"),
    ("profiles:\n  p:\n    rules:\n      - regex: ['(']\n", 4, "regex"),
    ("profiles:\n  p:\n    rules:\n      - style: redact\n", 4, "needs fields"),
    ("profiles:\n  p:\n    extends: q\n", 2, "unknown profile"),
    ("profiles:\n  p: {extends: q}\n  q: {extends: p}\n", 3, "cycle"),
    ("profiles:\n  p: {detectors: [nope]}\n", 2, "unknown detector"),
    ("default_profile: p\nprofiles:\n  p: {}\nselect:\n  - profile: q\n", 5, "profile must name"),
    ("profiles:\n  p: {}\ndefault_profile: zz\n", 3, "default_profile"),
    ("profiles:\n  p: {}\nbogus: 1\n", 3, "unknown key"),
    ("profiles:\n  p:\n    rulez: []\n", 3, "unknown key"),
    ("profiles: [\n", 2, ""),
])
def test_broken_rules_report_file_and_line(tmp_path, text, line, needle):
    write(tmp_path, text)
    with pytest.raises(RulesError) as ei:
        mc.load_masking(tmp_path, KEY)
    assert ei.value.line == line, str(ei.value)
    assert ei.value.file.endswith("masking.yaml") and needle in ei.value.message
    assert mc.validate_dir(tmp_path) == [str(ei.value)]


def test_text_twin_of_structured_content_masked_once_same_result():
    """content[].text holding the structuredContent as JSON reuses its masking: the output
    and the masking events equal masking both independently."""
    import json as _json
    from addons.core.masking.engine import load_masking, mask_message
    from pathlib import Path as _P
    cfg = load_masking(_P(__file__).resolve().parents[2] / "rules")
    prof = cfg.profiles[cfg.default]
    sc = {"rows": [{"id": i, "email": f"u{i}@example.com", "ssn": "123-45-6789", "notes": "call +1 415 555 0100",
                    "billing": {"api_token": "tok_live_abcdef123456"}} for i in range(5)]}
    for text in (_json.dumps(sc, indent=2), _json.dumps(sc), _json.dumps(sc, separators=(",", ":"))):
        both, ev_both = mask_message(prof, {"jsonrpc": "2.0", "id": 1, "result": {
            "structuredContent": sc, "content": [{"type": "text", "text": text}]}})
        only_sc, ev_sc = mask_message(prof, {"jsonrpc": "2.0", "id": 1, "result": {"structuredContent": sc}})
        only_text, ev_text = mask_message(prof, {"jsonrpc": "2.0", "id": 1, "result": {
            "content": [{"type": "text", "text": text}]}})
        assert both["result"]["structuredContent"] == only_sc["result"]["structuredContent"]
        assert both["result"]["content"][0]["text"] == only_text["result"]["content"][0]["text"]
        assert sorted(ev_both, key=repr) == sorted(ev_sc + ev_text, key=repr)
        assert "123-45-6789" not in _json.dumps(both) and "tok_live" not in _json.dumps(both)
    # a text that differs from structuredContent is masked on its own
    other = {"rows": [{"email": "x@example.com"}]}
    out, _ = mask_message(prof, {"jsonrpc": "2.0", "id": 1, "result": {
        "structuredContent": sc, "content": [{"type": "text", "text": _json.dumps(other)}]}})
    assert "x@example.com" not in out["result"]["content"][0]["text"]
