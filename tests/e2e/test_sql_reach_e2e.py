"""Issue 15 end to end: an analyst with the shipped rules/policy.yaml, a real gateway, the
official SDK client and the demo server's DuckDB. No byte of a file outside the tables, no
setting or secret, no raw value of a sensitive column through any transform, key, pivot or
predicate; legitimate analytics unchanged. The demo's received log proves what got through."""
from __future__ import annotations

import json
import subprocess

import pytest

from demo.client import connect
from demo.data import api_keys, customers
from tests.e2e.conftest import BIN

SENSITIVE = [c["ssn"] for c in customers()] + [c["email"] for c in customers()] + \
            [c["card_number"] for c in customers()] + [k["secret"] for k in api_keys()]


@pytest.fixture
def shipped(demo_server, rules_dir, gateway):
    demo = demo_server("json")
    return demo, gateway(rules_dir(demo))


async def refused(c, sql: str) -> str:
    with pytest.raises(Exception) as e:
        await c.call_tool("query_sql", {"sql": sql})
    return str(e.value)


def no_sensitive(text: str) -> None:
    for s in SENSITIVE:
        for form in (s, s[::-1], s.replace("-", ""), s.upper()):
            assert form not in text, s


async def test_files_settings_and_secrets_unreachable(shipped):
    demo, gw = shipped
    key = next(gw.key_dir.glob("*.pem"))            # the gateway's issuer key, readable by the demo process
    token_file = demo.token_file                    # the upstream's service credential
    attacks = [
        (f"SELECT * FROM read_text('{key}')", "read_text(): files"),
        (f"SELECT content FROM read_blob('{token_file}')", "read_blob(): files"),
        (f"SELECT * FROM read_csv('{token_file}', header=false)", "read_csv(): files"),
        (f"FROM '{token_file}'", "file scan"),
        (f"SELECT name FROM customers WHERE name IN (SELECT content FROM read_text('{key}'))", "files"),
        (f"WITH k AS (SELECT * FROM read_text('{key}')) SELECT count(*) FROM k", "files"),
        (f"SELECT * FROM glob('{gw.key_dir}/*')", "glob(): files"),
        ("SELECT current_setting('home_directory')", "current_setting(): system"),
        ("SELECT * FROM duckdb_settings()", "duckdb_settings(): system"),
        ("SELECT * FROM duckdb_secrets()", "duckdb_secrets(): system"),
        ("SELECT getenv('E2E_UPSTREAM_TOKEN')", "system"),
        ("SELECT * FROM information_schema.tables", "system"),
        ("SELECT * FROM query('SELECT * FROM read_text(''/etc/passwd'')')", "exec"),
        ("SELECT * FROM query('SEL' || 'ECT 1')", "exec"),
        (f"COPY customers TO '{gw.key_dir}/x.csv'", "files"),
        ("ATTACH ':memory:' AS m", "system"),
        ("SUMMARIZE customers", "system"),
    ]
    async with connect(gw.mcp_url(), gw.token("ana", ["analyst"])) as c:
        for sql, why in attacks:
            err = await refused(c, sql)
            assert "analyst-sql-read-only" in err and why in err, (sql, err)
    text = demo.received_bodies()
    assert str(key) not in text and str(token_file) not in text and "duckdb_" not in text
    assert "current_setting" not in text.lower() and "query(" not in text.lower()


async def test_sensitive_columns_masked_through_any_transform(shipped):
    demo, gw = shipped
    transforms = [
        "SELECT ssn, secret FROM customers, api_keys",
        "SELECT reverse(ssn) AS r, reverse(secret) FROM customers, api_keys",
        "SELECT replace(ssn, '-', ' ') AS a, to_base64(secret::BLOB) AS b FROM customers, api_keys",
        "SELECT split_part(email, '@', 1) || '#' || split_part(email, '@', 2) AS e FROM customers",
        "SELECT map([ssn], [id]) AS m, {'k': card_number} AS s FROM customers",
        "SELECT json_object(\"SsN\", 1) AS j FROM main.customers",
        "SELECT * FROM customers",
        "FROM api_keys",
        "SELECT c.* FROM demo.main.customers c",
        "SELECT x FROM (SELECT ssn AS x FROM customers) t",
        "WITH t AS (SELECT secret AS s FROM api_keys) SELECT upper(s) AS u FROM t",
        "SELECT v FROM customers, LATERAL (SELECT card_number AS v) l",
        "SELECT string_agg(ssn, ',') AS all_ssn FROM customers",
        "SELECT * FROM (SELECT id, ssn FROM customers) PIVOT (count(*) FOR ssn IN ('108-11-1037', '[MASKED:ssn]'))",
        "SELECT name FROM customers ORDER BY ssn",
    ]
    async with connect(gw.mcp_url(), gw.token("ana", ["analyst"])) as c:
        for sql in transforms:
            r = await c.call_tool("query_sql", {"sql": sql})
            assert not r.is_error, (sql, r)
            no_sensitive(json.dumps(r.structured_content))
        # a predicate on the raw value is no oracle: the database compares the masked value
        real = customers()[0]["ssn"]
        r = await c.call_tool("query_sql", {"sql": f"SELECT count(*) AS n FROM customers WHERE ssn = '{real}'"})
        assert r.structured_content["rows"] == [{"n": 0}]
        r = await c.call_tool("query_sql", {"sql": "SELECT count(*) AS n FROM customers WHERE ssn LIKE '1%'"})
        assert r.structured_content["rows"] == [{"n": 0}]
        # what cannot be rewritten is refused, naming the cause
        for sql, why in [("SELECT c FROM customers c", "whole row"), ("SELECT #4 FROM customers", "positional"),
                         ("SELECT * EXCLUDE (id) FROM customers", "*"),
                         ("SELECT * FROM customers NATURAL JOIN api_keys", "NATURAL"),
                         ("PIVOT customers ON name USING count(*)", "PIVOT"),
                         ("SELECT COLUMNS('ss.*') FROM customers", "columns()")]:
            err = await refused(c, sql)
            assert why in err, (sql, err)
    # the upstream received the rewritten SQL, never a bare reference to a sensitive column
    sent = [json.loads(r["body"]) for r in demo.received() if r["body"]]
    sqls = [b["params"]["arguments"]["sql"] for b in sent if isinstance(b, dict) and b.get("method") == "tools/call"]
    assert sqls and all("[MASKED:" in s or "count" in s.lower() for s in sqls)


async def test_legitimate_analytics_unchanged(shipped):
    demo, gw = shipped
    data = customers()
    async with connect(gw.mcp_url(), gw.token("ana", ["analyst"])) as c:
        async def rows(sql):
            r = await c.call_tool("query_sql", {"sql": sql})
            assert not r.is_error, (sql, r)
            return r.structured_content["rows"]
        assert await rows("SELECT count(*) AS n FROM customers") == [{"n": 20}]
        assert await rows("SELECT count(*) AS n FROM customers WHERE notes LIKE '%vip=True%'") == \
            [{"n": sum(1 for x in data if "vip=True" in x["notes"])}]
        got = await rows("SELECT id, name, row_number() OVER (ORDER BY id DESC) AS r FROM customers ORDER BY id LIMIT 2")
        assert got == [{"id": 1, "name": data[0]["name"], "r": 20}, {"id": 2, "name": data[1]["name"], "r": 19}]
        got = await rows("SELECT k.owner, c.name FROM customers c JOIN api_keys k ON k.id = c.id ORDER BY k.id")
        assert got == [{"owner": k["owner"], "name": data[k["id"] - 1]["name"]} for k in api_keys()]
        got = await rows("SELECT substr(name, 1, 1) AS initial, count(*) AS n FROM customers "
                         "GROUP BY ALL ORDER BY initial LIMIT 1")
        assert got == [{"initial": "A", "n": 1}]
        star = await rows("SELECT * FROM customers ORDER BY id LIMIT 1")
        assert star[0]["name"] == data[0]["name"] and star[0]["notes"] is not None
        assert list(star[0]) == ["id", "name", "email", "ssn", "card_number", "notes"]
        assert "[MASKED" in star[0]["ssn"]


async def test_audit_records_the_rewritten_sql_and_the_original(shipped):
    demo, gw = shipped
    async with connect(gw.mcp_url(), gw.token("ana", ["analyst"])) as c:
        await c.call_tool("query_sql", {"sql": "SELECT reverse(ssn) AS r FROM customers WHERE ssn = '999-99-9999'"})
    p = subprocess.run([str(BIN / "mcp-bastion"), "sql",
                        "SELECT d.reason, m.arguments::VARCHAR AS args FROM decisions d JOIN messages m "
                        "USING (flow_id) WHERE d.rule = 'analyst-read-sql'", "--format", "json",
                        "--store", str(gw.recordings)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout)
    assert rec, "no decision recorded"
    assert "sql columns masked: ssn" in rec[-1]["reason"] and "WHERE ssn = '?'" in rec[-1]["reason"]
    assert "[MASKED:ssn]" in rec[-1]["args"]
