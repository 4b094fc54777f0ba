"""`mcp-bastion export --format jsonl|ocsf` over a real store."""
from __future__ import annotations

import json
import time

from addons import cli
from addons.core.audit.export import ocsf_event
from addons.core.audit.store import StoreWriter, encode_event

SID = "sess-1"


def make_store(root):
    w = StoreWriter(root, "gw-a").start()
    base = {"instance": "gw-a", "session_id": SID, "connection": "demo", "sub": "dan", "roles": ["dev"],
            "client_id": "ci", "client_addr": "10.0.0.7:5123"}
    t = time.time()
    evs = [
        {**base, "ts": t, "seq": 1, "kind": "request", "direction": "c2s", "method": "tools/call",
         "tool": "launch_container", "rpc_id": "2", "params": {"name": "launch_container",
                                                              "arguments": {"env": {"PW": "[MASKED:env]"}}}},
        {**base, "ts": t, "seq": 2, "kind": "decision", "direction": "gateway", "action": "deny",
         "rule": "no-privileged", "reason": "privileged containers are never allowed", "tool": "launch_container",
         "method": "tools/call"},
        {**base, "ts": t, "seq": 3, "kind": "refusal", "direction": "gateway", "status": 403, "reason": "denied"},
        {**base, "ts": t, "seq": 4, "kind": "mask", "direction": "gateway", "mask_type": "known-secret",
         "mask_path": "SSE event", "mask_count": 1},
        {**base, "ts": t, "seq": 5, "kind": "response", "direction": "s2c", "method": "resources/read",
         "result": {"contents": []}, "session_id": "other"},
    ]
    w.submit([encode_event(e) for e in evs], wait=True).result(10)
    w.close()


def test_export_ocsf_and_jsonl(tmp_path, capsys):
    make_store(tmp_path / "rec")
    out = tmp_path / "o.json"
    assert cli.main(["export", "--format", "ocsf", "-o", str(out), "--store", str(tmp_path / "rec")]) == 0
    evs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(evs) == 5 and all(e["class_uid"] == 6003 and e["category_uid"] == 6 for e in evs)
    req, dec, ref, mask, read = evs
    assert req["type_uid"] == 600399 and req["api"]["operation"] == "tools/call"
    assert req["actor"]["user"] == {"uid": "dan", "name": "dan", "groups": [{"name": "dev"}]}
    assert req["actor"]["app_name"] == "ci" and req["src_endpoint"] == {"ip": "10.0.0.7", "port": 5123}
    assert req["resources"] == [{"name": "launch_container", "type": "mcp_tool"}]
    assert req["unmapped"]["params"]["arguments"]["env"]["PW"] == "[MASKED:env]"
    assert dec["actor"]["authorizations"] == [{"decision": "deny", "policy": {
        "name": "no-privileged", "desc": "privileged containers are never allowed"}}]
    assert dec["status"] == "Failure" and dec["severity_id"] == 3
    assert ref["http_response"] == {"code": 403} and ref["status_id"] == 2
    assert mask["severity_id"] == 4
    assert read["activity_id"] == 2 and read["type_uid"] == 600302 and read["status_id"] == 1
    # one session only, JSON lines as stored, to stdout
    capsys.readouterr()
    assert cli.main(["export", SID[:6], "--format", "jsonl", "--store", str(tmp_path / "rec")]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["seq"] for x in lines] == [1, 2, 3, 4] and lines[0]["params"]["name"] == "launch_container"


def test_mitm_format_needs_session_and_output(tmp_path):
    make_store(tmp_path / "rec")
    assert cli.main(["export", "--store", str(tmp_path / "rec")]) == 2


def test_ocsf_minimal_row():
    ev = ocsf_event({"ts": 1.5, "kind": "http", "instance": "i", "seq": 3})
    assert ev["time"] == 1500 and ev["metadata"]["uid"] == "i:3" and ev["status"] == "Success"
