"""addons/core/sql/classify.py: statement classes straight from the classifier (the rule-level
predicate is exercised in test_policy_engine.py)."""
from __future__ import annotations

import pytest

from addons.core.sql.classify import classify


@pytest.mark.parametrize("sql,kind", [
    # reads, including the word drop/delete where it is only data
    ("select name from customers where notes = 'drop table customers'", "read"),
    ("SELECT 'DELETE FROM x; DROP TABLE y' AS txt", "read"),
    ('SELECT "drop" FROM t', "read"),
    ("SELECT c.name, o.total FROM customers c JOIN orders o ON o.customer_id = c.id", "read"),
    ("SELECT 1 UNION SELECT 2", "read"),
    ("WITH a AS (SELECT 1 AS x), b AS (SELECT x FROM a) SELECT * FROM b", "read"),
    ("-- a comment with drop table t\nSELECT 1", "read"),
    # writes, also hidden in CTEs and subqueries
    ("INSERT INTO t SELECT * FROM s", "write"),
    ("WITH u AS (UPDATE t SET a = 1 RETURNING *) SELECT * FROM u", "write"),
    ("WITH i AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM i", "write"),
    ("/* looks harmless */ DELETE FROM customers", "write"),
    # schema changes, comments cannot hide them
    ("/* select */ DROP TABLE customers", "ddl"),
    ("-- select 1\nDROP TABLE customers", "ddl"),
    ("drop table customers", "ddl"),
    ("TRUNCATE TABLE customers", "ddl"),
    ("CREATE VIEW v AS SELECT 1", "ddl"),
    ("SELECT * INTO backup FROM customers", "ddl"),
    # permissions
    ("REVOKE SELECT ON t FROM bob", "dcl"),
    ("GRANT ALL ON customers TO PUBLIC", "dcl"),
])
def test_statement_kind(sql, kind):
    info = classify(sql)
    assert info.kind == kind, info
    assert info.statements == 1 and not info.multiple


@pytest.mark.parametrize("sql", ["SELECT 1; SELECT 2", "SELECT 1; DROP TABLE t", "select 1;/**/drop table t"])
def test_more_than_one_statement_is_multiple(sql):
    info = classify(sql)
    assert info.multiple and "multiple" in info.classes


def test_multiple_takes_the_most_severe_kind():
    assert classify("SELECT 1; GRANT SELECT ON t TO bob").kind == "dcl"
    assert classify("SELECT 1; DELETE FROM t").kind == "write"


@pytest.mark.parametrize("sql", ["", "   ", "-- only a comment", "SELECT FROM WHERE (", "DROP TABLE (", "'"])
def test_unparsable_or_empty(sql):
    info = classify(sql)
    assert info.kind == "unparsable" and info.classes == {"unparsable"}


@pytest.mark.parametrize("sql", ["ATTACH '/tmp/x.db' AS x", "INSTALL httpfs", "LOAD httpfs"])
def test_opaque_commands_are_never_read(sql):
    info = classify(sql)
    assert "read" not in info.classes and info.classes & {"system", "files", "unknown"}


@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/root/.ssh/id_rsa')",
    "SELECT * FROM glob('/home/*')",
])
def test_file_functions_are_files(sql):
    info = classify(sql, "duckdb")
    assert info.kind == "files" and "files" in info.classes


@pytest.mark.parametrize("sql", ["SELECT pg_read_file('/etc/shadow')", "SELECT LOAD_FILE('/etc/passwd')"])
def test_functions_of_other_databases_are_unknown_in_duckdb(sql):
    assert classify(sql, "duckdb").kind == "unknown"


def test_tables_and_functions_are_reported_lower_case():
    info = classify("SELECT COUNT(*) FROM Customers JOIN Orders ON Orders.cid = Customers.id")
    assert info.tables == {"customers", "orders"}
    assert "count" in info.functions


def test_dialect_is_honoured():
    # T-SQL's TOP is a read in tsql; duckdb cannot parse it the same way
    assert classify("SELECT TOP 5 * FROM t", "tsql").kind == "read"


def test_huge_nesting_is_unparsable_not_a_crash():
    sql = "SELECT " + "(" * 5000 + "1" + ")" * 5000
    assert classify(sql).kind in ("read", "unparsable")


@pytest.mark.parametrize("sql,kind", [
    ("COPY t TO PROGRAM 'sh'", "exec"),                # never a read; the blocklist names it too
    ("EXEC xp_cmdshell 'dir'", "unparsable"),
    ("SELECT 1 INTO OUTFILE '/tmp/x'", "unparsable"),
    ("EXPLAIN ANALYZE DELETE FROM t", "unknown"),        # EXPLAIN ANALYZE executes the statement
    ("SELECT * FROM (DELETE FROM t RETURNING *) x", "unparsable"),
    ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", "write"),
    ("SELECT 1 /* ; DROP TABLE t */", "read"),           # a comment is not a statement
    ("SHOW TABLES", "system"), ("DESCRIBE t", "system"), ("VALUES (1)", "read"),
])
def test_edge_statements(sql, kind):
    assert classify(sql).kind == kind
