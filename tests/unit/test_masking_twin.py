"""The JSON text that repeats a tool result's structuredContent: its masking may reuse the
masked structuredContent only when the text provably decodes to exactly that value; any
other text is masked on its own (a mask is never undone, nothing in the text escapes)."""
from __future__ import annotations

import json

import pytest

from addons.core.masking import engine
from addons.core.masking.engine import DETECTORS, Profile, Rule, load_masking, mask_message
from tests.unit.masking_corpus import ROOT

KEY = b"twin-test-key-0123456789abcdef"
STRICT = load_masking(ROOT / "rules", KEY).profiles["strict"]
SSN = "123-45-6789"


def result(sc, text) -> dict:
    return {"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": text}],
                                                  "structuredContent": sc}}


@pytest.fixture
def walks(monkeypatch):
    """How many documents the engine walked (1: the text reused structuredContent's masking)."""
    count = [0]
    real = engine._mask_doc

    def counting(ctx, doc, path):
        count[0] += 1
        return real(ctx, doc, path)
    monkeypatch.setattr(engine, "_mask_doc", counting)
    return count


def text_of(out: dict) -> str:
    return out["result"]["content"][0]["text"]


ROWS = {"rows": [{"id": i, "email": f"u{i}@example.com", "ssn": SSN, "score": 1.5, "vip": i % 2 == 0,
                  "notes": f"call +1 415 555 01{i:02d}", "tags": ["a", None]} for i in range(4)]}


# --- legitimate: an identical copy is masked once and reused ---------------------------

@pytest.mark.parametrize("dumps", [
    lambda v: json.dumps(v), lambda v: json.dumps(v, separators=(",", ":")),
    lambda v: json.dumps(v, indent=2), lambda v: json.dumps(v, ensure_ascii=False),
    lambda v: json.dumps(v, indent=4, ensure_ascii=False)],
    ids=["default", "compact", "indent2", "unicode", "indent4-unicode"])
@pytest.mark.parametrize("sc", [ROWS, [ROWS, 3, "x@example.com"], {"ünï": "ü@example.com", "ssn": SSN}],
                         ids=["rows", "list-root", "non-ascii"])
def test_identical_copy_is_reused(walks, dumps, sc):
    text = dumps(sc)
    out, events = mask_message(STRICT, result(sc, text))
    assert walks[0] == 1, "the text was walked again instead of reusing structuredContent's masking"
    masked_sc = out["result"]["structuredContent"]
    assert text_of(out) == engine._dumps_like(masked_sc, text)
    assert json.loads(text_of(out)) == masked_sc
    # the same as masking the text alone: output and events
    alone, ev_alone = mask_message(STRICT, {"jsonrpc": "2.0", "id": 1, "result": {
        "content": [{"type": "text", "text": text}]}})
    assert text_of(out) == text_of(alone)
    sc_only, ev_sc = mask_message(STRICT, {"jsonrpc": "2.0", "id": 1, "result": {"structuredContent": sc}})
    assert sorted(events, key=repr) == sorted(ev_sc + ev_alone, key=repr)
    assert SSN not in json.dumps(out, ensure_ascii=False)


def test_identical_copy_with_nothing_to_mask_is_forwarded_as_is(walks):
    sc = {"ok": True, "n": [1, 2.5, None], "s": "plain words"}
    msg = result(sc, json.dumps(sc))
    out, events = mask_message(STRICT, msg)
    assert out is msg and events == [] and walks[0] == 1


def test_copy_in_another_layout_or_key_order_is_still_recognised(walks):
    """Not json.dumps's exact bytes, but a strict parse gives the same JSON value."""
    sc = {"b": "b@example.com", "a": 1, "ssn": SSN}
    for text in (json.dumps(sc) + "\n", '{"a": 1, "ssn": "123-45-6789", "b": "b@example.com"}',
                 '{"b": "b@example.com", "a": 1, "\\u0073sn": "123-45-6789"}'):
        walks[0] = 0
        out, _ = mask_message(STRICT, result(sc, text))
        assert walks[0] == 1
        assert SSN not in text_of(out) and "b@example.com" not in text_of(out)


# --- attacks: a text that is not exactly structuredContent is masked on its own ---------

def test_text_differing_in_one_field_is_masked_on_its_own(walks):
    text_doc = json.loads(json.dumps(ROWS))
    text_doc["rows"][2]["notes"] = "card 4111 1111 1111 1111, mail leak@example.org"
    text_doc["rows"][3]["nickname"] = SSN            # a field structuredContent does not have
    out, _ = mask_message(STRICT, result(ROWS, json.dumps(text_doc)))
    assert walks[0] == 2
    text = text_of(out)
    assert "4111 1111 1111 1111" not in text and "leak@example.org" not in text and SSN not in text
    assert json.loads(text)["rows"][2]["notes"] != out["result"]["structuredContent"]["rows"][2]["notes"]


@pytest.mark.parametrize("text", [
    '{"note": "123-45-6789", "note": "fine"}',                      # Python keeps the last, others the first
    '{"note": "fine", "note": "123-45-6789"}',
    '{"note": "fine", "n\\u006fte": "123-45-6789"}',               # a duplicate spelled with an escape
])
def test_duplicate_keys_never_pass_as_the_copy(walks, text):
    sc = {"note": "fine"}                                           # nothing to mask here
    out, _ = mask_message(STRICT, result(sc, text))
    assert SSN not in text_of(out)
    assert out["result"]["structuredContent"] == sc


def test_unicode_escapes_cannot_hide_a_value_from_the_text_masking(walks):
    sc = {"a": "x"}
    text = '{"a": "x", "b": "\\u0031\\u0032\\u0033-45-6789", "\\u0073sn": "078-05-1120"}'
    out, _ = mask_message(STRICT, result(sc, text))
    decoded = json.loads(text_of(out))
    assert decoded["b"] == "[MASKED:ssn]" and decoded["ssn"] == "[MASKED:ssn]"
    assert walks[0] == 2


@pytest.mark.parametrize("sc,text", [({"n": True, "ssn": SSN}, '{"n": 1, "ssn": "123-45-6789"}'),
                                     ({"n": 1, "ssn": SSN}, '{"n": 1.0, "ssn": "123-45-6789"}'),
                                     ({"n": 0, "ssn": SSN}, '{"n": false, "ssn": "123-45-6789"}')])
def test_equal_in_python_but_not_in_json_is_masked_on_its_own(walks, sc, text):
    """1 == 1.0 == True in Python; the text keeps its own value and is masked itself."""
    out, _ = mask_message(STRICT, result(sc, text))
    assert walks[0] == 2
    assert text_of(out) == text.replace(SSN, "[MASKED:ssn]")


def test_a_profile_without_detectors_still_masks_the_texts_own_fields(walks):
    prof = Profile("f", [Rule("ids", "redact", fields=("ssn",))], {}, KEY)
    sc = {"id": 1}
    out, _ = mask_message(prof, result(sc, json.dumps({"id": 1, "ssn": SSN})))
    assert SSN not in text_of(out) and walks[0] == 2


def test_capped_events_mask_the_text_on_its_own(monkeypatch, walks):
    """When structuredContent's event paths overflowed, its events cannot be replayed."""
    monkeypatch.setattr(engine, "MAX_EVENT_PATHS", 2)
    sc = {"a": {"ssn": SSN}, "b": {"ssn": SSN}, "c": {"ssn": SSN}}
    out, _ = mask_message(Profile("d", [Rule("ids", "redact", fields=("ssn",))], dict.fromkeys(DETECTORS, "redact"),
                                  KEY), result(sc, json.dumps(sc)))
    assert walks[0] == 2 and SSN not in text_of(out)


def test_serialises_proves_exact_text_only():
    v = {"a": [1, 2.5, True, None, "é"], "b": {"c": "d"}}
    assert engine._serialises(v, json.dumps(v))
    assert engine._serialises(v, json.dumps(v, indent=2))
    assert engine._serialises(v, json.dumps(v, separators=(",", ":")))
    assert engine._serialises(v, json.dumps(v, ensure_ascii=False))
    for other in (json.dumps(v) + " ", json.dumps({**v, "b": {"c": "e"}}), json.dumps(v).replace("2.5", "2.50"),
                  json.dumps(v).replace("true", "1"), json.dumps(v, sort_keys=True).replace('"a"', '"a" ')):
        assert not engine._serialises(v, other)
    assert not engine._serialises({"x": float("nan")}, '{"x": NaN}')
