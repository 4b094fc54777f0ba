"""SQL analysis with sqlglot (pure): what a statement *reaches*, not what it looks like.

Classes, beside read/write/ddl/dcl:
  files   a table function, replacement scan (`FROM 'x.csv'`), COPY, ATTACH, IMPORT/EXPORT
          that reads or writes a path or URL
  system  settings, secrets, environment, catalog internals, pragmas, extensions, sequences
  exec    SQL (or a table) named in a string: query(), query_table(), PREPARE/EXECUTE
  unknown anything the analyser does not fully understand: a function outside the
          dialect's lists (addons/core/sql/functions.yaml), an opaque command, EXPLAIN
`read` means reading tables with functions from the `pure` list only. `multiple` is added
when the text holds more than one statement, `unparsable` when sqlglot cannot parse it (or
the text is over the size/nesting bound, so a huge statement is refused in bounded time).

The statement the database runs is sqlglot's regeneration of the parsed tree without
comments (`SqlInfo.canonical`): the gateway forwards that text, so a construct sqlglot
reads differently from the database cannot run unseen.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from addons.core.rules import load_yaml

# sqlglot warns with the statement's text ("'…' contains unsupported syntax"): caller SQL
# must not reach the gateway's log
logging.getLogger("sqlglot").setLevel(logging.ERROR)

READ, WRITE, DDL, DCL, UNKNOWN = "read", "write", "ddl", "dcl", "unknown"
FILES, SYSTEM, EXEC = "files", "system", "exec"
MULTIPLE, UNPARSABLE = "multiple", "unparsable"
SEVERITY = {READ: 0, WRITE: 1, DDL: 2, DCL: 3, FILES: 4, SYSTEM: 5, EXEC: 6, UNKNOWN: 7, UNPARSABLE: 8}
ALL_CLASSES = frozenset(SEVERITY) | {MULTIPLE}

MAX_SQL_CHARS = 32_768          # bigger statements are refused before parsing
MAX_NODES = 20_000
MAX_DEPTH = 150
DATA_FILE = Path(__file__).with_name("functions.yaml")

_WRITE = tuple(getattr(exp, n) for n in ("Insert", "Update", "Delete", "Merge") if hasattr(exp, n))
_DDL = tuple(getattr(exp, n) for n in ("Create", "Drop", "Alter", "TruncateTable", "Comment", "RenameTable")
             if hasattr(exp, n))
_DCL = tuple(getattr(exp, n) for n in ("Grant", "Revoke") if hasattr(exp, n))
_READ_ROOTS = tuple(getattr(exp, n) for n in ("Select", "Union", "Intersect", "Except", "Values", "Subquery")
                    if hasattr(exp, n))
# statements that look at or change the engine rather than tables
_SYSTEM_ROOTS = tuple(getattr(exp, n) for n in ("Pragma", "Set", "Attach", "Detach", "Install", "Use", "Summarize",
                                                "Show", "Describe", "Kill", "Analyze") if hasattr(exp, n))
# first word of a statement sqlglot only keeps as text
_COMMAND_CLASS = {
    "load": SYSTEM, "install": SYSTEM, "call": SYSTEM, "pragma": SYSTEM, "set": SYSTEM, "reset": SYSTEM,
    "checkpoint": SYSTEM, "force": SYSTEM, "attach": FILES, "detach": SYSTEM, "use": SYSTEM, "vacuum": SYSTEM,
    "export": FILES, "import": FILES, "copy": FILES, "execute": EXEC, "prepare": EXEC, "deallocate": EXEC,
    "do": EXEC, "listen": SYSTEM, "notify": SYSTEM,
}
# sqlglot nodes that are syntax, not a call, when they generate without `name(`
_SYNTAX_FUNCS = frozenset({"Case", "If", "Array", "Struct", "Cast", "TryCast", "Bracket", "CurrentDate",
                           "CurrentTimestamp", "CurrentTime", "Extract", "Interval", "Coalesce", "ToMap",
                           "VarMap", "Map", "Convert", "Collate", "Paren", "Between", "Lambda"})
_OPERATORS = (exp.Binary, exp.Connector, exp.Unary, exp.Predicate)
_SYSTEM_SCHEMAS = frozenset({"information_schema", "pg_catalog", "system", "temp"})
_SYSTEM_TABLE_PREFIXES = ("duckdb_", "pg_", "sqlite_", "pragma_")
_CALL = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_$]*)\s*\(")
_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*\Z")


@dataclass(frozen=True)
class FunctionData:
    pure: frozenset[str]
    files: frozenset[str]
    system: frozenset[str]
    exec: frozenset[str]
    read_tables: frozenset[str]
    exec_tables: frozenset[str]
    scan_extensions: frozenset[str] = frozenset()

    def scalar_class(self, name: str) -> str:
        if name in self.pure:
            return READ
        return self._reach(name)

    def table_class(self, name: str) -> str:
        if name in self.exec_tables:
            return EXEC
        if name in self.read_tables:
            return READ
        return self._reach(name)

    def _reach(self, name: str) -> str:
        for cls, names in ((FILES, self.files), (EXEC, self.exec), (SYSTEM, self.system)):
            if name in names:
                return cls
        return UNKNOWN


@lru_cache(maxsize=8)
def function_data(dialect: str) -> FunctionData:
    """The dialect's lists from addons/core/sql/functions.yaml (a dialect not listed there has
    empty lists: every function is `unknown`)."""
    data = load_yaml(DATA_FILE) or {}
    d = (data.get("dialects") or {}).get(dialect) or {}
    get = lambda k: frozenset(str(x).lower() for x in d.get(k) or ())  # noqa: E731
    return FunctionData(get("pure"), get("files"), get("system"), get("exec"), get("read_tables"),
                        get("exec_tables"), get("scan_extensions"))


@dataclass(frozen=True)
class SqlInfo:
    kind: str                                 # the most severe class
    classes: frozenset[str] = field(default_factory=frozenset)   # every class seen, + "multiple"
    tables: frozenset[str] = field(default_factory=frozenset)    # base tables, normalised (see table_key)
    functions: frozenset[str] = field(default_factory=frozenset) # lower-case function names called
    statements: int = 0
    error: str | None = None
    # (class, what) for everything that is not `read`: names the function/table/statement
    reasons: tuple[tuple[str, str], ...] = ()
    canonical: str | None = None              # the statement(s) as forwarded (sqlglot, no comments)
    dialect: str = "duckdb"

    @property
    def multiple(self) -> bool:
        return self.statements > 1

    def why(self, classes: frozenset[str] | set[str] | None = None) -> str:
        """'read_text(): files, current_setting(): system' for the given (default: all) classes."""
        seen: list[str] = []
        for cls, what in self.reasons:
            if classes is None or cls in classes:
                item = f"{what}: {cls}"
                if item not in seen:
                    seen.append(item)
        return ", ".join(seen[:6]) + (" ..." if len(seen) > 6 else "")

    def trees(self) -> list[exp.Expression]:
        """Fresh parse of the canonical text (callers may change it)."""
        return [t for t in sqlglot.parse(self.canonical or "", read=self.dialect) if t is not None]


def _unparsable(error: str) -> SqlInfo:
    return SqlInfo(UNPARSABLE, frozenset({UNPARSABLE}), error=error, reasons=((UNPARSABLE, error),))


def normalise_identifier(ident: exp.Expression | str | None, dialect: str) -> str:
    """DuckDB and SQLite fold every identifier (quoted too); PostgreSQL only unquoted ones."""
    if ident is None:
        return ""
    if isinstance(ident, str):
        return ident.lower()
    name = ident.name
    if dialect == "postgres" and isinstance(ident, exp.Identifier) and ident.quoted:
        return name
    return name.lower()


def table_key(tbl: exp.Table, dialect: str) -> str:
    """`customers`, `main.customers` and `<catalog>.main.customers` are the same table
    (DuckDB's default schema; the only catalogs an analyst can reach are the database's own
    and the system ones); other schemas keep their name: `s.customers`."""
    name = normalise_identifier(tbl.this, dialect)
    db = normalise_identifier(tbl.args.get("db"), dialect)
    default = {"duckdb": "main", "postgres": "public", "sqlite": "main"}.get(dialect, "")
    return name if db in ("", default) else f"{db}.{name}"


def func_name(node: exp.Func, dialect: str) -> str | None:
    """The name the database sees for this call (sqlglot regenerates typed functions in
    the dialect: exp.TimeToStr is DuckDB's strftime), or None for syntax (CASE, [..], {..})."""
    if isinstance(node, exp.Anonymous):
        return node.name.lower()
    m = _CALL.match(node.sql(dialect=dialect, comments=False))
    return m.group(1).lower() if m else None


def cte_names_visible(tbl: exp.Table) -> bool:
    """Is this unqualified table name a CTE in scope (lexically: the WITH of an enclosing
    statement, earlier CTEs of the same WITH, or itself when RECURSIVE)?"""
    if tbl.args.get("db") or tbl.args.get("catalog"):
        return False
    name = tbl.name.lower()
    child: exp.Expression = tbl
    node = tbl.parent
    while node is not None:
        if isinstance(node, exp.With):
            # inside a CTE's body: only the CTEs before it (and itself when RECURSIVE); a
            # non-recursive `WITH customers AS (FROM customers)` reads the real table
            ctes = list(node.expressions)
            inside = next((i for i, c in enumerate(ctes) if child is c), len(ctes))
            visible = ctes[: inside + (1 if node.args.get("recursive") else 0)]
        else:
            w = node.args.get("with_") or node.args.get("with")
            # the statement's body (not its WITH, handled above) sees every CTE
            visible = list(w.expressions) if isinstance(w, exp.With) and child is not w else []
        if any(c.alias_or_name.lower() == name for c in visible):
            return True
        child, node = node, node.parent
    return False


def _depth_ok(tree: exp.Expression) -> bool:
    n = 0
    for node in tree.walk():
        n += 1
        if n > MAX_NODES:
            return False
    d = 0
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        d = max(d, depth)
        if d > MAX_DEPTH:
            return False
        stack.extend((c, depth + 1) for c in node.iter_expressions())
    return True


class _Analysis:
    def __init__(self, dialect: str):
        self.dialect = dialect
        self.data = function_data(dialect)
        self.classes: set[str] = set()
        self.tables: set[str] = set()
        self.funcs: set[str] = set()
        self.reasons: list[tuple[str, str]] = []

    def add(self, cls: str, what: str) -> None:
        self.classes.add(cls)
        if cls != READ:
            self.reasons.append((cls, what))

    def statement(self, tree: exp.Expression) -> None:
        if isinstance(tree, exp.Command):
            word = tree.name.lower()
            self.add(_COMMAND_CLASS.get(word, UNKNOWN), f"{word.upper()} statement")
            self.add(UNKNOWN, f"{word.upper()} statement (not analysed)")
            return
        if isinstance(tree, _READ_ROOTS):
            self.add(READ, "select")
        elif isinstance(tree, _SYSTEM_ROOTS):
            self.add(SYSTEM, f"{type(tree).__name__.upper()} statement")
            if type(tree).__name__ in ("Attach", "Install"):       # opens a file / downloads code
                self.add(FILES, f"{type(tree).__name__.upper()} statement")
        elif isinstance(tree, exp.Copy):
            self.add(FILES, "COPY statement")
            if "program" in tree.sql(dialect=self.dialect, comments=False).lower():
                self.add(EXEC, "COPY ... PROGRAM")
        elif not isinstance(tree, _WRITE + _DDL + _DCL):
            self.add(UNKNOWN, f"{type(tree).__name__.upper()} statement")
        for node in tree.walk():
            self.node(node)

    def node(self, node: exp.Expression) -> None:
        if isinstance(node, _DCL):
            self.add(DCL, f"{type(node).__name__.upper()} statement")
        elif isinstance(node, _DDL):
            kind = str(node.args.get("kind") or "").upper()
            what = f"{type(node).__name__.upper()} {kind}".strip()
            self.add(SYSTEM if kind in ("SECRET", "PERSISTENT SECRET") else DDL, what)
        elif isinstance(node, _WRITE):
            self.add(WRITE, f"{type(node).__name__.upper()} statement")
        elif isinstance(node, exp.Into):
            self.add(DDL, "SELECT ... INTO")
        elif isinstance(node, exp.Command):
            self.add(UNKNOWN, f"{node.name.upper()} (not analysed)")
        elif isinstance(node, exp.Copy):
            self.add(FILES, "COPY")
        elif isinstance(node, exp.Table):
            self.table(node)
        elif isinstance(node, exp.Func) and _is_table_function(node):
            self.table_function(node)
        elif isinstance(node, exp.Func):
            self.function(node)

    def table_function(self, src: exp.Func) -> None:
        """FROM read_csv(...), FROM range(5), JOIN LATERAL histogram('t', c)"""
        name = func_name(src, self.dialect) or type(src).__name__.lower()
        self.funcs.add(name)
        cls = self.data.table_class(name)
        self.add(cls, f"{name}()")
        self.exec_arguments(src, name, cls)

    def table(self, tbl: exp.Table) -> None:
        src = tbl.this
        if isinstance(src, exp.Func):
            return                                          # judged as a table function (node())
        if not isinstance(src, exp.Identifier):
            self.add(UNKNOWN, f"table expression {type(src).__name__}")
            return
        if cte_names_visible(tbl):
            return
        raw = src.name
        key = table_key(tbl, self.dialect)
        db = normalise_identifier(tbl.args.get("db"), self.dialect)
        dotted = ".".join(p.name for p in tbl.parts)
        if not _PLAIN_NAME.match(raw):                      # FROM 'x.csv' / "s3://..." : a replacement scan
            self.add(FILES, f"'{raw[:60]}' (file scan)")
        elif db and dotted.rsplit(".", 1)[-1].lower() in self.data.scan_extensions:   # FROM data.csv
            self.add(FILES, f"{dotted[:60]} (file scan)")
        elif db in _SYSTEM_SCHEMAS or key.startswith(_SYSTEM_TABLE_PREFIXES) or key in self.data.system:
            self.add(SYSTEM, f"{key} (catalog)")
        elif key in self.data.files or key in self.data.exec:
            self.add(self.data.table_class(key), f"{key} (table function)")
        self.tables.add(key)

    def function(self, node: exp.Func) -> None:
        name = func_name(node, self.dialect)
        if name is None:
            # operators (AND, ->>, ~, ...) map to pure functions; their operands are walked
            if type(node).__name__ not in _SYNTAX_FUNCS and not isinstance(node, _OPERATORS):
                self.add(UNKNOWN, f"{type(node).__name__} expression")
            return
        self.funcs.add(name)
        cls = self.data.scalar_class(name)
        if cls == UNKNOWN and type(node).__name__ in _SYNTAX_FUNCS:
            cls = READ
        self.add(cls, f"{name}()")
        self.exec_arguments(node, name, cls)

    def exec_arguments(self, node: exp.Func, name: str, cls: str) -> None:
        """SQL held in a string: analysed too (its tables and functions count); a
        non-literal argument cannot be judged."""
        if cls != EXEC:
            return
        first = next(node.iter_expressions(), None)
        if isinstance(first, exp.Literal) and first.is_string:
            inner = classify(first.this, self.dialect)
            self.classes |= inner.classes - {MULTIPLE}
            self.tables |= inner.tables
            self.funcs |= inner.functions
            self.reasons.extend(inner.reasons)
        else:
            self.add(UNKNOWN, f"{name}() with a computed SQL argument")


def _is_table_function(node: exp.Func) -> bool:
    """A call in FROM position: `FROM f(...)` (a Table) or `LATERAL f(...)` / `OUTER APPLY f(...)`
    (a Lateral): DuckDB runs the *table* function of that name (histogram('t', c) reads t)."""
    return isinstance(node.parent, (exp.Table, exp.Lateral)) and node.arg_key == "this"


CACHED_SQL_CHARS = 4096


def classify(sql: str, dialect: str = "duckdb") -> SqlInfo:
    """Classify `sql`. Cached: the same query text is common in agent traffic, and one
    request asks once per SQL rule; long statements get a small cache of their own so the
    memory stays bounded (4096 x 4 KiB + 32 x 32 KiB)."""
    return (_classify_short if len(sql) <= CACHED_SQL_CHARS else _classify_long)(sql, dialect)


@lru_cache(maxsize=4096)
def _classify_short(sql: str, dialect: str) -> SqlInfo:
    return _classify(sql, dialect)


@lru_cache(maxsize=32)
def _classify_long(sql: str, dialect: str) -> SqlInfo:
    return _classify(sql, dialect)


def _classify(sql: str, dialect: str) -> SqlInfo:
    if len(sql) > MAX_SQL_CHARS:
        return _unparsable(f"statement longer than {MAX_SQL_CHARS} characters")
    try:
        trees = [t for t in sqlglot.parse(sql, read=dialect) if t is not None]
        if not trees:
            return _unparsable("no statement")
        if not all(_depth_ok(t) for t in trees):
            return _unparsable(f"statement nested deeper than {MAX_DEPTH} or over {MAX_NODES} nodes")
        a = _Analysis(dialect)
        for t in trees:
            a.statement(t)
        canonical = ";\n".join(t.sql(dialect=dialect, comments=False) for t in trees)
        # the text forwarded must read back as the tree judged (a doubtful round trip is unknown)
        again = [t for t in sqlglot.parse(canonical, read=dialect) if t is not None]
        if len(again) != len(trees) or ";\n".join(t.sql(dialect=dialect, comments=False) for t in again) != canonical:
            a.add(UNKNOWN, "statement does not survive a parse round trip")
    except SqlglotError as e:
        return _unparsable(str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
    except Exception as e:  # noqa: BLE001 - anything the parser/printer trips on is refused, never read
        return _unparsable(type(e).__name__)
    classes = set(a.classes)
    if len(trees) > 1:
        classes.add(MULTIPLE)
    kind = max((c for c in classes if c in SEVERITY), key=SEVERITY.__getitem__, default=UNKNOWN)
    return SqlInfo(kind, frozenset(classes), frozenset(a.tables), frozenset(a.funcs), len(trees),
                   reasons=tuple(a.reasons), canonical=canonical, dialect=dialect)
