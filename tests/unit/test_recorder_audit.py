"""The ten docs/audit.md queries run, as written, against a store the recorder generates."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from mitmproxy.test import taddons

from addons.core import mcpwire
from addons.core.record import Decision, MaskEvent
from addons.hooks.recorder import Recorder
from addons.core.audit.store import Store
from tests.unit.test_recorder import call, mcp_flow, run, tresp

DOC = Path(__file__).resolve().parents[2] / "docs" / "audit.md"


def doc_queries() -> list[tuple[str, str]]:
    text = DOC.read_text()
    out = []
    for m in re.finditer(r"^### (\d+)\. (.+?)\n\n```sql\n(.*?)```", text, re.S | re.M):
        out.append((m.group(2), m.group(3)))
    return out


async def generate(root: Path) -> None:
    """Two instances; alice/bob/carol; allowed, denied, approved, masked, upstream error."""
    for instance in ("gw-a", "gw-b"):
        r = Recorder()
        with taddons.context(r) as tctx:
            tctx.configure(r, bastion_recordings=str(root), bastion_instance=instance)
            sess = f"sess-{instance}"
            # allowed + masked lookup of customer 42 by alice
            f, rec = mcp_flow(call(1, "lookup_customer", {"customer_id": 42}), session=sess, sub="alice")
            rec.decisions.append(Decision("allow", rule="support-read", mask_profile="pii", message_id=1))
            rec.masks += [MaskEvent("$..email", "email", 3), MaskEvent("$..iban", "iban", 1)]
            await run(r, f, rec, resp={"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": "[email]"}]}})
            # denied DDL by bob
            f, rec = mcp_flow(call(2, "run_sql", {"sql": "DROP TABLE users"}), session=sess, sub="bob")
            rec.decisions.append(Decision("deny", rule="no-ddl", reason="DDL is not allowed", message_id=2))
            rec.refuse("DDL is not allowed", "no-ddl")
            f.response = tresp(status_code=200, content=json.dumps(mcpwire.jsonrpc_error(2, -32001, "denied by no-ddl")).encode(),
                               headers=((b"content-type", b"application/json"),))
            await run(r, f, rec)
            # approved payment by carol, approver dave
            f, rec = mcp_flow(call(3, "send_payment", {"amount": 100}), session=sess, sub="carol")
            rec.decisions.append(Decision("approve", rule="payments", approvers=("finance",), message_id=3))
            rec.approval = {"outcome": "approved", "approver": "dave", "waited": 12.0}
            await run(r, f, rec, resp={"jsonrpc": "2.0", "id": 3, "result": {"content": []}})
            # upstream error
            f, rec = mcp_flow(call(4, "lookup_customer", {"customer_id": 7}), session=sess, sub="alice")
            rec.decisions.append(Decision("allow", rule="support-read", message_id=4))
            await run(r, f, rec, resp={"jsonrpc": "2.0", "id": 4, "error": {"code": -32000, "message": "db down"}})
            r.done()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    import asyncio
    root = tmp_path_factory.mktemp("audit")
    asyncio.run(generate(root))
    s = Store(root)
    yield s
    s.close()


def rows(store, sql):
    cur = store.query(sql)
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def test_doc_has_ten_queries():
    assert len(doc_queries()) == 10


@pytest.mark.parametrize("idx", range(10))
def test_doc_query_runs_and_returns_rows(store, idx):
    title, sql = doc_queries()[idx]
    got = rows(store, sql)
    assert got, f"query {idx + 1} ({title}) returned nothing"


def test_doc_query_results(store):
    q = {i + 1: sql for i, (_, sql) in enumerate(doc_queries())}
    who = rows(store, q[1])
    assert {(r["sub"], r["tool"], r["calls"]) for r in who} == {
        ("alice", "lookup_customer", 4), ("bob", "run_sql", 2), ("carol", "send_payment", 2)}
    refusals = rows(store, q[2])
    assert refusals[0]["rule"] == "no-ddl" and refusals[0]["refusals"] == 2 and refusals[0]["identities"] == 1
    appr = rows(store, q[3])
    assert appr == [{"approver": "dave", "outcome": "approved", "holds": 2, "avg_wait_s": 12.0, "tools": "send_payment"}]
    timeline = rows(store, q[4])
    assert timeline[0]["kind"] == "request" and {"decision", "refusal", "approval", "mask", "http"} <= {
        r["kind"] for r in timeline}
    masks = rows(store, q[5])
    assert (masks[0]["path"], masks[0]["values_masked"], masks[0]["sessions"]) == ("$..email", 6, 2)
    denied = rows(store, q[6])
    assert len(denied) == 2 and json.loads(denied[0]["arguments"]) == {"sql": "DROP TABLE users"}
    lat = rows(store, q[7])
    assert {r["tool"] for r in lat} == {"lookup_customer", "run_sql", "send_payment"}
    assert all(r["p95_ms"] is not None for r in lat)
    act = rows(store, q[8])
    assert sum(r["requests"] for r in act) == 8 and sum(r["refusals"] for r in act) == 2
    errs = rows(store, q[9])
    assert errs == [{"connection": "demo", "tool": "lookup_customer", "error_code": -32000, "message": "db down", "n": 2}]
    who42 = rows(store, q[10])
    assert [r["sub"] for r in who42] == ["alice", "alice"]
