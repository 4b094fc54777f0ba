"""Regenerate the DuckDB `pure` list of addons/core/sql/functions.yaml from the installed DuckDB.

Usage: .venv/bin/python scripts/sql_functions_gen.py > /tmp/pure.txt
Prints every scalar/aggregate/window/macro function of duckdb_functions() that the data
file does not already classify as files/system/exec, for a human to review before adding
it to `pure` (the unit test tests/unit/test_sqlclass.py fails on unclassified table functions).
"""
from __future__ import annotations

import duckdb

from addons.core.sql.classify import function_data

data = function_data("duckdb")
classified = set(data.files) | set(data.system) | set(data.exec) | set(data.pure)
con = duckdb.connect()
rows = con.execute("SELECT DISTINCT function_name FROM duckdb_functions() "
                   "WHERE function_type IN ('scalar', 'aggregate', 'window', 'macro') ORDER BY 1").fetchall()
for (name,) in rows:
    if name.replace("_", "a").isalnum() and not name.startswith(("collate_", "icu_collate_", "__")) \
            and name.lower() not in classified:
        print(name.lower())
