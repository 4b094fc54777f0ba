"""Policy language: parsing, validation (file:line) and evaluation. Pure.

A policy is `baseline` (protocol plumbing any authenticated identity may use) plus an
ordered list of `rules`. Evaluation of one JSON-RPC message:
  1. blocklist hit in any string argument of tools/call  -> deny  (rule = pattern name)
  2. any matching rule with `deny`                        -> deny
  3. any matching rule with `approve`                     -> approve
  4. any matching rule with `allow`, or the baseline      -> allow
  5. nothing matched                                      -> deny (default deny)
i.e. deny overrides approve overrides allow; among rules of the same action the first in
file order names the decision.
"""
from __future__ import annotations

import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import compress
from pathlib import Path
from typing import Any, Callable

from jsonpath_ng import jsonpath as jp
from jsonpath_ng.exceptions import JsonPathLexerError, JsonPathParserError
from jsonpath_ng.ext import parse as jsonpath_parse
from sqlglot import exp

from addons.core.globs import matches_any
from addons.core.lru import LRU
from addons.core.shell import paths as pathguard

from addons.core.shell import policy as shellpolicy

from addons.core.sql import classify as sqlclass
from addons.core.mcpwire import LIST_METHODS, Message
from addons.core.shell.programs import SHIPPED as SHIPPED_PROGRAMS, Model, load_models
from addons.core.record import Decision, Identity
from addons.core.rules import Located, load_yaml, rules_files
from addons.core.shell.guard import Pattern, ScanBudgetExceeded, ScanCache, scan, shell_info, text_size
from addons.core.sql.mask import STYLES, ColumnPolicy, HiddenNames, rewrite as sql_rewrite

DEFAULT_METHOD = "tools/call"
LIST_CACHE_ENTRIES = 256          # cached list answers per policy (Policy.list_cache)
DEFAULT_APPROVAL_TIMEOUT = 120.0
DEFAULT_BASELINE = (
    "initialize", "ping", "server/discover", "notifications/*", "tools/list", "resources/list",
    "resources/templates/list", "prompts/list", "completion/complete", "logging/setLevel",
    "subscriptions/listen",
)
# requests whose parameters carry caller-chosen strings that reach a server's logic
SCANNED_METHODS = frozenset({"tools/call", "prompts/get", "resources/read", "completion/complete"})
SQL_CLASSES = set(sqlclass.ALL_CLASSES)
_RULE_KEYS = {"name", "when", "allow", "deny", "approve", "mask_profile", "rate_limit", "description", "direction",
              "blast_radius"}
_WHEN_KEYS = {"sub", "roles", "client_id", "connection", "environment", "method", "tool", "resource", "prompt", "args",
              "sql", "shell", "path"}
_ARG_OPS = {"equals", "regex", "one_of", "min", "max", "present", "absent"}


@dataclass(frozen=True)
class ArgPredicate:
    path: str
    expr: Any
    op: str
    value: Any

    def test(self, arguments: dict) -> bool:
        matches = [m.value for m in self.expr.find(arguments)]
        if self.op == "present":
            return bool(matches) == bool(self.value)
        if self.op == "absent":
            return (not matches) == bool(self.value)
        if not matches:
            return False
        # every addressed value must satisfy the predicate (a list cannot smuggle one bad item)
        return all(self._one(v) for v in matches)

    def _one(self, v: Any) -> bool:
        if self.op == "equals":
            return v == self.value and type(v) is type(self.value)
        if self.op == "one_of":
            return any(v == x and type(v) is type(x) for x in self.value)
        if self.op == "regex":
            return isinstance(v, str) and self.value.fullmatch(v) is not None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        return v >= self.value if self.op == "min" else v <= self.value


@dataclass(frozen=True)
class SqlVerdict:
    ok: bool
    why: str = ""                        # what made it fail, naming the function/table/column
    sql: str | None = None               # what the upstream receives when ok (rewritten SQL)
    info: sqlclass.SqlInfo | None = None
    masked: tuple[str, ...] = ()         # sensitive columns whose references were replaced
    expanded: tuple[str, ...] = ()       # tables whose `*` was expanded from the declared columns


@dataclass(frozen=True)
class SqlPredicate:
    arg: str
    classes: frozenset[str] | None       # every class of the SQL must be in here
    any_classes: frozenset[str]          # at least one class of the SQL is in here
    not_classes: frozenset[str]          # no class of the SQL is in here
    tables: frozenset[str] | None        # allow-list: every base table touched is in here
    dialect: str
    any_tables: frozenset[str] = frozenset()   # at least one table touched is in here
    columns: ColumnPolicy | None = None  # sensitive columns masked inside the SQL
    # the last verdicts (a request asks when matching and again when deciding); bounded
    _verdicts: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False, compare=False)

    def test(self, arguments: dict) -> bool:
        return self.judge(arguments).ok

    def judge(self, arguments: dict) -> SqlVerdict:
        sql = arguments.get(self.arg)
        if not isinstance(sql, str):
            return SqlVerdict(False, f"argument {self.arg!r} is not a string")
        v = self._verdicts.get(sql)
        if v is None:
            v = self._verdicts[sql] = self._judge(sql)
            while len(self._verdicts) > 64:
                self._verdicts.popitem(last=False)
        return v

    def _judge(self, sql: str) -> SqlVerdict:
        info = sqlclass.classify(sql, self.dialect)
        if self.classes is not None and not info.classes <= self.classes:
            return SqlVerdict(False, info.why(info.classes - self.classes) or info.kind, info=info)
        if self.any_classes and not info.classes & self.any_classes:
            return SqlVerdict(False, info=info)
        if info.classes & self.not_classes:
            return SqlVerdict(False, info.why(self.not_classes) or info.kind, info=info)
        if self.tables is not None and not info.tables <= self.tables:
            return SqlVerdict(False, "table(s) not allowed: " + ", ".join(sorted(info.tables - self.tables)), info=info)
        if self.any_tables and not info.tables & self.any_tables:
            return SqlVerdict(False, info=info)
        if self.columns is None:
            return SqlVerdict(True, sql=info.canonical, info=info)
        rw = sql_rewrite(info, self.columns)
        if rw.sql is None:
            return SqlVerdict(False, rw.refused or "cannot rewrite", info=info)
        return SqlVerdict(True, sql=rw.sql, info=info, masked=rw.masked, expanded=rw.expanded)


@dataclass(frozen=True)
class ShellPredicate:
    """An allow-list (`commands`) checked on meaning by addons/core/shell/policy.py: operators,
    program models, paths. `any_command` (deny lists) matches the programs a POSIX shell
    would start (addons/core/shell/guard.py)."""
    arg: str
    spec: shellpolicy.ShellSpec | None   # the allow-list; None: only any_command
    any_command: tuple[str, ...]         # at least one program started matches one of these
    models: dict[str, Model] = field(default_factory=dict, compare=False, repr=False)

    def verdict(self, arguments: dict, protected: tuple[str, ...] = ()) -> shellpolicy.ShellVerdict | None:
        """The allow-list's verdict on the command, None when there is no allow-list."""
        if self.spec is None:
            return None
        cmd = arguments.get(self.arg)
        if not isinstance(cmd, str):
            return shellpolicy.ShellVerdict(f"argument {self.arg!r} is not a string")
        return shellpolicy.check(cmd, self.spec, self.models, protected)

    def test(self, arguments: dict, protected: tuple[str, ...] = ()) -> bool:
        cmd = arguments.get(self.arg)
        if not isinstance(cmd, str):
            return False
        if self.any_command:
            info = shell_info(cmd)
            # unparsable: a shell would refuse it too; a deny list matches it
            if info.parsed and not any(matches_any(p, self.any_command) for p in info.programs):
                return False
        v = self.verdict(arguments, protected)
        return v is None or v.ok


@dataclass(frozen=True)
class PathPredicate:
    """`path:` a tool argument naming a file must stay inside its roots (addons/core/shell/paths.py)."""
    path: str
    expr: Any
    access: str
    roots: pathguard.Roots

    def problem(self, arguments: dict, protected: tuple[str, ...] = ()) -> str | None:
        found = [m.value for m in self.expr.find(arguments)]
        if not found:
            return f"{self.path}: no path given"
        for v in found:
            if not isinstance(v, str):
                return f"{self.path}: not a string"
            why = pathguard.check(v, self.access, self.roots, protected)
            if why:
                return why
        return None

    def test(self, arguments: dict, protected: tuple[str, ...] = ()) -> bool:
        return self.problem(arguments, protected) is None


@dataclass(frozen=True)
class BlastRadius:
    """How many items one call may touch, and one principal per window (issue 11)."""
    path: str
    expr: Any
    max_per_call: int | None
    max_per_window: int | None
    per: float

    def count(self, arguments: dict) -> int:
        """Items a call touches: a list's length, a number's value, 1 for anything else."""
        n = 0
        for m in self.expr.find(arguments):
            v = m.value
            if isinstance(v, list):
                n += len(v)
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                n += max(0, int(v))
            else:
                n += 1
        return n


@dataclass(frozen=True)
class Rule:
    name: str
    action: str                       # allow / deny / approve
    file: str
    line: int | None
    direction: str = "client_to_server"
    reason: str = ""
    subs: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    client_ids: tuple[str, ...] = ()
    connections: tuple[str, ...] = ()
    environments: tuple[str, ...] = ()
    methods: tuple[str, ...] = (DEFAULT_METHOD,)
    targets: tuple[str, ...] = ()     # tool / resource / prompt globs
    args: tuple[ArgPredicate, ...] = ()
    sql: SqlPredicate | None = None
    shell: ShellPredicate | None = None
    path: PathPredicate | None = None
    approvers: tuple[str, ...] = ()
    timeout: float = DEFAULT_APPROVAL_TIMEOUT
    mask_profile: str | None = None
    rate_limit: tuple[int, float] | None = None
    blast: BlastRadius | None = None

    def matches_subject(self, identity: Identity | None, connection: str, environment: str = "") -> bool:
        if self.connections and not matches_any(connection, self.connections):
            return False
        if self.environments and not matches_any(environment, self.environments):
            return False
        if identity is None:
            return not (self.subs or self.roles or self.client_ids)
        if self.subs and not matches_any(identity.sub, self.subs):
            return False
        if self.roles and not set(identity.roles) & set(self.roles):
            return False
        if self.client_ids and (identity.client_id is None or not matches_any(identity.client_id, self.client_ids)):
            return False
        return True

    def matches_method(self, method: str | None) -> bool:
        return matches_any(method or "", self.methods)

    def matches_name(self, target: str | None) -> bool:
        """The tool / resource / prompt globs (none: any)."""
        return not self.targets or (target is not None and matches_any(target, self.targets))

    def matches_target(self, method: str | None, target: str | None) -> bool:
        return self.matches_method(method) and self.matches_name(target)

    def matches(self, identity: Identity | None, connection: str, msg: Message, environment: str = "",
                protected: tuple[str, ...] = ()) -> bool:
        if not self.matches_subject(identity, connection, environment) or not self.matches_target(msg.method, msg.target):
            return False
        return self.failed_condition(msg.arguments, protected) is None

    @property
    def has_conditions(self) -> bool:
        """Argument conditions (args / shell / path / sql), whose cost grows with the arguments."""
        return bool(self.args) or self.shell is not None or self.path is not None or self.sql is not None

    def failed_condition(self, arguments: dict, protected: tuple[str, ...] = ()) -> str | None:
        """Which argument condition does not hold (args / shell / path / sql), or None."""
        if not all(p.test(arguments) for p in self.args):
            return "args"
        if self.shell is not None and not self.shell.test(arguments, protected):
            return "shell"
        if self.path is not None and not self.path.test(arguments, protected):
            return "path"
        if self.sql is not None and not self.sql.test(arguments):
            return "sql"
        return None

    def condition_problem(self, msg: Message, protected: tuple[str, ...], cond: str) -> str:
        """Why the failed condition `cond` refuses this call (names the option, path, function or table)."""
        why = None
        if cond == "shell":
            v = self.shell.verdict(msg.arguments, protected)
            why = str(v.reason) if v is not None and not v.ok else None
        elif cond == "path":
            why = self.path.problem(msg.arguments, protected)
        elif cond == "sql":
            why = self.sql.judge(msg.arguments).why
        return f"its {cond} condition does not hold for these arguments" + (f": {why}" if why else "")

    def subject_mismatch(self, identity: Identity | None, connection: str, environment: str = "") -> str:
        """What keeps this rule from applying to the caller (for refusals and explain)."""
        if self.connections and not matches_any(connection, self.connections):
            return f"it is for connection(s) {', '.join(self.connections)}"
        if self.environments and not matches_any(environment, self.environments):
            return f"it is for environment(s) {', '.join(self.environments)}"
        if self.roles and not (identity and set(identity.roles) & set(self.roles)):
            return f"it needs one of the roles {', '.join(self.roles)}"
        if self.subs and not (identity and matches_any(identity.sub, self.subs)):
            return "it is for other callers (sub)"
        if self.client_ids:
            return "it is for other clients (client_id)"
        return "it is for authenticated callers"


@dataclass
class Policy:
    rules: list[Rule] = field(default_factory=list)
    baseline: tuple[str, ...] = DEFAULT_BASELINE
    blocklist: tuple[Pattern, ...] = ()
    sql_dialect: str = "duckdb"
    files: tuple[str, ...] = ()
    models: dict[str, Model] = field(default_factory=dict)
    # the gateway's own directories: never readable or writable through a shell/path rule
    protected: tuple[str, ...] = pathguard.protected_dirs()
    # per policy object (not an init field): replace() with another blocklist gets a new one
    scan_cache: ScanCache = field(default_factory=ScanCache, init=False, repr=False, compare=False)
    # (list method, the rules that apply to the caller, digest of the upstream's list result)
    # -> which items are shown, one byte each (filter_list_result). Per policy object, like
    # scan_cache: a reload builds a new Policy, so no answer outlives the rules it came from.
    list_cache: LRU = field(default_factory=lambda: LRU(LIST_CACHE_ENTRIES), init=False, repr=False, compare=False)


def _strs(loc: Located, node: Any, key: str) -> tuple[str, ...]:
    v = node.get(key)
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return tuple(v)
    raise loc.error(node, f"'{key}' must be a string or a list of strings", key)


def _parse_args(loc: Located, when: Any) -> tuple[ArgPredicate, ...]:
    items = when.get("args") or []
    if not isinstance(items, list):
        raise loc.error(when, "'args' must be a list of predicates", "args")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            raise loc.error(items, "each args predicate needs 'path: $.jsonpath'", i)
        ops = set(map(str, item)) - {"path"}
        if len(ops) != 1 or not ops <= _ARG_OPS:
            raise loc.error(item, f"args predicate needs exactly one of {', '.join(sorted(_ARG_OPS))}")
        op = ops.pop()
        try:
            expr = jsonpath_parse(item["path"])
        except (JsonPathLexerError, JsonPathParserError, Exception) as e:  # noqa: BLE001 - library raises plain Exception too
            raise loc.error(item, f"invalid JSONPath {item['path']!r}: {e}", "path") from None
        value: Any = item[op]
        if op == "regex":
            try:
                value = re.compile(str(value))
            except re.error as e:
                raise loc.error(item, f"invalid regex: {e}", op) from None
        elif op == "one_of" and not isinstance(value, list):
            raise loc.error(item, "'one_of' takes a list", op)
        elif op in ("min", "max") and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise loc.error(item, f"'{op}' takes a number", op)
        elif op in ("present", "absent") and not isinstance(value, bool):
            raise loc.error(item, f"'{op}' takes true or false", op)
        from addons.core.rules import to_plain
        out.append(ArgPredicate(item["path"], expr, op, to_plain(value) if op in ("equals", "one_of") else value))
    return tuple(out)


_SQL_KEYS = {"arg", "class", "any_class", "not_class", "tables", "any_table", "sensitive_columns", "dialect"}


def _parse_sql(loc: Located, when: Any, dialect: str, action: str = "allow",
               masking_fields: HiddenNames = HiddenNames()) -> SqlPredicate | None:
    s = when.get("sql")
    if s is None:
        return None
    if not isinstance(s, dict):
        raise loc.error(when, "'sql' must be a mapping (arg, class, not_class, tables, sensitive_columns)", "sql")
    loc.check_keys(s, _SQL_KEYS, "sql ")
    classes = _strs(loc, s, "class")
    not_classes = _strs(loc, s, "not_class")
    any_classes = _strs(loc, s, "any_class")
    bad = (set(classes) | set(not_classes) | set(any_classes)) - SQL_CLASSES
    if bad:
        raise loc.error(s, f"unknown SQL class(es) {', '.join(sorted(bad))}; use {', '.join(sorted(SQL_CLASSES))}")
    d = str(s.get("dialect", dialect))
    tables, schema = _sql_tables(loc, s, d)
    if tables is not None and action == "deny":
        # `tables` is an allow-list (every table touched is listed): in a deny rule that
        # would narrow the deny to statements touching nothing else
        raise loc.error(s, "'tables' is an allow-list; a deny rule names tables with 'any_table'", "tables")
    any_tables = frozenset(_table_name(t, d) for t in _strs(loc, s, "any_table"))
    columns = _sql_columns(loc, s, schema, masking_fields)
    return SqlPredicate(str(s.get("arg", "sql")), frozenset(classes) if classes else None,
                        frozenset(any_classes), frozenset(not_classes), tables, d, any_tables, columns)


def _table_name(name: str, dialect: str) -> str:
    """A rule's table name, normalised as the analyser normalises references."""
    try:
        tbl = exp.to_table(name, dialect=dialect)
    except Exception:  # noqa: BLE001 - any parse failure: compare the plain lower-case name
        return name.lower()
    return sqlclass.table_key(tbl, dialect) if isinstance(tbl, exp.Table) else name.lower()


def _sql_tables(loc: Located, s: Any, dialect: str) -> tuple[frozenset[str] | None, dict[str, tuple[str, ...]]]:
    """`tables: [a, b]` or `tables: {a: [col, ...], b: [...]}` (column lists let `*` be expanded)."""
    t = s.get("tables")
    if t is None:
        return None, {}
    if isinstance(t, dict):
        schema = {}
        for name, cols in t.items():
            if not isinstance(cols, list) or not all(isinstance(c, str) for c in cols):
                raise loc.error(t, f"table {name}: give its columns as a list of names", name)
            schema[_table_name(str(name), dialect)] = tuple(c.lower() for c in cols)
        return frozenset(schema), schema
    return frozenset(_table_name(n, dialect) for n in _strs(loc, s, "tables")), {}


def _sql_columns(loc: Located, s: Any, schema: dict[str, tuple[str, ...]],
                 masking_fields: HiddenNames) -> ColumnPolicy | None:
    """`sensitive_columns: [ssn]`, `{ssn: redact, card_number: last4}`, or `masking` (every
    column whose name rules/masking.yaml hides: a field glob, a key-name regex or the last
    name of a JSONPath; style redact)."""
    v = s.get("sensitive_columns")
    if v is None:
        return None
    if v == "masking":
        if not schema:
            raise loc.error(s, "'sensitive_columns: masking' needs 'tables' with column lists", "sensitive_columns")
        cols = {c for cs in schema.values() for c in cs if masking_fields.match(c)}
        # undeclared names the globs match (a column added later) are masked too
        return ColumnPolicy({c: "redact" for c in sorted(cols)}, schema, masking_fields)
    if isinstance(v, list) and all(isinstance(c, str) for c in v):
        return ColumnPolicy({c.lower(): "redact" for c in v}, schema)
    if isinstance(v, dict):
        bad = {str(k): st for k, st in v.items() if st not in STYLES}
        if bad:
            raise loc.error(v, f"sensitive column style must be one of {', '.join(STYLES)}", next(iter(bad)))
        return ColumnPolicy({str(k).lower(): str(st) for k, st in v.items()}, schema)
    raise loc.error(s, "'sensitive_columns' takes a list, a mapping column: style, or 'masking'", "sensitive_columns")


def masked_names(rules_dir: str | Path) -> HiddenNames:
    """The key names every masking rule that hides something (not `keep`) matches: its field
    globs, its key-name regexes, and the last name of each JSONPath (`$..api_token`,
    `$.billing.iban`: a column of that name holds what output masking would hide)."""
    f = Path(rules_dir) / "masking.yaml"
    data = load_yaml(f) if f.exists() else None
    globs: list[str] = []
    regexes: list[str] = []
    for prof in ((data or {}).get("profiles") or {}).values() if isinstance(data, dict) else ():
        for r in (prof or {}).get("rules") or () if isinstance(prof, dict) else ():
            if isinstance(r, dict) and r.get("style") != "keep":
                globs += [x.lower() for x in _yaml_strs(r.get("fields"))]
                regexes += _yaml_strs(r.get("regex"))
                for expr in _yaml_strs(r.get("path")) + _yaml_strs(r.get("paths")):
                    globs += _last_path_names(expr)
    return HiddenNames(tuple(dict.fromkeys(globs)), tuple(dict.fromkeys(regexes)))


def _yaml_strs(v: Any) -> list[str]:
    return [v] if isinstance(v, str) else [x for x in v if isinstance(x, str)] if isinstance(v, list) else []


def _last_path_names(expr: str) -> list[str]:
    """`$..a.b` / `$.a['b']` -> ['b'] (the name the path ends in); [] when it ends otherwise."""
    try:
        node = jsonpath_parse(expr)
    except Exception:  # noqa: BLE001 - masking.yaml's own loader reports a bad path
        return []
    while isinstance(node, (jp.Child, jp.Descendants)):
        node = node.right
    if isinstance(node, jp.Fields):
        return [n.lower() for n in node.fields if n != "*"]
    return []


def _parse_shell(loc: Located, when: Any, models: dict[str, Model]) -> ShellPredicate | None:
    s = when.get("shell")
    if s is None:
        return None
    if not isinstance(s, dict):
        raise loc.error(when, "'shell' must be a mapping (arg, commands, any_command, operators, paths, cwd, "
                        "options, exec)", "shell")
    loc.check_keys(s, {"arg", "commands", "any_command", "operators", "paths", "cwd", "options", "exec"}, "shell ")
    any_command = _strs(loc, s, "any_command")
    if "commands" not in s:
        if not any_command:
            raise loc.error(s, "'shell' needs 'commands' (allow-list) or 'any_command'")
        return ShellPredicate(str(s.get("arg", "command")), None, any_command)
    commands = _strs(loc, s, "commands")
    ops = s.get("operators", False)
    if isinstance(ops, bool):
        operators = frozenset(shellpolicy.LIST_OPERATORS) if ops else frozenset()
    elif isinstance(ops, list) and all(isinstance(o, str) for o in ops):
        bad = set(ops) - shellpolicy.OPERATORS
        if bad:
            raise loc.error(s, f"unknown operator(s) {', '.join(sorted(bad))}; use "
                            f"{', '.join(sorted(shellpolicy.OPERATORS))} (substitutions are never accepted)",
                            "operators")
        operators = frozenset(ops)
    else:
        raise loc.error(s, "'operators' takes a list (pipe, and, or, sequence, redirect, background) "
                        "or true/false", "operators")
    opts = s.get("options") or {}
    if not isinstance(opts, dict):
        raise loc.error(s, "'options' maps a program (or allow: for every program) to extra options", "options")
    extra = {("*" if str(k) == "allow" else str(k)): frozenset(_strs(loc, opts, k)) for k in opts}
    spec = shellpolicy.ShellSpec(commands, operators, _parse_roots(loc, s), extra, _strs(loc, s, "exec"))
    return ShellPredicate(str(s.get("arg", "command")), spec, any_command, models)


def _parse_roots(loc: Located, node: Any) -> pathguard.Roots:
    """`paths: {read: [...], write: [...]}` and `cwd:` (shell) or `roots:` + `access:` (path)."""
    cwd = node.get("cwd")
    if cwd is not None and (not isinstance(cwd, str) or not cwd.startswith("/")):
        raise loc.error(node, "'cwd' must be an absolute path", "cwd")
    paths = node.get("paths")
    if paths is None:
        return pathguard.Roots(None, (), cwd)
    if not isinstance(paths, dict) or set(map(str, paths)) - {"read", "write"}:
        raise loc.error(node, "'paths' takes {read: [roots], write: [roots]}", "paths")
    return pathguard.Roots(_strs(loc, paths, "read"), _strs(loc, paths, "write"), cwd)


def _parse_path(loc: Located, when: Any) -> PathPredicate | None:
    p = when.get("path")
    if p is None:
        return None
    if not isinstance(p, dict) or not isinstance(p.get("arg"), str):
        raise loc.error(when, "'path' needs arg: NAME or $.jsonpath, and roots: [...]", "path")
    loc.check_keys(p, {"arg", "access", "roots", "cwd"}, "path ")
    access = str(p.get("access", "read"))
    if access not in ("read", "write"):
        raise loc.error(p, "'access' is read or write", "access")
    arg = p["arg"] if p["arg"].startswith("$") else f"$.{p['arg']}"
    try:
        expr = jsonpath_parse(arg)
    except Exception as e:  # noqa: BLE001 - jsonpath-ng raises plain Exception too
        raise loc.error(p, f"invalid JSONPath {arg!r}: {e}", "arg") from None
    cwd = p.get("cwd")
    if cwd is not None and (not isinstance(cwd, str) or not cwd.startswith("/")):
        raise loc.error(p, "'cwd' must be an absolute path", "cwd")
    if "roots" not in p:
        raise loc.error(p, "'path' needs roots: [...] (globs like /srv/data/** or ./**)")
    roots = _strs(loc, p, "roots")
    return PathPredicate(arg, expr, access,
                         pathguard.Roots(roots if access == "read" else None, roots if access == "write" else (), cwd))


def _parse_blast(loc: Located, node: Any, name: str) -> BlastRadius | None:
    b = node.get("blast_radius")
    if b is None:
        return None
    if not isinstance(b, dict):
        raise loc.error(node, f"rule {name}: blast_radius must be a mapping", "blast_radius")
    loc.check_keys(b, {"items", "max_per_call", "max_per_window", "per"}, "blast_radius ", context=f"rule {name}: ")
    if not isinstance(b.get("items"), str):
        raise loc.error(b, f"rule {name}: blast_radius needs items: $.jsonpath (an array or a number argument)")
    try:
        expr = jsonpath_parse(b["items"])
    except Exception as e:  # noqa: BLE001 - jsonpath-ng raises plain Exception too
        raise loc.error(b, f"rule {name}: invalid JSONPath {b['items']!r}: {e}", "items") from None
    limits = {}
    for k in ("max_per_call", "max_per_window"):
        v = b.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise loc.error(b, f"rule {name}: {k} must be a positive integer", k)
        limits[k] = v
    if limits["max_per_call"] is None and limits["max_per_window"] is None:
        raise loc.error(b, f"rule {name}: blast_radius needs max_per_call and/or max_per_window")
    per = b.get("per", 3600)
    if isinstance(per, bool) or not isinstance(per, (int, float)) or per <= 0:
        raise loc.error(b, f"rule {name}: blast_radius.per must be positive seconds", "per")
    return BlastRadius(b["items"], expr, limits["max_per_call"], limits["max_per_window"], float(per))


def parse_rule(loc: Located, node: Any, index: int, dialect: str, models: dict[str, Model] | None = None,
               masking_fields: HiddenNames = HiddenNames()) -> Rule:
    if not isinstance(node, dict):
        raise loc.error(node, "a rule must be a mapping")
    loc.check_keys(node, _RULE_KEYS, "rule ")
    name = node.get("name")
    if not isinstance(name, str) or not name:
        raise loc.error(node, "every rule needs a 'name'")
    actions = [a for a in ("allow", "deny", "approve") if a in node]
    if len(actions) != 1:
        raise loc.error(node, f"rule {name}: needs exactly one of allow / deny / approve")
    action = actions[0]
    reason, approvers, timeout = "", (), DEFAULT_APPROVAL_TIMEOUT
    if action == "allow" and node["allow"] is not True:
        raise loc.error(node, f"rule {name}: 'allow' must be true", "allow")
    if action == "deny":
        reason = node["deny"] if isinstance(node["deny"], str) else ""
        if node["deny"] is not True and not reason:
            raise loc.error(node, f"rule {name}: 'deny' takes true or a reason", "deny")
    if action == "approve":
        a = node["approve"]
        if not isinstance(a, dict):
            raise loc.error(node, f"rule {name}: 'approve' takes {{approvers: [roles], timeout}}; "
                            "it needs approvers (the roles whose holders may decide)", "approve")
        approvers = _strs(loc, a, "approvers")
        t = a.get("timeout", DEFAULT_APPROVAL_TIMEOUT)
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0:
            raise loc.error(a, f"rule {name}: approval timeout must be a positive number of seconds", "timeout")
        timeout = float(t)
        if not approvers:
            # nobody named = anybody could decide: not a safe default for a high-risk call
            where, key = (a, "approvers") if "approvers" in a else (node, "approve")
            raise loc.error(where, f"rule {name}: 'approve' needs approvers: [roles] "
                            "(the roles whose holders may decide)", key)
    when = node.get("when") or {}
    if not isinstance(when, dict):
        raise loc.error(node, f"rule {name}: 'when' must be a mapping", "when")
    loc.check_keys(when, _WHEN_KEYS, "'when' ", context=f"rule {name}: ")
    methods = _strs(loc, when, "method") or (DEFAULT_METHOD,)
    targets = _strs(loc, when, "tool") + _strs(loc, when, "resource") + _strs(loc, when, "prompt")
    rl = node.get("rate_limit")
    rate = None
    if rl is not None:
        if not isinstance(rl, dict) or not isinstance(rl.get("calls"), int) or rl["calls"] <= 0:
            raise loc.error(node, f"rule {name}: rate_limit needs calls: N (positive) and per: SECONDS", "rate_limit")
        per = rl.get("per", 60)
        if isinstance(per, bool) or not isinstance(per, (int, float)) or per <= 0:
            raise loc.error(rl, f"rule {name}: rate_limit.per must be positive seconds", "per")
        rate = (int(rl["calls"]), float(per))
    direction = str(node.get("direction", "client_to_server"))
    if direction not in ("client_to_server", "server_to_client"):
        raise loc.error(node, f"rule {name}: direction must be client_to_server or server_to_client", "direction")
    if direction == "server_to_client" and "method" not in when:
        methods = ("sampling/createMessage", "elicitation/create", "roots/list")
    return Rule(
        name=name, action=action, file=loc.file, line=_line(node), direction=direction, reason=reason,
        subs=_strs(loc, when, "sub"), roles=_strs(loc, when, "roles"), client_ids=_strs(loc, when, "client_id"),
        connections=_strs(loc, when, "connection"), environments=_strs(loc, when, "environment"),
        methods=methods, targets=targets,
        args=_parse_args(loc, when), sql=_parse_sql(loc, when, dialect, action, masking_fields),
        shell=_parse_shell(loc, when, models or {}), path=_parse_path(loc, when),
        approvers=approvers, timeout=timeout,
        mask_profile=str(node["mask_profile"]) if node.get("mask_profile") else None, rate_limit=rate,
        blast=_parse_blast(loc, node, name),
    )


def _line(node: Any) -> int | None:
    from addons.core.rules import line_of
    return line_of(node)


def parse_blocklist(path: Path) -> tuple[Pattern, ...]:
    if not path.exists():
        return ()
    data = load_yaml(path)
    loc = Located(str(path))
    if data is None:
        return ()
    if not isinstance(data, dict) or not isinstance(data.get("patterns"), list):
        raise loc.error(data, "blocklist needs a 'patterns' list")
    out = []
    for i, p in enumerate(data["patterns"]):
        if not isinstance(p, dict) or not all(isinstance(p.get(k), str) for k in ("name", "regex")):
            raise loc.error(data["patterns"], "each pattern needs name and regex strings", i)
        try:
            rx = re.compile(p["regex"], re.IGNORECASE)
        except re.error as e:
            raise loc.error(p, f"pattern {p['name']}: invalid regex: {e}", "regex") from None
        out.append(Pattern(p["name"], rx, str(p.get("category", "blocklist")), str(p.get("description", ""))))
    return tuple(out)


def load_policy(rules_dir: str | Path) -> Policy:
    """Load policy.yaml (+ policy.d/*.yaml) and blocklist.yaml; raise RulesError on any problem."""
    rules: list[Rule] = []
    baseline: list[str] | None = None
    dialect = "duckdb"
    files = []
    names: dict[str, str] = {}
    masking_fields = masked_names(rules_dir)
    models = load_models(programs_file(rules_dir))
    for f in rules_files(rules_dir, "policy"):
        if not f.exists():
            continue
        files.append(str(f))
        data = load_yaml(f)
        loc = Located(str(f))
        if data is None:
            continue
        if not isinstance(data, dict):
            raise loc.error(data, "top level must be a mapping with 'rules' (and optional 'baseline')")
        loc.check_keys(data, {"rules", "baseline", "sql_dialect"}, "top-level ")
        if "sql_dialect" in data:
            dialect = str(data["sql_dialect"])
        if "baseline" in data:
            b = data["baseline"]
            if isinstance(b, dict):
                b = b.get("methods", [])
            if not isinstance(b, list) or not all(isinstance(x, str) for x in b):
                raise loc.error(data, "'baseline' must be a list of method globs", "baseline")
            baseline = (baseline or []) + list(b)
        items = data.get("rules") or []
        if not isinstance(items, list):
            raise loc.error(data, "'rules' must be a list", "rules")
        for i, node in enumerate(items):
            r = parse_rule(loc, node, i, dialect, models, masking_fields)
            if r.name in names:
                raise loc.error(node, f"rule name {r.name!r} already used in {names[r.name]}")
            names[r.name] = f"{f}:{r.line}"
            rules.append(r)
    blocklist = parse_blocklist(Path(rules_dir) / "blocklist.yaml")
    return Policy(rules, tuple(baseline) if baseline is not None else DEFAULT_BASELINE, blocklist, dialect,
                  tuple(files), models, pathguard.protected_dirs(str(rules_dir)))


def programs_file(rules_dir: str | Path) -> Path:
    """rules/programs.yaml of this rules directory, else the shipped one."""
    own = Path(rules_dir) / "programs.yaml"
    return own if own.exists() else SHIPPED_PROGRAMS


def policy_files(rules_dir: str | Path) -> list[Path]:
    # masking.yaml: `sensitive_columns: masking` takes its field names
    return rules_files(rules_dir, "policy") + [Path(rules_dir) / n
                                               for n in ("blocklist.yaml", "masking.yaml", "programs.yaml")]


# --- evaluation -------------------------------------------------------------------

def _decision(rule: Rule, msg: Message) -> Decision:
    reason, rewrites = rule.reason, ()
    if rule.sql is not None:
        v = rule.sql.judge(msg.arguments)
        if rule.action == "deny":
            why = v.info.why() if v.info is not None else ""
            reason = f"{reason} ({why})" if why and reason else (reason or why)
        elif v.sql is not None:
            # forward the statement as analysed (no comments, masked columns rewritten);
            # the audit gets the original with its literals masked
            rewrites = ((rule.sql.arg, v.sql),)
            if v.masked:
                reason = f"sql columns masked: {', '.join(v.masked)}; original: {_literals_masked(v.info)}"
    return Decision(rule.action, rule.name, reason, rule.mask_profile, rule.approvers,
                    rule.timeout if rule.action == "approve" else None, msg.id, rewrites=rewrites)


def _literals_masked(info: sqlclass.SqlInfo | None) -> str:
    if info is None:
        return ""
    trees = info.trees()
    for t in trees:
        for lit in list(t.find_all(exp.Literal)):
            if lit.is_string:
                lit.replace(exp.Literal.string("?"))
    return ";\n".join(t.sql(dialect=info.dialect, comments=False) for t in trees)[:2000]



def matching_rules(policy: Policy, identity: Identity | None, connection: str, msg: Message,
                   direction: str = "client_to_server", environment: str = "") -> list[Rule]:
    return [r for r in policy.rules
            if r.direction == direction and r.matches(identity, connection, msg, environment, policy.protected)]



@dataclass(frozen=True)
class ScanBudget:
    """How much argument text one message may make the gateway check, and for how long."""
    max_chars: int = 1 << 20
    seconds: float = 0.5


DEFAULT_SCAN_BUDGET = ScanBudget()


def evaluate(policy: Policy, identity: Identity | None, connection: str, msg: Message,
             direction: str = "client_to_server", environment: str = "",
             budget: ScanBudget = DEFAULT_SCAN_BUDGET) -> Decision:
    """The decision for one message. See the module docstring for precedence.

    Cheap checks first: when no allow/approve rule can apply to this caller, method and
    tool (whatever the arguments), the call is refused before anything whose cost grows
    with the body (blocklist scan, SQL/shell parsing) looks at it. What is scanned is
    bounded by `budget`: more text, or more time, and the call is refused."""
    if msg.kind in ("response", "error"):
        # a client answering a server request (sampling, elicitation): the request itself
        # was governed when it travelled server->client
        return Decision("allow", "baseline", "", message_id=msg.id)
    method, target = msg.method, msg.target      # read once, not once per rule
    candidates = [r for r in policy.rules if r.direction == direction
                  and r.matches_subject(identity, connection, environment) and r.matches_target(method, target)]
    baseline = direction == "client_to_server" and identity is not None and matches_any(msg.method or "", policy.baseline)
    if not baseline and not any(r.action in ("allow", "approve") for r in candidates):
        plain_deny = next((r for r in candidates if r.action == "deny" and not r.has_conditions), None)
        if plain_deny is not None:
            return _decision(plain_deny, msg)
        return _default_deny(policy, identity, connection, msg, direction, environment, candidates)
    if direction == "client_to_server" and msg.method in SCANNED_METHODS and policy.blocklist:
        params = {k: v for k, v in msg.params.items() if k != "_meta"}
        size = text_size(params, budget.max_chars)
        if size > budget.max_chars:
            return Decision("deny", "scan-budget", f"arguments too large to check: more than {budget.max_chars} "
                            "characters of text", message_id=msg.id)
        try:
            hit = scan(params, policy.blocklist, policy.scan_cache, time.monotonic() + budget.seconds)
        except ScanBudgetExceeded:
            return Decision("deny", "scan-budget", f"arguments could not be checked within {budget.seconds:g}s",
                            message_id=msg.id)
        if hit is not None:
            return Decision("deny", f"blocklist:{hit.pattern}", f"blocked {hit.category} pattern in {hit.path}",
                            message_id=msg.id)
    arguments = msg.arguments
    matched = [r for r in candidates if r.failed_condition(arguments, policy.protected) is None]
    for action in ("deny", "approve", "allow"):
        for r in matched:
            if r.action == action:
                return _decision(r, msg)
    if baseline:
        return Decision("allow", "baseline", "", message_id=msg.id)
    return _default_deny(policy, identity, connection, msg, direction, environment, candidates)


def nearest_rule(policy: Policy, identity: Identity | None, connection: str, msg: Message,
                 direction: str = "client_to_server", environment: str = "",
                 candidates: list[Rule] | None = None) -> tuple[Rule, str] | None:
    """The allow/approve rule that came closest to allowing a refused call, and what failed:
    one for this caller and tool whose argument condition failed, else one for this tool
    whose subject (roles, sub, client, connection, environment) is not the caller's."""
    if candidates is None:
        candidates = [r for r in policy.rules if r.direction == direction
                      and r.matches_subject(identity, connection, environment)
                      and r.matches_target(msg.method, msg.target)]
    for r in candidates:
        if r.action in ("allow", "approve"):
            cond = r.failed_condition(msg.arguments, policy.protected)
            if cond is not None:
                return r, r.condition_problem(msg, policy.protected, cond)
    for r in policy.rules:
        if r.direction == direction and r.action in ("allow", "approve") and r.matches_target(msg.method, msg.target):
            return r, r.subject_mismatch(identity, connection, environment)
    return None


def _default_deny(policy: Policy, identity: Identity | None, connection: str, msg: Message, direction: str,
                  environment: str, candidates: list[Rule]) -> Decision:
    near = nearest_rule(policy, identity, connection, msg, direction, environment, candidates)
    what = f"{msg.method} {msg.target}" if msg.target else str(msg.method)
    reason = "no rule allows this call (default deny); " + (
        f"nearest rule {near[0].name}: {near[1]}" if near else f"no rule allows {what} for anyone")
    return Decision("deny", None, reason, message_id=msg.id)


LIST_CALL_METHOD = {"tools/list": "tools/call", "resources/list": "resources/read",
                    "resources/templates/list": "resources/read", "prompts/list": "prompts/get"}


def _list_rules(policy: Policy, identity: Identity | None, connection: str, method: str,
                environment: str) -> tuple[int, ...]:
    """Positions of the rules that can show or hide an item of this list to this caller:
    subject (sub, roles, client, connection, environment) and method matched once per list."""
    call_method = LIST_CALL_METHOD[method]
    return tuple(i for i, r in enumerate(policy.rules)
                 if r.direction == "client_to_server" and r.matches_subject(identity, connection, environment)
                 and r.matches_method(call_method))


def _item_test(rules: list[Rule]) -> Callable[[str], bool]:
    def test(name: str) -> bool:
        any_ok = False
        for r in rules:
            if not r.matches_name(name):
                continue
            if r.action == "deny" and not r.args and r.sql is None and r.shell is None and r.path is None:
                return False
            if r.action in ("allow", "approve"):
                any_ok = True
        return any_ok
    return test


def visibility(policy: Policy, identity: Identity | None, connection: str, method: str,
               environment: str = "") -> Callable[[str], bool]:
    """A test for the items of one list: may the caller use this tool/resource/prompt at
    all (allowed or approvable for some arguments)? Rules with argument or SQL predicates
    count as 'some arguments'; a deny rule hides the item only when it has no argument
    predicates. Subject and method are matched once per list, not once per item."""
    return _item_test([policy.rules[i] for i in _list_rules(policy, identity, connection, method, environment)])


def visible(policy: Policy, identity: Identity | None, connection: str, method: str, name: str,
            environment: str = "") -> bool:
    return visibility(policy, identity, connection, method, environment)(name)


def filter_list_result(policy: Policy, identity: Identity | None, connection: str, method: str,
                       result: Any, environment: str = "", digest: bytes | None = None) -> Any:
    """Drop list items the caller may not use. Returns a new result dict.

    `digest`: of the exact text of `result` as the upstream sent it (ResultSource), when
    known. Which items are shown then comes from the policy's list_cache, keyed by it and
    by the rules that apply to this caller: the same list, seen by a caller the same rules
    apply to, is not filtered item by item again."""
    key = LIST_METHODS.get(method)
    if key is None or not isinstance(result, dict) or not isinstance(result.get(key), list):
        return result
    items = result[key]
    which = _list_rules(policy, identity, connection, method, environment)
    cache_key = (method, which, digest) if digest is not None else None
    shown = policy.list_cache.get(cache_key) if cache_key is not None else None
    if shown is None:
        name_key = "uri" if key == "resources" else ("uriTemplate" if key == "resourceTemplates" else "name")
        test = _item_test([policy.rules[i] for i in which])
        # one byte per item, 1 = shown: compact, and applied by itertools.compress at C speed
        shown = bytes(isinstance(item, dict) and isinstance(item.get(name_key), str) and test(item[name_key])
                      for item in items)
        if cache_key is not None:
            policy.list_cache.put(cache_key, shown)
    return {**result, key: list(compress(items, shown))}


def explain(policy: Policy, identity: Identity | None, connection: str, msg: Message,
            environment: str = "") -> list[str]:
    """Human-readable trace: every rule that matched and the final decision."""
    lines = []
    for r in matching_rules(policy, identity, connection, msg, environment=environment):
        lines.append(f"  matched {r.action:7} {r.name}  ({r.file}:{r.line})")
    for r in policy.rules:
        if (r.shell is not None or r.path is not None) and r.matches_subject(identity, connection, environment) \
                and r.matches_target(msg.method, msg.target):
            v = r.shell.verdict(msg.arguments, policy.protected) if r.shell is not None else None
            if v is not None:
                lines.append(f"  shell check of {r.name}: {'ok' if v.ok else 'REFUSED ' + str(v.reason)}")
                lines += v.lines()
            if r.path is not None:
                why = r.path.problem(msg.arguments, policy.protected)
                lines.append(f"  path check of {r.name}: {why or 'ok'}")
    d = evaluate(policy, identity, connection, msg, environment=environment)
    lines += _explain_sql(policy, identity, connection, msg, environment, d)
    near = nearest_rule(policy, identity, connection, msg, environment=environment) if d.rule is None else None
    if near is not None:
        lines.append(f"  nearest {near[0].action:7} {near[0].name}  ({near[0].file}:{near[0].line}): {near[1]}")
    lines.append(f"decision: {d.action.upper()}  rule: {d.rule or '(default deny)'}"
                 + (f"  reason: {d.reason}" if d.reason else "")
                 + (f"  approvers: {', '.join(d.approvers)}  timeout: {d.timeout:g}s" if d.action == "approve" else ""))
    return lines


def _explain_sql(policy: Policy, identity: Identity | None, connection: str, msg: Message, environment: str,
                 d: Decision) -> list[str]:
    """What the SQL argument reaches (per SQL rule for this tool) and what is forwarded."""
    lines: list[str] = []
    seen: set[tuple[str, str]] = set()
    for r in policy.rules:
        p = r.sql
        if p is None or (p.arg, p.dialect) in seen or not r.matches_subject(identity, connection, environment) \
                or not r.matches_target(msg.method, msg.target) or not isinstance(msg.arguments.get(p.arg), str):
            continue
        seen.add((p.arg, p.dialect))
        info = sqlclass.classify(msg.arguments[p.arg], p.dialect)
        lines.append(f"  sql ({p.dialect}, argument {p.arg}): classes {', '.join(sorted(info.classes))}")
        lines.append(f"    tables: {', '.join(sorted(info.tables)) or '-'}   "
                     f"functions: {', '.join(sorted(info.functions)) or '-'}")
        if info.reasons:
            lines.append(f"    reaches: {info.why()}")
    decider = next((r for r in policy.rules if r.name == d.rule), None)
    if decider is not None and decider.sql is not None and decider.sql.columns is not None and d.rewrites:
        v = decider.sql.judge(msg.arguments)
        styles = ", ".join(f"{c} ({decider.sql.columns.style(c)})" for c in v.masked)
        lines.append(f"  columns masked: {styles or '-'}"
                     + (f"   * expanded over: {', '.join(v.expanded)}" if v.expanded else ""))
    for arg, value in d.rewrites:
        lines.append(f"  forwarded {arg}: {value}")
    return lines
