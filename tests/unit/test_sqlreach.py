"""Issue 15: SQL judged by what it reaches (addons/core/sql/classify.py), sensitive columns masked
inside the SQL (addons/core/sql/mask.py), through the shipped rules/policy.yaml. Rewritten SQL is
run against a real DuckDB holding the demo's data: no raw sensitive value may come back,
and results computed from other columns must be unchanged."""
from __future__ import annotations

import json
import time
from pathlib import Path

import duckdb
import pytest

from addons.core.mcpwire import parse_message
from addons.core.policy.rules import evaluate, load_policy
from addons.core.record import Identity
from addons.core.sql.classify import MAX_SQL_CHARS, classify, function_data
from demo.data import api_keys, customers, ensure_db

ROOT = Path(__file__).resolve().parents[2]
POLICY = load_policy(ROOT / "rules")
ANALYST = Identity("ana", ("analyst",))
SECRETS = [c["ssn"] for c in customers()] + [c["email"] for c in customers()] + \
          [c["card_number"] for c in customers()] + [k["secret"] for k in api_keys()]


def _msg(sql: str):
    return parse_message({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                          "params": {"name": "query_sql", "arguments": {"sql": sql}}})


def decide(sql: str):
    return evaluate(POLICY, ANALYST, "demo", _msg(sql))


# (sql, classes, tables) -- attacks and legitimate analytics
TABLE = [
    # legitimate analytics
    ("SELECT count(*) FROM customers", {"read"}, {"customers"}),
    ("SELECT id, name FROM customers ORDER BY id LIMIT 3", {"read"}, {"customers"}),
    ("SELECT count(*) FROM customers WHERE notes LIKE '%vip=True%'", {"read"}, {"customers"}),
    ("SELECT substr(name, 1, 1) AS l, count(*) FROM customers GROUP BY ALL ORDER BY 1", {"read"}, {"customers"}),
    ("SELECT name, row_number() OVER (ORDER BY id DESC) FROM customers", {"read"}, {"customers"}),
    ("SELECT avg(id), max(id), median(id), string_agg(name, ',') FROM customers", {"read"}, {"customers"}),
    ("SELECT c.name, k.owner FROM customers c JOIN api_keys k ON k.id = c.id", {"read"}, {"customers", "api_keys"}),
    ("WITH v AS (SELECT id FROM customers WHERE id > 5) SELECT count(*) FROM v", {"read"}, {"customers"}),
    ("SELECT name FROM main.customers WHERE id IN (SELECT id FROM api_keys)", {"read"}, {"customers", "api_keys"}),
    ("SELECT name FROM memory.main.customers", {"read"}, {"customers"}),
    ('SELECT "Name" FROM "Customers"', {"read"}, {"customers"}),
    ("SELECT CASE WHEN id > 3 THEN 'a' END, id::VARCHAR, CAST(id AS DOUBLE) FROM customers", {"read"}, {"customers"}),
    ("SELECT lower(name), length(notes), regexp_replace(name, 'a', 'b') FROM customers", {"read"}, {"customers"}),
    ("SELECT date_trunc('month', now()), strftime(now(), '%Y'), current_date", {"read"}, set()),
    ("SELECT * FROM range(3)", {"read"}, set()),
    ("SELECT name FROM customers, LATERAL (SELECT id * 2 AS d) t WHERE t.d > 4", {"read"}, {"customers"}),
    ("SELECT name FROM customers ORDER BY (SELECT max(id) FROM api_keys)", {"read"}, {"customers", "api_keys"}),
    ("SELECT name /* comment */ FROM\tcustomers\n-- trailing", {"read"}, {"customers"}),
    ("SELECT quantile_cont(id, 0.5), count(DISTINCT name) FILTER (WHERE id > 2) FROM customers", {"read"}, {"customers"}),
    ("SELECT list_transform([1, 2], x -> x + 1)", {"read"}, set()),
    # files
    ("SELECT * FROM read_csv('/etc/passwd')", {"read", "files"}, set()),
    ("SELECT * FROM read_text('keys/issuer.pem')", {"read", "files"}, set()),
    ("SELECT content FROM read_blob('.secrets/upstream')", {"read", "files"}, set()),
    ("FROM '.secrets/token.csv'", {"read", "files"}, {".secrets/token.csv"}),
    ('SELECT * FROM "/etc/passwd"', {"read", "files"}, {"/etc/passwd"}),
    ("SELECT * FROM secrets.csv", {"read", "files"}, {"secrets.csv"}),
    ("SELECT * FROM keys.issuer.pem", {"read", "files"}, {"issuer.pem"}),
    ("SELECT * FROM glob('/home/*')", {"read", "files"}, set()),
    ("SELECT * FROM parquet_metadata('x.parquet')", {"read", "files"}, set()),
    ("WITH a AS (SELECT * FROM read_text('/etc/hostname')) SELECT * FROM a", {"read", "files"}, set()),
    # a non-recursive CTE's body does not see its own name (nor later CTEs): the real file / catalog
    ('WITH "/tmp/s.csv" AS (SELECT * FROM "/tmp/s.csv") SELECT * FROM "/tmp/s.csv"', {"read", "files"},
     {"/tmp/s.csv"}),
    ("WITH duckdb_settings AS (FROM duckdb_settings) SELECT * FROM duckdb_settings", {"read", "system"},
     {"duckdb_settings"}),
    ("WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a", {"read"}, {"b"}),
    ("WITH RECURSIVE r AS (SELECT 1 AS n UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT * FROM r",
     {"read"}, set()),
    ("SELECT name FROM customers WHERE name IN (SELECT content FROM read_text('/etc/passwd'))",
     {"read", "files"}, {"customers"}),
    ("COPY customers TO '/tmp/out.csv'", {"files"}, {"customers"}),
    ("ATTACH '/tmp/other.db' AS o", {"system", "files"}, set()),
    ("INSTALL httpfs", {"system", "files"}, set()),
    # system
    ("SELECT current_setting('threads')", {"read", "system"}, set()),
    ("SELECT * FROM duckdb_settings()", {"read", "system"}, set()),
    ("SELECT * FROM duckdb_secrets()", {"read", "system"}, set()),
    ("SELECT name, value FROM duckdb_settings", {"read", "system"}, {"duckdb_settings"}),
    ("SELECT getenv('HOME')", {"read", "system"}, set()),
    # a table function after LATERAL / OUTER APPLY is still the table function (reads the named table)
    ("SELECT * FROM LATERAL histogram('api_keys', secret)", {"read", "exec", "unknown"}, set()),
    ("SELECT * FROM customers OUTER APPLY histogram('customers', ssn)", {"read", "exec", "unknown"},
     {"customers"}),
    ("SELECT * FROM customers, LATERAL read_text(name)", {"read", "files"}, {"customers"}),
    ("SELECT * FROM customers CROSS JOIN LATERAL range(id) AS r(n)", {"read"}, {"customers"}),
    # index_key looks up an index of a table named in its first argument (the catalog)
    ("SELECT index_key({'table': 'customers'}, 'customers_pk', 1)", {"read", "system"}, set()),
    ("SELECT getvariable('x')", {"read", "system"}, set()),
    ("SELECT * FROM information_schema.tables", {"read", "system"}, {"information_schema.tables"}),
    ("SELECT * FROM pragma_table_info('customers')", {"read", "system"}, set()),
    ("SELECT version()", {"read", "system"}, set()),
    ("SELECT name FROM customers ORDER BY (SELECT current_setting('memory_limit'))", {"read", "system"},
     {"customers"}),
    ("PRAGMA database_list", {"system"}, set()),
    ("SET threads = 1", {"system"}, set()),
    ("SUMMARIZE customers", {"system"}, {"customers"}),
    ("DESCRIBE customers", {"system"}, {"customers"}),
    ("SHOW TABLES", {"system"}, set()),
    ("SELECT nextval('seq')", {"read", "system"}, set()),
    # exec: SQL in strings (analysed when literal)
    ("SELECT * FROM query('SELECT 1')", {"read", "exec"}, set()),
    ("SELECT * FROM query('SELECT * FROM read_text(''/etc/passwd'')')", {"read", "exec", "files"}, set()),
    ("SELECT * FROM query('SEL' || 'ECT current_setting(''x'')')", {"read", "exec", "unknown"}, set()),
    ("SELECT * FROM query_table('api_keys')", {"read", "exec", "unknown"}, set()),
    ("EXECUTE p", {"exec", "unknown"}, set()),
    ("PREPARE p AS SELECT 1", {"exec", "unknown"}, set()),
    # unknown / unparsable
    ("LOAD httpfs", {"system", "unknown"}, set()),
    ("CALL pragma_version()", {"system", "unknown"}, set()),
    ("EXPLAIN SELECT 1", {"unknown"}, set()),
    ("SELECT made_up_function(1)", {"read", "unknown"}, set()),
    ("SELECT COLUMNS('ss.*') FROM customers", {"read", "unknown"}, {"customers"}),
    ("PIVOT customers ON name USING count(*)", {"read", "unknown"}, {"customers"}),
    ("SELECT 1 INTO OUTFILE '/tmp/x'", {"unparsable"}, set()),
    # writes and schema changes
    ("DROP TABLE customers", {"ddl"}, {"customers"}),
    ("WITH d AS (DELETE FROM api_keys RETURNING *) SELECT * FROM d", {"read", "write"}, {"api_keys"}),
    ("SELECT 1; DROP TABLE customers", {"read", "ddl", "multiple"}, {"customers"}),
]


@pytest.mark.parametrize("sql,classes,tables", TABLE)
def test_statement_reaches(sql, classes, tables):
    info = classify(sql)
    assert set(info.classes) == classes, (sql, info.reasons)
    assert set(info.tables) == tables, sql
    if classes == {"read"}:
        assert not info.reasons


def test_table_is_big_enough_and_covers_every_class():
    assert len(TABLE) >= 60
    seen = set().union(*(c for _, c, _ in TABLE))
    assert {"read", "files", "system", "exec", "unknown", "unparsable", "write", "ddl", "multiple"} <= seen


def test_every_installed_duckdb_table_function_is_classified():
    data = function_data("duckdb")
    known = data.files | data.system | data.exec | data.read_tables | data.exec_tables
    con = duckdb.connect()
    names = {r[0].lower() for r in con.execute(
        "SELECT DISTINCT function_name FROM duckdb_functions() "
        "WHERE function_type IN ('table', 'table_macro', 'pragma')").fetchall()}
    assert names, "duckdb_functions() listed no table function"
    missing = sorted(names - known)
    assert not missing, f"classify these table functions in addons/core/sql/functions.yaml: {missing}"


def test_no_file_system_or_exec_function_is_in_the_pure_list():
    for dialect in ("duckdb", "postgres", "sqlite"):
        d = function_data(dialect)
        assert d.pure and not d.pure & (d.files | d.system | d.exec), dialect


@pytest.mark.parametrize("dialect,sql,cls", [
    ("postgres", "SELECT pg_read_file('/etc/passwd')", "files"),
    ("postgres", "SELECT * FROM pg_ls_dir('/')", "files"),
    ("postgres", "SELECT lo_import('/etc/passwd')", "files"),
    ("postgres", "COPY t FROM PROGRAM 'id'", "exec"),
    ("postgres", "SELECT * FROM dblink('host=x', 'select 1') AS t(a int)", "exec"),
    ("postgres", "SELECT current_setting('data_directory')", "system"),
    ("postgres", "SELECT set_config('x', 'y', false)", "system"),
    ("postgres", "SELECT * FROM pg_catalog.pg_settings", "system"),
    ("postgres", "SELECT name, count(*) FROM t GROUP BY name", "read"),
    ("sqlite", "SELECT load_extension('/tmp/x.so')", "files"),
    ("sqlite", "SELECT readfile('/etc/passwd')", "files"),
    ("sqlite", "SELECT writefile('/tmp/x', 'y')", "files"),
    ("sqlite", "SELECT fts3_tokenizer('simple')", "system"),
    ("sqlite", "SELECT * FROM sqlite_master", "system"),
    ("sqlite", "ATTACH DATABASE '/tmp/x.db' AS x", "files"),
    ("sqlite", "PRAGMA table_info(t)", "system"),
    ("sqlite", "SELECT name, count(*) FROM t GROUP BY name", "read"),
])
def test_other_dialects(dialect, sql, cls):
    info = classify(sql, dialect)
    assert cls in info.classes, (sql, info)
    if cls == "read":
        assert info.classes == {"read"}


def test_huge_or_deep_statements_are_refused_quickly():
    for sql in ("SELECT " + "(" * 5000 + "1" + ")" * 5000,
                "SELECT " + " + ".join(["1"] * 20000),
                "SELECT " + "lower(" * 400 + "'x'" + ")" * 400):
        t0 = time.monotonic()
        info = classify(sql + " ")
        assert time.monotonic() - t0 < 5
        assert info.kind == "unparsable", info.error
    assert classify("SELECT 1" + " " * MAX_SQL_CHARS).kind == "unparsable"


def test_forwarded_text_drops_comments():
    info = classify("SELECT name FROM customers -- */ , read_text('/etc/passwd') /*")
    assert info.classes == {"read"} and "read_text" not in (info.canonical or "")


# --- shipped analyst rule, rewrites run against a real DuckDB with the demo data -----------

@pytest.fixture(scope="module")
def demo_db(tmp_path_factory):
    db = ensure_db(tmp_path_factory.mktemp("demo-db"))
    con = duckdb.connect(str(db), read_only=True)
    yield con
    con.close()


def run(con, sql: str) -> str:
    return json.dumps(con.execute(sql).fetchall(), default=str)


LEAKS = [
    "SELECT ssn FROM customers",
    "SELECT reverse(ssn) FROM customers",
    "SELECT replace(ssn, '-', '') FROM customers",
    "SELECT ssn || 'x', 'x' || secret FROM customers, api_keys",
    "SELECT to_base64(ssn::BLOB), hex(secret) FROM customers, api_keys",
    "SELECT split_part(ssn, '-', 1), string_split(email, '@') FROM customers",
    "SELECT map([ssn], [1]) FROM customers",
    "SELECT {'k': \"SsN\"} FROM customers",
    "SELECT * FROM customers",
    "FROM api_keys",
    "SELECT c.* FROM customers c",
    "SELECT x FROM (SELECT ssn AS x FROM customers)",
    "WITH t AS (SELECT secret FROM api_keys) SELECT upper(secret) FROM t",
    "SELECT s.v FROM customers, LATERAL (SELECT card_number AS v) s",
    "SELECT string_agg(ssn, ',') FROM customers",
    "SELECT list(secret ORDER BY id) FROM api_keys",
    "SELECT * FROM (SELECT name, ssn FROM customers) PIVOT (count(*) FOR ssn IN ('108-11-1037'))",
    "SELECT count(*) FROM customers WHERE ssn = '107-11-1037'",
    "SELECT name FROM customers WHERE ssn LIKE '1%' ORDER BY ssn",
    "SELECT json_object('a', main.customers.ssn) FROM main.customers",
    "SELECT max(secret) FROM api_keys GROUP BY owner",
    "WITH customers AS (SELECT * FROM customers) SELECT * FROM customers",
    "WITH x AS (SELECT * FROM api_keys), api_keys AS (SELECT 1 AS z) SELECT * FROM x",
    "WITH a AS (SELECT 1), x AS (WITH customers AS (FROM customers) FROM customers) SELECT * FROM x",
]


@pytest.mark.parametrize("sql", LEAKS)
def test_sensitive_values_never_leave_the_database(demo_db, sql):
    d = decide(sql)
    assert d.action == "allow" and d.rewrites, d     # rewritten, not refused (refusals: below)
    out = run(demo_db, d.rewrites[0][1])
    for s in SECRETS:
        assert s not in out and s[::-1] not in out and s.replace("-", "") not in out, (sql, s)
    assert "sql columns masked" in d.reason


def test_predicates_are_no_oracle(demo_db):
    real = customers()[0]["ssn"]
    n = json.loads(run(demo_db, decide(f"SELECT count(*) FROM customers WHERE ssn = '{real}'").rewrites[0][1]))
    assert n == [[0]]


@pytest.mark.parametrize("sql,why", [
    ("SELECT c FROM customers c", "whole row"),
    ("SELECT to_json(customers) FROM customers", "whole row"),
    ("SELECT notes FROM api_keys AS notes", "whole row"),
    ("SELECT notes FROM customers, api_keys AS notes", "whole row"),
    ("SELECT * EXCLUDE (id) FROM customers", "*"),
    ("SELECT * FROM customers NATURAL JOIN api_keys", "NATURAL"),
    ("SELECT #4 FROM customers", "positional"),
    ("SELECT * FROM customers PIVOT (count(*) FOR name IN ('x'))", "PIVOT"),
    ("SELECT count(*) FROM customers JOIN api_keys USING (id, secret)", "USING"),
    ("SELECT * FROM orders", "orders"),
    ("SELECT * FROM (customers JOIN api_keys ON true)", "nested join"),
    ("SELECT * FROM (customers)", "parenthesised customers"),
    ("SELECT d FROM customers t(a, b, c, d)", "column alias list on customers"),
    ("SELECT ssn.reverse() FROM customers", "method-call syntax"),
    ("SELECT (ssn).reverse() FROM customers", "method-call syntax"),
    ("SELECT customers.ssn.upper() FROM customers", "method-call syntax"),
    ("SELECT c.to_json() FROM customers c", "method-call syntax"),
    ("SELECT k.secret.lower().upper() FROM api_keys k", "method-call syntax"),
    ("SELECT x.s FROM api_keys AS x(i, o, s)", "column alias list on api_keys"),
    ("SELECT c.id FROM api_keys k JOIN customers AS c(id, n, e) ON c.id = k.id", "column alias list on customers"),
    ("SELECT * ILIKE 'ss%' FROM customers", "*"),
    ("SELECT date_trunc(ssn, now()) FROM customers", "does not see a column"),
    ("SELECT EXTRACT(ssn FROM now()) FROM customers", "does not see a column"),
    ("SELECT * FROM read_text('/etc/passwd')", "read_text(): files"),
    ("SELECT current_setting('threads')", "current_setting(): system"),
    ("SELECT * FROM duckdb_secrets()", "duckdb_secrets(): system"),
    ("SELECT * FROM query('SELECT 1')", "query(): exec"),
    ("SELECT * FROM LATERAL histogram('api_keys', #3)", "histogram(): exec"),
])
def test_refusals_name_the_cause(sql, why):
    d = decide(sql)
    assert d.action == "deny" and why in d.reason, d


@pytest.mark.parametrize("sql", [
    "SELECT count(*) FROM customers",
    "SELECT id, name, notes FROM customers ORDER BY id",
    "SELECT substr(name, 1, 1) AS l, count(*) FROM customers GROUP BY ALL ORDER BY 1",
    "SELECT name, row_number() OVER (ORDER BY id DESC) AS r FROM customers ORDER BY r",
    "SELECT c.name, k.owner FROM customers c JOIN api_keys k ON k.id = c.id ORDER BY c.id",
    "SELECT count(*) FROM customers WHERE notes LIKE '%vip=True%'",
    "SELECT owner, length(owner) FROM api_keys ORDER BY id",
])
def test_legitimate_analytics_unchanged(demo_db, sql):
    d = decide(sql)
    assert (d.action, d.rule) == ("allow", "analyst-read-sql"), d
    assert run(demo_db, d.rewrites[0][1]) == run(demo_db, sql)


def test_select_star_keeps_other_columns(demo_db):
    d = decide("SELECT * FROM customers ORDER BY id")
    rows = demo_db.execute(d.rewrites[0][1]).fetchall()
    cols = [c[0] for c in demo_db.description]
    assert cols == ["id", "name", "email", "ssn", "card_number", "notes"]
    assert rows[0][0] == 1 and rows[0][1] == customers()[0]["name"] and rows[0][3] == "[MASKED:ssn]"
    assert d.reason.startswith("sql columns masked") and "original: SELECT * FROM customers" in d.reason


def test_explain_shows_tables_functions_classes_and_rewrites():
    from addons.core.policy.rules import explain
    out = "\n".join(explain(POLICY, ANALYST, "demo", _msg("SELECT reverse(ssn), count(*) FROM customers")))
    assert "classes read" in out and "tables: customers" in out and "functions: count, reverse" in out
    assert "forwarded sql: SELECT REVERSE(CAST('[MASKED:ssn]' AS TEXT)), COUNT(*) FROM customers" in out
    assert "sql columns masked: ssn" in out and "columns masked: ssn (redact)" in out
    out = "\n".join(explain(POLICY, ANALYST, "demo", _msg("SELECT * FROM api_keys")))
    assert "  columns masked: secret (redact)   * expanded over: api_keys" in out
    out = "\n".join(explain(POLICY, ANALYST, "demo", _msg("SELECT * FROM read_text('/etc/passwd')")))
    assert "reaches: read_text(): files" in out and "decision: DENY  rule: analyst-sql-read-only" in out
    assert "forwarded" not in out


def test_only_the_deciding_rules_sql_is_rewritten_and_dba_keeps_its_rules():
    dba = Identity("dora", ("dba",))
    d = evaluate(POLICY, dba, "demo", _msg("SELECT * FROM read_text('/etc/passwd')"))
    assert d.action == "deny"
    d = evaluate(POLICY, dba, "demo", _msg("CREATE TABLE t (a INT)"))
    assert d.action == "approve" and d.rewrites == (("sql", "CREATE TABLE t (a INT)"),)


# legitimate DuckDB analytics: `read`, and the SQL forwarded (sqlglot's regeneration)
# returns exactly what the caller's text returns
ANALYTICS = [
    'SELECT 7 // 2, 7 / 2, 7 % 3, 2 ** 3, 2 ^ 3',
    "SELECT name ILIKE '%a%', name SIMILAR TO 'A.*', name ~ 'A.*', regexp_matches(name, '^A') FROM customers ORDER BY id",
    "SELECT [1, 2, 3][2], [1, 2, 3][1:2], {'a': 1}.a, struct_pack(a := 1)",
    "SELECT date_diff('day', DATE '2024-01-01', DATE '2024-03-01'), DATE '2024-01-31' + INTERVAL 1 MONTH",
    "SELECT strftime(TIMESTAMP '2024-01-02 03:04:05', '%Y-%m-%d'), strptime('2024-01-02', '%Y-%m-%d')",
    "SELECT epoch(TIMESTAMP '2024-01-01'), make_date(2024, 1, 2), date_part('year', DATE '2024-05-01')",
    'SELECT name, lag(id) OVER w, lead(id) OVER w, first_value(id) OVER w FROM customers WINDOW w AS (ORDER BY id) ORDER BY id',
    'SELECT id, sum(id) OVER (ORDER BY id ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) FROM customers ORDER BY id',
    'SELECT name FROM customers QUALIFY row_number() OVER (ORDER BY id DESC) <= 3 ORDER BY name',
    'SELECT DISTINCT ON (substr(name, 1, 1)) name FROM customers ORDER BY substr(name, 1, 1), id',
    'SELECT count(*) FILTER (WHERE id > 5), count_if(id > 5), bool_or(id > 19) FROM customers',
    'SELECT arg_max(name, id), arg_min(name, id), max_by(name, id) FROM customers',
    "SELECT string_agg(name, ',' ORDER BY id DESC) FROM customers",
    'SELECT list(name ORDER BY id)[1:3] FROM customers',
    'SELECT approx_count_distinct(name), histogram(id % 3) FROM customers',
    "SELECT name, CASE WHEN id % 2 = 0 THEN 'even' ELSE 'odd' END AS p FROM customers ORDER BY id LIMIT 4",
    "SELECT TRY_CAST('x' AS INTEGER), CAST('5' AS INTEGER), '5'::INT + 1, 5::VARCHAR || 'a'",
    "SELECT coalesce(NULL, 'a'), ifnull(NULL, 2), nullif(1, 1), greatest(1, 3, 2), least(1, 3, 2)",
    "SELECT concat_ws('-', 'a', 'b'), format('{} {}', 'a', 'b'), printf('%d', 42), lpad('7', 3, '0')",
    "SELECT left(name, 2), right(name, 2), split_part(notes, ';', 1), string_split(name, ' ')[1] FROM customers ORDER BY id LIMIT 3",
    "SELECT name FROM customers WHERE id IN (1, 2, 3) AND name NOT LIKE 'Z%' AND notes IS NOT NULL ORDER BY id",
    'SELECT name FROM customers WHERE id BETWEEN 3 AND 5 ORDER BY id DESC',
    'SELECT name FROM customers WHERE EXISTS (SELECT 1 FROM api_keys k WHERE k.id = customers.id) ORDER BY id',
    'SELECT c.name, k.owner FROM customers c LEFT JOIN api_keys k ON k.id = c.id ORDER BY c.id LIMIT 5',
    'SELECT a.id, b.id FROM customers a JOIN customers b ON a.id = b.id - 1 ORDER BY a.id LIMIT 3',
    'SELECT * FROM customers c, LATERAL (SELECT c.id * 10 AS x) l ORDER BY c.id LIMIT 2',
    'WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT sum(n) FROM r',
    'SELECT id FROM customers UNION SELECT id FROM api_keys ORDER BY id',
    'SELECT id FROM customers EXCEPT SELECT id FROM api_keys ORDER BY id LIMIT 3',
    'SELECT id FROM customers INTERSECT SELECT id FROM api_keys ORDER BY id',
    'SELECT * FROM range(5) t(i) WHERE i % 2 = 0',
    'SELECT unnest([1, 2, 3]) AS u',
    'SELECT substr(name, 1, 1) AS l, count(*) FROM customers GROUP BY ALL ORDER BY ALL',
    'SELECT id FROM customers ORDER BY id DESC NULLS LAST LIMIT 2 OFFSET 1',
    'SELECT quantile_cont(id, [0.25, 0.5]), median(id), stddev(id), corr(id, id) FROM customers',
    'SELECT md5(name), sha256(name), hash(name) IS NOT NULL FROM customers ORDER BY id LIMIT 2',
    'SELECT json_extract(\'{"a": {"b": 1}}\', \'$.a.b\'), \'{"a": 1}\'::JSON->>\'a\', json_object(\'k\', 1)',
    "SELECT map(['a'], [1])['a'], map_keys(map(['a'], [1]))",
    "SELECT date_trunc('month', TIMESTAMP '2024-05-17 10:00'), last_day(DATE '2024-02-10'), dayname(DATE '2024-01-01')",
    "SELECT regexp_extract(notes, 'phone ([^;]+)', 1) FROM customers ORDER BY id LIMIT 2",
    "SELECT name FROM customers WHERE notes LIKE '%vip=True%' ESCAPE '!' ORDER BY id",
    "SELECT 'It''s', E'tab\\\\there', $$dollar's$$",
    'SELECT id, name FROM customers ORDER BY id LIMIT 3 -- trailing comment',
    'SELECT name FROM customers USING SAMPLE 100%',
    'SELECT id::DOUBLE / 3 AS third, round(id / 3, 2), floor(1.5), ceil(1.5) FROM customers ORDER BY id LIMIT 2',
    'SELECT list_transform([1, 2, 3], lambda x: x * 2), list_filter([1, 2, 3], lambda x: x > 1)',
]


@pytest.mark.parametrize("sql", ANALYTICS)
def test_forwarded_sql_returns_what_the_original_returns(demo_db, sql):
    info = classify(sql)
    assert info.classes == {"read"}, info.reasons
    assert run(demo_db, info.canonical) == run(demo_db, sql)


@pytest.mark.parametrize("sql_yaml,action,message", [
    ("{tables: [api_keys], any_class: [write]}", "deny: no", "a deny rule names tables with 'any_table'"),
    ("{sensitive_columns: masking}", "allow: true", "needs 'tables' with column lists"),
    ("{tables: {customers: [id]}, sensitive_columns: {ssn: scramble}}", "allow: true",
     "style must be one of redact, last4"),
    ("{tables: {customers: id}}", "allow: true", "give its columns as a list"),
    ("{sensitive_columns: 7}", "allow: true", "takes a list, a mapping"),
    ("{class: [reads]}", "allow: true", "unknown SQL class(es) reads"),
])
def test_sql_rule_errors_name_file_and_line(tmp_path, sql_yaml, action, message):
    from addons.core.rules import RulesError
    (tmp_path / "policy.yaml").write_text(
        f"rules:\n  - name: r\n    when:\n      tool: query_sql\n      sql: {sql_yaml}\n    {action}\n")
    with pytest.raises(RulesError) as e:
        load_policy(tmp_path)
    assert message in str(e.value) and "policy.yaml:5" in str(e.value), str(e.value)


def test_sensitive_columns_from_masking_yaml_follow_its_field_globs(tmp_path):
    (tmp_path / "masking.yaml").write_text(
        "version: 1\ndefault_profile: p\nprofiles:\n  p:\n    rules:\n"
        "      - {name: a, fields: [\"*secret*\", tax_id], style: redact}\n"
        "      - {name: b, fields: [name], style: keep}\n")
    (tmp_path / "policy.yaml").write_text(
        "rules:\n  - name: r\n    when:\n      tool: query_sql\n      sql:\n        class: [read]\n"
        "        tables: {t: [id, name, tax_id, client_secret]}\n        sensitive_columns: masking\n    allow: true\n")
    pol = load_policy(tmp_path)
    cols = pol.rules[0].sql.columns
    assert set(cols.sensitive) == {"tax_id", "client_secret"}
    # a column the rule does not declare but a glob matches (added to the table later) is masked too
    d = evaluate(pol, ANALYST, "demo", _msg("SELECT reverse(webhook_secret), name FROM t"))
    assert d.rewrites == (("sql", "SELECT REVERSE(CAST('[MASKED:webhook_secret]' AS TEXT)), name FROM t"),)


def test_sensitive_columns_from_masking_yaml_follow_its_name_regexes_and_paths(tmp_path):
    """What masking.yaml hides by a key-name regex or a JSONPath ending in a name is a
    sensitive column too (output masking would hide it; SQL transforms must not reveal it)."""
    (tmp_path / "masking.yaml").write_text(
        "version: 1\ndefault_profile: p\nprofiles:\n  p:\n    rules:\n"
        "      - {name: a, regex: [\"^pass(word|phrase)$\"], style: redact}\n"
        "      - {name: b, path: $..api_token, style: redact}\n"
        "      - {name: c, path: $.billing.iban, style: redact}\n")
    (tmp_path / "policy.yaml").write_text(
        "rules:\n  - name: r\n    when:\n      tool: query_sql\n      sql:\n        class: [read]\n"
        "        tables: {t: [id, password, api_token, iban, passwords]}\n        sensitive_columns: masking\n"
        "    allow: true\n")
    cols = load_policy(tmp_path).rules[0].sql.columns
    assert set(cols.sensitive) == {"password", "api_token", "iban"}
    d = evaluate(load_policy(tmp_path), ANALYST, "demo", _msg("SELECT reverse(PassPhrase), passwords FROM t"))
    assert d.rewrites == (("sql", "SELECT REVERSE(CAST('[MASKED:passphrase]' AS TEXT)), passwords FROM t"),)


def test_caller_sql_never_reaches_the_log(caplog):
    import logging
    with caplog.at_level(logging.DEBUG):
        classify("LOAD httpfs_secret_marker_42")
    assert "secret_marker_42" not in caplog.text


@pytest.mark.parametrize("dialect,sql,forwarded", [
    ("postgres", "SELECT reverse(ssn) FROM public.customers WHERE ssn = '1'",
     "SELECT REVERSE(CAST('[MASKED:ssn]' AS VARCHAR)) FROM public.customers WHERE CAST('[MASKED:ssn]' AS VARCHAR) = '1'"),
    ("postgres", "SELECT * FROM customers",
     "SELECT \"customers\".\"id\", CAST('[MASKED:ssn]' AS VARCHAR) AS \"ssn\" FROM customers"),
    ("sqlite", "SELECT upper(ssn) AS u FROM main.customers", "SELECT UPPER(CAST('[MASKED:ssn]' AS TEXT)) AS u FROM main.customers"),
])
def test_other_dialects_rewrite_sensitive_columns(tmp_path, dialect, sql, forwarded):
    (tmp_path / "policy.yaml").write_text(
        f"sql_dialect: {dialect}\nrules:\n  - name: r\n    when:\n      tool: query_sql\n      sql:\n"
        "        class: [read]\n        tables: {customers: [id, ssn]}\n        sensitive_columns: [ssn]\n"
        "    allow: true\n")
    d = evaluate(load_policy(tmp_path), ANALYST, "demo", _msg(sql))
    assert d.action == "allow" and d.rewrites == (("sql", forwarded),), d
    d = evaluate(load_policy(tmp_path), ANALYST, "demo", _msg("SELECT * FROM secrets"))
    assert d.action == "deny" and "secrets" in d.reason


def test_last4_style_keeps_only_the_last_four(tmp_path, demo_db):
    (tmp_path / "policy.yaml").write_text(
        "rules:\n  - name: r\n    when:\n      tool: query_sql\n      sql:\n        class: [read]\n"
        "        tables: {customers: [id, name, email, ssn, card_number, notes]}\n"
        "        sensitive_columns: {card_number: last4, ssn: redact}\n    allow: true\n")
    pol = load_policy(tmp_path)
    d = evaluate(pol, ANALYST, "demo", _msg("SELECT card_number, reverse(card_number) AS r FROM customers ORDER BY id"))
    rows = demo_db.execute(d.rewrites[0][1]).fetchall()
    card = customers()[0]["card_number"]
    assert rows[0] == ("***" + card[-4:], ("***" + card[-4:])[::-1])
    out = run(demo_db, d.rewrites[0][1])
    assert not any(c["card_number"] in out or c["card_number"][:-4] in out for c in customers())


HIDDEN = "current_setting('default_null_order')"      # returns a distinctive value: NULLS_LAST


@pytest.mark.parametrize("sql", [
    f"SELECT 1 --x\r, {HIDDEN}",
    f"SELECT 1 /* /* */ , {HIDDEN} /* */ */",
    f"SELECT 'a\\' , {HIDDEN} --'",
    f"SELECT E'a\\' , {HIDDEN.replace(chr(39), chr(39) * 2)} --'",
    f"SELECT $$a$$ , {HIDDEN} --$$",
    f"SELECT\u00a0{HIDDEN}",
    f"SELECT 1 -- \u2028, {HIDDEN}",
])
def test_what_is_forwarded_is_what_was_judged(demo_db, sql):
    """Where sqlglot and DuckDB might split a text differently, the gateway forwards
    sqlglot's regeneration: either the hidden call is seen (not read) or DuckDB does not run it."""
    assert "NULLS_LAST" in run(demo_db, f"SELECT {HIDDEN}")
    info = classify(sql)
    if info.classes == {"read"}:
        assert "NULLS_LAST" not in run(demo_db, info.canonical)
    else:
        assert "system" in info.classes or info.kind == "unparsable", info


CALLS = ["read_text('/etc/passwd')", "current_setting('threads')", "getenv('HOME')", "query('SELECT 1')",
         "duckdb_secrets()", "getvariable('v')", "nextval('s')", "made_up('x')", "\"READ_TEXT\"('/x')",
         "main.read_blob('/x')", "system.main.current_setting('threads')"]
POSITIONS = [
    "SELECT {f}", "SELECT id FROM customers WHERE id = ({f})", "WITH a AS (SELECT {f} AS x) SELECT * FROM a",
    "SELECT * FROM customers, LATERAL (SELECT {f} AS x) l", "SELECT id FROM customers ORDER BY (SELECT {f})",
    "SELECT list_transform([1], lambda x: {f})", "SELECT CASE WHEN id > 1 THEN {f} END FROM customers",
    "SELECT CAST({f} AS VARCHAR)", "SELECT ({f})::VARCHAR", "SELECT row_number() OVER (ORDER BY {f})",
    "SELECT 1 FROM customers c JOIN api_keys k ON k.owner = {f}", "SELECT count(*) FROM customers GROUP BY {f}",
    "SELECT count(*) FROM customers HAVING max(name) = {f}", "VALUES ({f})", "SELECT 1 UNION ALL SELECT {f}",
    "SELECT 1 WHERE 1 IN (SELECT {f})", "SELECT {{'k': {f}}}", "SELECT map([{f}], [1])",
    "SELECT coalesce(NULL, {f})", "SELECT 1 WHERE EXISTS (SELECT {f})", "sElEcT\t{f}\n-- c",
    "SELECT /* a */ {f} /* b */",
]


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("call", CALLS)
def test_a_reaching_call_is_never_read_wherever_it_stands(position, call):
    info = classify(position.format(f=call))
    assert info.classes - {"read"}, (position, call, info)


REFS = ["ssn", "SSN", '"SsN"', "c.ssn", 'c."SSN"']
COLUMN_POSITIONS = [
    "SELECT {r} FROM customers c", "SELECT reverse({r}) AS x FROM customers c",
    "SELECT id FROM customers c WHERE {r} LIKE '1%'", "SELECT name FROM customers c ORDER BY {r}",
    "SELECT min(name) AS n FROM customers c GROUP BY {r}", "SELECT k.owner FROM customers c JOIN api_keys k ON {r} <> k.owner",
    "WITH t AS (SELECT {r} AS v FROM customers c) SELECT upper(v) FROM t",
    "SELECT l.v FROM customers c, LATERAL (SELECT {r} AS v) l",
    "SELECT (SELECT max({r}) FROM customers c) AS m", "SELECT first_value(name) OVER (PARTITION BY {r}) FROM customers c",
    "SELECT {{'k': {r}}} AS s FROM customers c", "SELECT map([{r}], [1]) AS m FROM customers c",
    "SELECT [{r}, name] AS l FROM customers c", "SELECT string_agg({r}, '|') AS a FROM customers c",
    "SELECT to_json({{'x': {r}}}) AS j FROM customers c", "SELECT md5({r}) AS h FROM customers c",
    "SELECT CASE WHEN {r} > '5' THEN 'hi' ELSE 'lo' END AS b FROM customers c",
    "SELECT count(*) AS n FROM customers c WHERE substr({r}, 1, 3) = '107'",
]


@pytest.mark.parametrize("template", COLUMN_POSITIONS)
@pytest.mark.parametrize("ref", REFS)
def test_a_sensitive_column_is_masked_wherever_it_stands(demo_db, template, ref):
    sql = template.format(r=ref)
    d = decide(sql)
    assert d.action == "allow" and d.rewrites, (sql, d)
    out = run(demo_db, d.rewrites[0][1])
    ssns = [c["ssn"] for c in customers()]
    import hashlib
    assert not any(s in out or s[::-1] in out or hashlib.md5(s.encode()).hexdigest() in out for s in ssns), sql
    if "= '107'" in sql:
        assert out == "[[0]]"                      # no oracle: the database compared the mask
