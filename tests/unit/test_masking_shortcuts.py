"""The masking engine's shortcuts give what the plain computation gives (hypothesis):
the Aho-Corasick needle pass finds every needle a substring search finds, the e-mail
search that starts at the '@' finds every e-mail a search from the start finds, the
already-masked pre-check never skips a value the regex matches, and per-message memos
leave output and events as masking each value afresh."""
from __future__ import annotations

import re

from hypothesis import given, settings, strategies as st

from addons.core.masking import engine
from addons.core.masking.engine import DETECTORS, Profile, Rule, mask_message, mask_value
from tests.fuzzing import examples

KEY = b"shortcut-test-key-0123456789abcdef"

# text built from needle fragments, e-mail parts and separators, so hits and near-misses abound
FRAGMENTS = list(engine._NEEDLE_LIST) + ["@", "a@b.io", "x.y+z@mail.example.org", " ", ",", ";", "-", ".",
                                         "_", "user", "AKIA", "ÄÖ", "ß", "İ", "\n", "'", '"', "[MASKED:x]", "*"]
texts = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=24).map("".join)


@settings(max_examples=examples(400), deadline=None)
@given(texts)
def test_needle_pass_finds_every_needle(text):
    low = text.lower()
    found = {engine._NEEDLE_LIST[i] for i, _, _ in engine._NEEDLE_AC.find_matches_as_indexes(low, overlapping=True)}
    assert found == {n for n in engine._NEEDLE_LIST if n in low}


EMAIL_ONLY = Profile("e", [], {"email": "redact"}, KEY)


def emails_from_start(text: str) -> str:
    """The e-mail detector run from position 0 of the text, every match masked."""
    rx, out, pos, last = engine._COMPILED["email"], [], 0, 0
    while (m := rx.search(text, pos)) is not None:
        out += [text[last:m.start()], "[MASKED:email]"]
        last = pos = max(m.end(), m.start() + 1)
    return "".join(out) + text[last:] if out else text


@settings(max_examples=examples(400), deadline=None)
@given(texts)
def test_email_search_from_the_at_sign_finds_every_email(text):
    out, _ = mask_value(EMAIL_ONLY, text)
    assert out == emails_from_start(text)


@settings(max_examples=examples(400), deadline=None)
@given(st.text(st.sampled_from(list("[]*\"'\nMASKEDHASH:0123456789abcdefx .-_")), max_size=24))
def test_already_masked_precheck_never_skips_a_match(value):
    if engine._ALREADY.match(value):
        assert value[:1] in engine._ALREADY_FIRST


PROFILE = Profile("p", [Rule("ids", "partial", fields=("card_number",)), Rule("h", "hash", fields=("email",))],
                  {d: "redact" for d in DETECTORS} | {"email": "hash"}, KEY)
value = st.sampled_from(["4111 1111 1111 1111", "a@example.com", "note b@example.com", "plain", "Ada L",
                         "ssn 123-45-6789", "123-45-6789", "", "[MASKED:ssn]"])


@settings(max_examples=examples(200), deadline=None)
@given(st.lists(st.fixed_dictionaries({"card_number": value, "email": value, "notes": value}), max_size=12))
def test_memos_change_nothing(rows):
    """Repeated values (memoised within a message) mask exactly as each row masked alone."""
    msg = {"jsonrpc": "2.0", "id": 1, "result": {"structuredContent": {"rows": rows}}}
    out, events = mask_message(PROFILE, msg)
    counts: dict[tuple[str, str], int] = {}
    for i, row in enumerate(rows):
        one, ev = mask_message(PROFILE, {"jsonrpc": "2.0", "id": 1, "result": {"structuredContent": {"rows": [row]}}})
        assert one["result"]["structuredContent"]["rows"][0] == out["result"]["structuredContent"]["rows"][i]
        for e in ev:
            counts[(e.path, e.type)] = counts.get((e.path, e.type), 0) + e.count
    assert {(e.path, e.type): e.count for e in events} == counts
    assert len(events) == len(counts)


def test_rows_of_one_array_share_one_event_path_per_field():
    rows = [{"id": i, "card_number": "4111 1111 1111 1111", "deep": [{"email": f"u{i}@example.com"}]}
            for i in range(300)]
    _, events = mask_message(PROFILE, {"jsonrpc": "2.0", "id": 1, "result": {"structuredContent": rows}})
    assert [(e.path, e.type, e.count) for e in events] == [
        ("$.result.structuredContent[*].card_number", "card_number", 300),
        ("$.result.structuredContent[*].deep[*].email", "email", 300)]
    assert re.fullmatch(r"\[HASH:[0-9a-f]{12}\]", mask_value(PROFILE, {"email": "x"})[0]["email"])
