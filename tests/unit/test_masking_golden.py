"""The masking engine's output, byte for byte, and its MaskEvents (paths, types, counts, in
order) for a fixed corpus: nested documents, arrays, JSON text (with and without a
structuredContent twin, in every json.dumps layout, and near-twins that differ), non-JSON
text, tables, errors, resources, prompts, SSE-style server messages, the bench's answers.
The expected values were recorded before issue 23's speed work (tests/unit/masking_corpus.py),
so a faster engine must mask exactly as the slower one did."""
from __future__ import annotations

import json

import pytest

from addons.core.masking.engine import mask_message, mask_value
from tests.unit.masking_corpus import GOLDEN, entry, messages, profiles

EXPECTED = json.loads(GOLDEN.read_text())
PROFILES = profiles()
MESSAGES = dict(messages())


def check(got: dict, want: dict) -> None:
    assert got["same"] == want["same"]
    assert got["events"] == want["events"]
    if "out_sha256" in want:
        assert got.get("out_sha256") == want["out_sha256"]
    else:
        assert got.get("out") == want.get("out")


@pytest.mark.parametrize("pname", sorted(PROFILES))
@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_message_masked_as_recorded(pname, name):
    msg = MESSAGES[name]
    before = json.dumps(msg)
    out, events = mask_message(PROFILES[pname], msg)
    assert json.dumps(msg) == before, "the input was mutated"
    check(entry(out, out is msg, events), EXPECTED[pname][name])


@pytest.mark.parametrize("pname", sorted(PROFILES))
def test_values_masked_as_recorded(pname):
    for name, value in (("value-args", {"password": "p", "env": {"A": "b"}, "q": "mail a@example.com"}),
                        ("value-text", "token ghp_" + "b" * 36)):
        out, events = mask_value(PROFILES[pname], value, "$.params.arguments")
        check(entry(out, out is value, events), EXPECTED[pname][name])


def test_corpus_covers_every_recorded_case():
    for pname, per in EXPECTED.items():
        assert pname in PROFILES
        assert set(per) == set(MESSAGES) | {"value-args", "value-text"}
