"""SQL statement classification with sqlglot (pure).

Classes, from least to most dangerous: read < write < ddl < dcl, plus `unknown` for
statements sqlglot only keeps as an opaque command (ATTACH, INSTALL, LOAD, SET, CALL …),
`multiple` when more than one statement is sent, `unparsable` when it cannot be parsed.
A statement is classified by every node in its tree, so a SELECT wrapping a data-modifying
CTE counts as a write.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

READ, WRITE, DDL, DCL, UNKNOWN = "read", "write", "ddl", "dcl", "unknown"
MULTIPLE, UNPARSABLE = "multiple", "unparsable"
SEVERITY = {READ: 0, WRITE: 1, DDL: 2, DCL: 3, UNKNOWN: 4, UNPARSABLE: 5}

_WRITE = tuple(getattr(exp, n) for n in ("Insert", "Update", "Delete", "Merge", "Copy") if hasattr(exp, n))
_DDL = tuple(getattr(exp, n) for n in ("Create", "Drop", "Alter", "TruncateTable", "Comment", "RenameTable")
             if hasattr(exp, n))
_DCL = tuple(getattr(exp, n) for n in ("Grant", "Revoke") if hasattr(exp, n))
_READ_ROOTS = tuple(getattr(exp, n) for n in ("Select", "Union", "Intersect", "Except", "Describe", "Show",
                                              "Values", "Subquery") if hasattr(exp, n))
# Functions that read or write files / run programs from inside SQL.
FILE_FUNCTIONS = frozenset({
    "read_csv", "read_csv_auto", "read_json", "read_json_auto", "read_parquet", "read_text", "read_blob",
    "pg_read_file", "pg_read_binary_file", "pg_ls_dir", "lo_import", "lo_export", "load_file",
    "xp_cmdshell", "sys_exec", "sys_eval", "glob", "sniff_csv",
})


@dataclass(frozen=True)
class SqlInfo:
    kind: str                                 # read/write/ddl/dcl/unknown/unparsable (most severe)
    classes: frozenset[str] = field(default_factory=frozenset)   # every class seen, + "multiple"
    tables: frozenset[str] = field(default_factory=frozenset)    # lower-case table names touched
    functions: frozenset[str] = field(default_factory=frozenset) # lower-case function names called
    statements: int = 0
    error: str | None = None

    @property
    def multiple(self) -> bool:
        return self.statements > 1


def _classify_tree(tree: exp.Expression) -> str:
    cls = READ if isinstance(tree, _READ_ROOTS) else UNKNOWN
    for node in tree.walk():
        if isinstance(node, _DCL):
            return DCL
        if isinstance(node, _DDL):
            cls = DDL
        elif isinstance(node, _WRITE) and cls in (READ, UNKNOWN) and not isinstance(tree, exp.Command):
            cls = WRITE
        elif isinstance(node, exp.Into):        # SELECT … INTO new_table creates a table
            cls = DDL
        elif isinstance(node, exp.Command):
            return UNKNOWN
    return cls


@lru_cache(maxsize=4096)
def classify(sql: str, dialect: str = "duckdb") -> SqlInfo:
    """Classify `sql` (bounded cache: the same query text is common in agent traffic)."""
    try:
        trees = [t for t in sqlglot.parse(sql, read=dialect) if t is not None]
    except SqlglotError as e:
        return SqlInfo(UNPARSABLE, frozenset({UNPARSABLE}), error=str(e).splitlines()[0][:200])
    except (RecursionError, ValueError) as e:
        return SqlInfo(UNPARSABLE, frozenset({UNPARSABLE}), error=type(e).__name__)
    if not trees:
        return SqlInfo(UNPARSABLE, frozenset({UNPARSABLE}), error="no statement")
    classes: set[str] = set()
    tables: set[str] = set()
    funcs: set[str] = set()
    for t in trees:
        classes.add(_classify_tree(t))
        for tbl in t.find_all(exp.Table):
            if tbl.name:
                tables.add(tbl.name.lower())
        for f in t.find_all(exp.Func):
            name = (f.sql_name() if not isinstance(f, exp.Anonymous) else f.name) or ""
            funcs.add(name.lower())
    if len(trees) > 1:
        classes.add(MULTIPLE)
    kind = max((c for c in classes if c in SEVERITY), key=SEVERITY.__getitem__)
    if funcs & FILE_FUNCTIONS and SEVERITY[kind] < SEVERITY[UNKNOWN]:
        kind = UNKNOWN                          # file/program access is never "just a read"
        classes.add(UNKNOWN)
    return SqlInfo(kind, frozenset(classes), frozenset(tables), frozenset(funcs), len(trees))
