"""Masking addon: key file, profile selection per connection/tool/role and policy decision,
transform registration, fail closed, hot reload; and end to end through the lead's response
pipeline (JSON bodies and SSE streams, chunked at every boundary)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import stat

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow, tutils

from addons.core import mcpwire

from addons.hooks import responses
from addons.hooks.masking import Masking, MaskTransform, load_or_create_key
from addons.core.masking.engine import MaskError
from addons.core.record import Decision, Identity, MaskEvent, get_record

CUSTOMER = {"id": 1, "name": "Alice Martin", "email": "alice.martin@example.com", "ssn": "123-45-6789",
            "card_number": "4111 1111 1111 1111", "billing": {"plan": "pro", "api_token": "tok_opaque_8f3a9c"},
            "notes": "call +1 415 555 0100"}
SECRETS = ("alice.martin@example.com", "123-45-6789", "4111 1111 1111 1111", "tok_opaque_8f3a9c", "415 555 0100")


class RulesOption:
    """Stands in for the connections addon, which declares bastion_rules."""

    def load(self, loader):
        loader.add_option("bastion_rules", str, "rules", "rules dir")


@pytest.fixture
def rules_dir(tmp_path):
    d = tmp_path / "rules"
    d.mkdir()
    shutil.copy("rules/masking.yaml", d / "masking.yaml")
    return d


@pytest.fixture
def masking(rules_dir, tmp_path):
    m = Masking()
    with taddons.context(RulesOption(), m) as tctx:
        tctx.configure(m, bastion_rules=str(rules_dir), bastion_mask_key_file=str(tmp_path / "keys" / "mask-key"))
        yield m, tctx


def call_flow(tool: str = "get_customer", roles: tuple[str, ...] = ("analyst",), msg_id=1, batch=None):
    body = batch or {"jsonrpc": "2.0", "id": msg_id, "method": "tools/call",
                     "params": {"name": tool, "arguments": {"id": 1}}}
    f = tflow.tflow(req=tutils.treq(method=b"POST", path=b"/mcp/demo", content=json.dumps(body).encode(),
                                    headers=((b"content-type", b"application/json"),)))
    rec = get_record(f.metadata)
    rec.connection = "demo"
    rec.identity = Identity(sub="alice", roles=roles)
    parsed = mcpwire.parse_body(f.request.content)
    rec.messages, rec.batch = parsed.messages, parsed.batch
    rec.decisions = [Decision("allow", "r", message_id=m.id) for m in parsed.messages]
    return f, rec


def result_msg(msg_id=1, structured=None, text=None) -> dict:
    s = CUSTOMER if structured is None else structured
    return {"jsonrpc": "2.0", "id": msg_id,
            "result": {"content": [{"type": "text", "text": text if text is not None else json.dumps(s)}],
                       "structuredContent": s, "isError": False}}


def assert_no_secret(data: bytes | str):
    text = data.decode() if isinstance(data, bytes) else data
    for s in SECRETS:
        assert s not in text, s


# --- key ---------------------------------------------------------------------------------

def test_key_file_is_created_0600_and_reused(tmp_path):
    p = tmp_path / "sec" / "mask-key"
    k1 = load_or_create_key(p)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert stat.S_IMODE(p.parent.stat().st_mode) == 0o700
    assert len(k1) >= 32 and load_or_create_key(p) == k1


def test_short_key_is_refused(rules_dir, tmp_path):
    p = tmp_path / "k"
    p.write_text("short")
    m = Masking()
    with taddons.context(RulesOption(), m) as tctx:
        with pytest.raises(exceptions.OptionsError, match="shorter than 16"):
            tctx.configure(m, bastion_rules=str(rules_dir), bastion_mask_key_file=str(p))


def test_open_key_permissions_are_warned_about(tmp_path, caplog):
    p = tmp_path / "k"
    p.write_text("x" * 40)
    os.chmod(p, 0o644)
    with caplog.at_level(logging.WARNING, "bastion.masking"):
        load_or_create_key(p)
    assert "chmod 600" in caplog.text


def test_broken_rules_at_startup_are_an_option_error(rules_dir, tmp_path):
    (rules_dir / "masking.yaml").write_text("profiles:\n  p:\n    rules:\n      - fields: [a]\n        style: nope\n")
    m = Masking()
    with taddons.context(RulesOption(), m) as tctx:
        with pytest.raises(exceptions.OptionsError, match=r"masking.yaml:5"):
            tctx.configure(m, bastion_rules=str(rules_dir), bastion_mask_key_file=str(tmp_path / "k"))


# --- request hook ------------------------------------------------------------------------

async def test_request_registers_transform_and_requires_masking(masking):
    m, tctx = masking
    f, rec = call_flow()
    await tctx.cycle(m, f)
    assert rec.mask_required
    (t,) = [t for t in rec.response_transforms if isinstance(t, MaskTransform)]
    assert [p.name for p in t.default] == ["analyst"]


def test_refused_or_unrouted_flows_are_skipped(masking):
    m, _ = masking
    f, rec = call_flow()
    f.response = tutils.tresp()
    m.request(f)
    assert not rec.response_transforms and not rec.mask_required
    f2 = tflow.tflow()
    m.request(f2)
    assert not get_record(f2.metadata).response_transforms


def test_role_selects_profile(masking):
    m, _ = masking
    for roles, want in ((("analyst",), "analyst"), (("dev",), "strict"), ((), "strict"), (("auditor",), "auditor")):
        f, rec = call_flow(roles=roles)
        m.request(f)
        assert [p.name for p in rec.response_transforms[-1].default] == [want], roles


def test_policy_decision_names_the_profile(masking):
    m, _ = masking
    f, rec = call_flow(roles=("analyst",))
    rec.decisions[0].mask_profile = "strict"
    m.request(f)
    assert [p.name for p in rec.response_transforms[-1].default] == ["strict"]


def test_unknown_profile_from_policy_falls_back_to_default(masking, caplog):
    m, _ = masking
    f, rec = call_flow(roles=("analyst",))
    rec.decisions[0].mask_profile = "nope"
    with caplog.at_level(logging.WARNING, "bastion.masking"):
        m.request(f)
    assert [p.name for p in rec.response_transforms[-1].default] == ["strict"]
    assert "nope" in caplog.text


def test_batch_uses_each_requests_profile(masking, rules_dir):
    (rules_dir / "masking.yaml").write_text("""
default_profile: strict
profiles:
  strict: {rules: [{fields: [ssn, email]}], detectors: all}
  lenient: {rules: [{fields: [ssn]}]}
select:
  - {tool: list_people, profile: lenient}
""")
    m, tctx = masking
    tctx.configure(m, bastion_rules=str(rules_dir) + "/")
    batch = [{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "list_people"}},
             {"jsonrpc": "2.0", "id": "b", "method": "tools/call", "params": {"name": "get_customer"}}]
    f, rec = call_flow(batch=batch)
    m.request(f)
    t = rec.response_transforms[-1]
    one = t({"jsonrpc": "2.0", "id": 1, "result": {"structuredContent": {"ssn": "1", "email": "a@b.io"}}})
    two = t({"jsonrpc": "2.0", "id": "b", "result": {"structuredContent": {"ssn": "1", "email": "a@b.io"}}})
    assert one["result"]["structuredContent"] == {"ssn": "[MASKED:ssn]", "email": "a@b.io"}
    assert two["result"]["structuredContent"] == {"ssn": "[MASKED:ssn]", "email": "[MASKED:email]"}


def test_get_stream_gets_every_profile_the_caller_could_get(masking, rules_dir):
    (rules_dir / "masking.yaml").write_text("""
default_profile: strict
profiles:
  strict: {rules: [{fields: [ssn]}]}
  mail: {rules: [{fields: [email]}]}
select:
  - {tool: get_customer, profile: mail}
""")
    m, tctx = masking
    tctx.configure(m, bastion_rules=str(rules_dir) + "/")
    f = tflow.tflow(req=tutils.treq(method=b"GET", path=b"/mcp/demo", content=b""))
    rec = get_record(f.metadata)
    rec.connection = "demo"
    m.request(f)
    out = rec.response_transforms[-1]({"jsonrpc": "2.0", "id": 5, "result": {
        "structuredContent": {"ssn": "1", "email": "e"}}})
    assert out["result"]["structuredContent"] == {"ssn": "[MASKED:ssn]", "email": "[MASKED:email]"}


def test_pass_through_profile_registers_nothing(masking, rules_dir):
    (rules_dir / "masking.yaml").write_text("default_profile: open\nprofiles:\n  open: {detectors: off}\n")
    m, tctx = masking
    tctx.configure(m, bastion_rules=str(rules_dir) + "/")
    f, rec = call_flow()
    m.request(f)
    assert not rec.response_transforms and not rec.mask_required


# --- transform ---------------------------------------------------------------------------

def test_transform_records_events_and_readonly_flag(masking):
    m, _ = masking
    f, rec = call_flow()
    m.request(f)
    t = rec.response_transforms[-1]
    out = t(result_msg())
    assert t.readonly is False
    assert out["result"]["structuredContent"]["ssn"] == "[MASKED:ssn]"
    clean = {"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": "ok"}]}}
    assert t(clean) is clean and t.readonly is True
    t(result_msg())
    ssn = [e for e in rec.masks if e.path == "$.result.structuredContent.ssn"]
    assert ssn == [MaskEvent("$.result.structuredContent.ssn", "ssn", 2)]
    assert_no_secret(repr(rec.masks))


def test_record_masks_is_bounded():
    from addons.core.record import BastionRecord
    rec = BastionRecord()
    rec.add_masks([MaskEvent(f"$.p{i}", "t") for i in range(5000)])
    assert len(rec.masks) == 1024 and rec.masks_dropped == 5000 - 1024


def test_transform_fails_closed_on_deep_nesting(masking):
    m, _ = masking
    f, rec = call_flow()
    m.request(f)
    doc: dict = {"x": 1}
    for _ in range(70):
        doc = {"n": doc}
    with pytest.raises(MaskError):
        rec.response_transforms[-1](result_msg(structured=doc, text="ok"))


# --- through the response pipeline (addons/hooks/responses.py) ---------------------------------

def test_json_body_masked_through_pipeline(masking):
    m, _ = masking
    f, rec = call_flow()
    m.request(f)
    body = json.dumps(result_msg()).encode()
    new = responses.transform_json_body(rec, body)
    assert new is not None
    assert_no_secret(new)
    out = json.loads(new)
    assert out["result"]["structuredContent"]["email"] == "a***@example.com"
    assert out["result"]["structuredContent"]["card_number"] == "**** **** **** 1111"


def test_clean_json_body_is_not_reserialised(masking):
    m, _ = masking
    f, rec = call_flow()
    m.request(f)
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": "fine"}]}}).encode()
    assert responses.transform_json_body(rec, body) is None


def test_pipeline_replaces_unmaskable_body_with_error(masking):
    m, _ = masking
    f, rec = call_flow()
    m.request(f)
    doc: dict = {"x": 1}
    for _ in range(60):
        doc = {"n": doc}
    body = json.dumps(result_msg(structured={"a": doc}, text="ok")).encode()
    with pytest.raises(Exception):
        responses.transform_json_body(rec, body)


def sse(*msgs: dict) -> bytes:
    return b"".join(b"event: message\ndata: " + json.dumps(x).encode() + b"\n\n" for x in msgs)


def run_sse(rec, stream: bytes, cuts: list[int]) -> bytes:
    rw = responses.SSERewriter(rec, None, 1)
    out, prev = [], 0
    for c in sorted(set(cuts)) + [len(stream)]:
        out += rw(stream[prev:c])
        prev = c
    out += rw(b"")
    assert all(out)                 # an empty chunk would end a chunked body
    return b"".join(out)


def events_of(data: bytes) -> list[dict]:
    parser = mcpwire.SSEParser()
    evs = parser.feed(data, final=True)
    return [mcpwire.strict_loads(e.data) for e in evs if e.data]


def test_sse_stream_masked_event_by_event(masking):
    m, _ = masking
    f, rec = call_flow()
    m.request(f)
    progress = {"jsonrpc": "2.0", "method": "notifications/message",
                "params": {"level": "info", "data": "loaded ssn 123-45-6789"}}
    stream = sse(progress, result_msg())
    for cuts in ([], list(range(1, len(stream))), [len(stream) // 2]):
        out = run_sse(rec, stream, cuts)
        assert_no_secret(out)
        msgs = events_of(out)
        assert msgs[0]["params"]["data"] == "loaded ssn [MASKED:ssn]"
        assert msgs[1]["result"]["structuredContent"]["billing"]["api_token"] == "[MASKED:api_token]"


def test_unchanged_sse_event_is_forwarded_byte_for_byte(masking):
    m, _ = masking
    f, rec = call_flow()
    m.request(f)
    stream = b'event: message\r\nid: 7\r\ndata: {"jsonrpc": "2.0", "id": 1, "result": {"content": []}}\r\n\r\n'
    assert run_sse(rec, stream, [5, 40]) == stream


def test_sse_unmaskable_event_ends_stream_with_error(masking):
    m, _ = masking
    f, rec = call_flow()
    m.request(f)
    doc: dict = {"x": "123-45-6789"}
    for _ in range(70):
        doc = {"n": doc}
    stream = sse({"jsonrpc": "2.0", "id": 1, "result": {"structuredContent": doc}})
    out = run_sse(rec, stream, [])
    assert b"123-45-6789" not in out
    (err,) = events_of(out)
    assert err["error"]["code"] == mcpwire.INTERNAL_ERROR


# --- hot reload --------------------------------------------------------------------------

def test_hot_reload_and_broken_file_keeps_last_good(masking, rules_dir, caplog):
    m, _ = masking
    path = rules_dir / "masking.yaml"
    path.write_text("default_profile: p2\nprofiles:\n  p2: {rules: [{fields: [name]}]}\n")
    os.utime(path, ns=(1, 1))  # make the change visible regardless of mtime granularity
    assert m.check_reload()
    f, rec = call_flow()
    m.request(f)
    assert [p.name for p in rec.response_transforms[-1].default] == ["p2"]

    path.write_text("default_profile: p2\nprofiles:\n  p2:\n    rules:\n      - {fields: [x], style: bogus}\n")
    with caplog.at_level(logging.ERROR, "bastion.masking"):
        assert not m.check_reload()
    assert "masking.yaml:5" in caplog.text and "keeping the last good" in caplog.text
    f, rec = call_flow()
    m.request(f)
    assert [p.name for p in rec.response_transforms[-1].default] == ["p2"]


async def test_reload_task_runs_and_stops(masking):
    m, _ = masking
    m.running()
    task = m._watch._task
    assert task is not None and not task.done()
    m.done()
    assert m._watch._task is None


def test_chosen_profile_is_noted_on_the_decision_for_the_audit(masking):
    m, _ = masking
    f, rec = call_flow(roles=("analyst",))
    m.request(f)
    assert rec.decisions[0].mask_profile == "analyst"


# --- CLI ---------------------------------------------------------------------------------

def cli(argv: list[str]) -> int:
    import argparse

    from addons.cli import masking as masking_mod
    p = argparse.ArgumentParser()
    p.add_argument("--rules", default="rules")
    masking_mod.add_cli(p.add_subparsers())
    args = p.parse_args(argv)
    return args.func(args)


def test_cli_mask_preview(tmp_path, capsys):
    f = tmp_path / "resp.json"
    f.write_text(json.dumps(result_msg()))
    assert cli(["mask", "--roles", "analyst", "--tool", "get_customer", str(f)]) == 0
    out, err = capsys.readouterr()
    assert_no_secret(out)
    assert '"email": "a***@example.com"' in out
    assert "profiles: analyst" in err and "masked 1x ssn at $.result.structuredContent.ssn" in err


def test_cli_mask_check(tmp_path, capsys):
    assert cli(["--rules", "rules", "mask-check"]) == 0
    (tmp_path / "masking.yaml").write_text("profiles:\n  p: {detectors: [nope]}\n")
    assert cli(["--rules", str(tmp_path), "mask-check"]) == 1
    assert "masking.yaml:2" in capsys.readouterr().out


# --- bad response bodies through the pipeline's response hook -----------------------------

def respond(masking, content: bytes, headers: dict[str, str]):
    m, _ = masking
    f, rec = call_flow()
    m.request(f)
    f.response = tutils.tresp(content=b"", headers=tuple((k.encode(), v.encode()) for k, v in headers.items()))
    f.response.raw_content = content
    responses.ResponseRewriter().response(f)
    return f, rec


def test_invalid_utf8_body_is_replaced_not_passed(masking):
    bad = json.dumps(result_msg()).encode().replace(b"Alice", b"Al\xffice")
    f, rec = respond(masking, bad, {"content-type": "application/json"})
    assert_no_secret(f.response.content)
    assert json.loads(f.response.content)["error"]["code"] == mcpwire.INTERNAL_ERROR
    assert rec.refusal


def test_compressed_body_is_decoded_masked_and_reencoded(masking):
    import gzip
    body = gzip.compress(json.dumps(result_msg()).encode())
    f, rec = respond(masking, body, {"content-type": "application/json", "content-encoding": "gzip"})
    assert f.response.headers["content-encoding"] == "gzip"
    plain = f.response.get_content()
    assert_no_secret(plain)
    assert json.loads(plain)["result"]["structuredContent"]["ssn"] == "[MASKED:ssn]"


def test_unexpected_content_type_is_replaced_when_masking_required(masking):
    f, _ = respond(masking, json.dumps(CUSTOMER).encode(), {"content-type": "text/plain"})
    assert_no_secret(f.response.content)
    assert json.loads(f.response.content)["error"]["code"] == mcpwire.INTERNAL_ERROR


def test_new_key_file_changes_hashes(masking, tmp_path):
    m, tctx = masking
    f, rec = call_flow(roles=("dev",))
    m.request(f)
    h1 = rec.response_transforms[-1](result_msg())["result"]["structuredContent"]["email"]
    tctx.configure(m, bastion_mask_key_file=str(tmp_path / "other-key"))
    f, rec = call_flow(roles=("dev",))
    m.request(f)
    h2 = rec.response_transforms[-1](result_msg())["result"]["structuredContent"]["email"]
    assert h1.startswith("[HASH:") and h2.startswith("[HASH:") and h1 != h2


def test_sse_event_id_masked_with_the_request_profiles_and_dropped(masking):
    m, _ = masking
    f, rec = call_flow()
    m.request(f)
    assert rec.mask_text is not None and rec.mask_text("abc-1") == "abc-1"
    assert "123-45-6789" not in rec.mask_text("123-45-6789")
    stream = (b"id: 123-45-6789\n: 123-45-6789\n" + sse(result_msg())
              + b"id: resume-7\n" + sse(result_msg()))
    out = run_sse(rec, stream, list(range(1, len(stream))))
    assert b"123-45-6789" not in out
    evs = mcpwire.SSEParser().feed(out, final=True)
    assert [e.id for e in evs] == [None, "resume-7"]
