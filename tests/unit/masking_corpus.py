"""A fixed corpus of JSON-RPC messages and masking profiles, and the masked output plus
MaskEvents the engine gave for each at commit 2a9a661 (before issue 23's speed work),
stored in tests/unit/data/masking_golden.json. test_masking_golden.py checks that the
engine still gives exactly that (bytes of the output, events in order).

    .venv/bin/python -m tests.unit.masking_corpus --write   # re-record (only on purpose)
"""
from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path
from typing import Any

from bench.upstream import big_result, customer_result
from addons.core.masking.engine import DETECTORS, Profile, Rule, load_masking, mask_message, mask_value

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent / "data" / "masking_golden.json"
KEY = b"golden-corpus-key-0123456789abcdef"


def profiles() -> dict[str, Profile]:
    cfg = load_masking(ROOT / "rules", KEY)
    out = {f"shipped.{n}": p for n, p in cfg.profiles.items()}
    out["builtin"] = Profile("builtin", [], {d: "redact" for d in DETECTORS}, KEY)
    # JSONPath automaton (exact, wildcard, index, slice), a filter (jsonpath-ng fallback),
    # a container rule, keep, regex keys, hash style
    out["paths"] = Profile("paths", [
        Rule("keep-public", "keep", fields=("public*",)),
        Rule("exact", "redact", paths=("$.billing.api_token", "$.rows[*].secret_note")),
        Rule("first", "hash", paths=("$.items[0].code", "$.items[-1:].code")),
        Rule("filter", "redact", paths=("$.people[?(@.kind == 'vip')].name",)),
        Rule("container", "redact", fields=("address",), type="addr"),
        Rule("rx", "partial", regex=("^acct_?(no|number)$",)),
        Rule("ids", "redact", fields=("ssn", "card_number")),
    ], {d: "redact" for d in DETECTORS} | {"email": "hash", "payment_card": "partial"}, KEY)
    out["fields-only"] = Profile("fields-only", [Rule("ids", "redact", fields=("ssn", "*token"))], {}, KEY)
    return out


def _customer(i: int, rnd: random.Random) -> dict:
    first = rnd.choice(["ada", "grace", "alan", "edsger"])
    return {"id": i, "name": f"{first.title()} X", "email": f"{first}{i}@example.com",
            "ssn": f"{rnd.randint(100, 899):03d}-{rnd.randint(10, 99):02d}-{rnd.randint(1000, 9999):04d}",
            "card_number": "4111 1111 1111 1111" if i % 2 else "5500 0000 0000 0004",
            "notes": f"backup {first}{i}@mail.example.org, phone +1 415 555 01{i % 100:02d}",
            "tags": ["vip" if i % 3 == 0 else "std", {"token": f"tok_{i}"}],
            "billing": {"api_token": f"sk_live_{i:024d}", "plan": "gold"}}


def _result(sc: Any = None, texts: tuple = (), mid: Any = 1) -> dict:
    res: dict = {"content": [{"type": "text", "text": t} for t in texts]}
    if sc is not None:
        res["structuredContent"] = sc
    return {"jsonrpc": "2.0", "id": mid, "result": res}


def messages() -> list[tuple[str, dict]]:
    rnd = random.Random(23)
    rows = [_customer(i, rnd) for i in range(1, 13)]
    table = {"columns": list(rows[0]), "rows": rows, "row_count": len(rows)}
    nested = {"a": {"b": [{"c": {"ssn": "123-45-6789", "deep": [[{"email": "d@example.com"}]]}}]},
              "address": {"street": "1 Main St", "zip": 12345, "geo": [1.5, None, True]},
              "public_email": "pub@example.com", "acct_no": "DE89370400440532013000",
              "items": [{"code": "A1"}, {"code": "B2"}, {"code": "C3"}],
              "people": [{"kind": "vip", "name": "Vera"}, {"kind": "std", "name": "Sam"}],
              "rows": [{"secret_note": "x1"}, {"secret_note": 7}],
              "weird key!": "mail w@example.com", "ünï": "ü@example.com 4111111111111111",
              "": "", "n": 0, "f": 1.25, "neg": -3, "big": 10 ** 20}
    out: list[tuple[str, dict]] = []
    add = lambda name, msg: out.append((name, msg))  # noqa: E731
    # structuredContent with its JSON text twin, in every layout json.dumps writes
    add("twin-default", _result(table, (json.dumps(table),)))
    add("twin-compact", _result(table, (json.dumps(table, separators=(",", ":")),)))
    add("twin-indent2", _result(table, (json.dumps(table, indent=2),)))
    add("twin-indent4", _result(nested, (json.dumps(nested, indent=4),)))
    add("twin-ascii", _result(nested, (json.dumps(nested),)))
    add("twin-unicode", _result(nested, (json.dumps(nested, ensure_ascii=False),)))
    add("twin-nested", _result(nested, (json.dumps(nested),)))
    # texts that look like the twin but are not it
    diff = json.loads(json.dumps(table))
    diff["rows"][5]["notes"] = "other 999-11-2222 x@y.example.com"
    add("twin-one-field-differs", _result(table, (json.dumps(diff),)))
    add("twin-key-order", _result({"b": "b@example.com", "a": 1}, ('{"a": 1, "b": "b@example.com"}',)))
    add("twin-int-vs-float", _result({"n": 1, "ssn": "123-45-6789"}, ('{"n": 1.0, "ssn": "123-45-6789"}',)))
    add("twin-true-vs-1", _result({"n": True, "ssn": "x"}, ('{"n": 1, "ssn": "x"}',)))
    add("twin-duplicate-key", _result({"ssn": "x", "note": "fine"},
                                      ('{"ssn": "123-45-6789", "ssn": "x", "note": "fine"}',)))
    add("twin-unicode-escape", _result({"ssn": "123-45-6789"}, ('{"\\u0073sn": "123-45-6789"}',)))
    add("twin-escape-value", _result({"note": "fine"}, ('{"note": "f\\u0069ne"}',)))
    add("twin-nothing-to-mask", _result({"ok": True, "n": [1, 2]}, (json.dumps({"ok": True, "n": [1, 2]}),)))
    add("twin-two-texts", _result(table, (json.dumps(table), "see 123-45-6789")))
    add("twin-list-root", _result([1, {"ssn": "123-45-6789"}], (json.dumps([1, {"ssn": "123-45-6789"}]),)))
    add("twin-scalar-sc", _result("alice@example.com", (json.dumps("alice@example.com"),)))
    add("twin-trailing-space", _result({"ssn": "1"}, (json.dumps({"ssn": "1"}) + " ",)))
    # JSON text alone, non-JSON text, tables
    add("json-text-rows", _result(None, (json.dumps(rows[:7]),)))
    add("json-text-not-strict", _result(None, ('{"ssn": "123-45-6789", "ssn": "x"} mail a@example.com',)))
    add("json-text-nan", _result(None, ("[1, NaN, \"123-45-6789\"]",)))
    add("prose", _result(None, ("Contact alice@example.com or +1 415 555 0100; card 4111 1111 1111 1111, "
                                "ssn 078-05-1120, password=hunter22, token ghp_" + "a" * 36 + " end",)))
    add("prose-kv", _result(None, ("ssn: 123-45-6789\napi_token = abcdef123\nemail: 'q@example.com'",)))
    add("csv", _result(None, ("id,name,ssn,email,notes\n1,A,123-45-6789,a@example.com,mail b@example.com\n"
                              "2,B,078-05-1120,\"c@example.com\",none\n",)))
    add("markdown", _result(None, ("| id | card_number | note |\n|---|---|---|\n| 1 | 4111111111111111 | ok |\n",)))
    add("already-masked", _result({"ssn": "[MASKED:ssn]", "e": "[HASH:0123456789ab]"},
                                  ("ssn: [MASKED:ssn] and ***",)))
    # other places of a message
    add("error", {"jsonrpc": "2.0", "id": 2, "error": {"code": -32000, "message": "failed for a@example.com",
                                                         "data": {"ssn": "123-45-6789", "rows": rows[:3]}}})
    add("error-str-data", {"jsonrpc": "2.0", "id": 2, "error": {"code": 1, "message": "m",
                                                                  "data": '{"ssn": "123-45-6789"}'}})
    add("resource", {"jsonrpc": "2.0", "id": 3, "result": {"contents": [
        {"uri": "db://c/1", "mimeType": "application/json", "text": json.dumps(rows[0])},
        {"uri": "db://c/2", "blob": "AAAA"}]}})
    add("embedded-resource", _result(None) | {"result": {"content": [
        {"type": "resource", "resource": {"uri": "x:/", "text": "mail e@example.com"}},
        {"type": "image", "data": "AAAA", "mimeType": "image/png"}]}})
    add("prompt", {"jsonrpc": "2.0", "id": 4, "result": {"messages": [
        {"role": "user", "content": {"type": "text", "text": "my ssn is 123-45-6789"}},
        {"role": "assistant", "content": [{"type": "text", "text": json.dumps({"email": "p@example.com"})}]}]}})
    add("sampling-result", {"jsonrpc": "2.0", "id": 5, "result": {"role": "assistant",
                                                                  "content": {"type": "text", "text": "4111111111111111"}}})
    # SSE-style server messages: notifications and server requests
    add("sse-progress", {"jsonrpc": "2.0", "method": "notifications/progress",
                         "params": {"progressToken": 1, "progress": 3, "total": 9,
                                    "message": "section 3: owner grace.hopper3@example.com"}})
    add("sse-log", {"jsonrpc": "2.0", "method": "notifications/message",
                    "params": {"level": "info", "logger": "db", "data": {"row": rows[2], "msg": "ssn 123-45-6789"}}})
    add("sse-sampling", {"jsonrpc": "2.0", "id": "s1", "method": "sampling/createMessage", "params": {
        "messages": [{"role": "user", "content": {"type": "text", "text": "email z@example.com"}}],
        "maxTokens": 5, "_meta": {"email": "m@example.com"}}})
    add("sse-elicit", {"jsonrpc": "2.0", "id": "e1", "method": "elicitation/create", "params": {
        "message": "confirm card 4111111111111111", "requestedSchema": {"type": "object"}}})
    add("clean", _result({"ok": True}, ("all good",)))
    # the bench's two masked answers (bench/upstream.py)
    add("bench-masked", {"jsonrpc": "2.0", "id": 1, "result": big_result(256 * 1024)})
    add("bench-small", {"jsonrpc": "2.0", "id": 1, "result": customer_result()})
    add("protocol-fields", {"jsonrpc": "2.0", "id": "a@example.com", "result": {"_meta": {"x": "y@example.com"},
                                                                                 "content": []}})
    return out


def entry(out: Any, same: bool, events: list) -> dict:
    """The masked output as serialised (absent when the input came back as it was; its
    sha256 when long, to keep the file small), the events."""
    got: dict = {"same": same, "events": [[e.path, e.type, e.count] for e in events]}
    if not same:
        text = json.dumps(out, ensure_ascii=False)
        if len(text) > 1500:
            got["out_sha256"] = hashlib.sha256(text.encode()).hexdigest()
        else:
            got["out"] = text
    return got


def record() -> dict:
    """{profile: {message name: {"out": serialised output, "same": unchanged?, "events": [...]}}}."""
    profs = profiles()
    result: dict = {}
    for pname, prof in profs.items():
        per: dict = {}
        for name, msg in messages():
            before = json.dumps(msg)
            out, events = mask_message(prof, msg)
            assert json.dumps(msg) == before, "input mutated"
            per[name] = entry(out, out is msg, events)
        for name, value in (("value-args", {"password": "p", "env": {"A": "b"}, "q": "mail a@example.com"}),
                            ("value-text", "token ghp_" + "b" * 36)):
            out, events = mask_value(prof, value, "$.params.arguments")
            per[name] = entry(out, out is value, events)
        result[pname] = per
    return result


if __name__ == "__main__":
    if "--write" not in sys.argv:
        sys.exit("usage: python -m tests.unit.masking_corpus --write")
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(record(), indent=0, ensure_ascii=False, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
