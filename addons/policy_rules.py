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

import fnmatch
import re
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

from jsonpath_ng.exceptions import JsonPathLexerError, JsonPathParserError
from jsonpath_ng.ext import parse as jsonpath_parse

from addons import sqlclass
from addons.mcp import LIST_METHODS, Message
from addons.record import Decision, Identity
from addons.rules import Located, load_yaml, rules_files
from addons.shellguard import Pattern, ScanBudgetExceeded, ScanCache, scan, shell_info, text_size

DEFAULT_METHOD = "tools/call"
DEFAULT_APPROVAL_TIMEOUT = 120.0
DEFAULT_BASELINE = (
    "initialize", "ping", "server/discover", "notifications/*", "tools/list", "resources/list",
    "resources/templates/list", "prompts/list", "completion/complete", "logging/setLevel",
    "subscriptions/listen",
)
# requests whose parameters carry caller-chosen strings that reach a server's logic
SCANNED_METHODS = frozenset({"tools/call", "prompts/get", "resources/read", "completion/complete"})
SQL_CLASSES = {"read", "write", "ddl", "dcl", "unknown", "multiple", "unparsable"}
_RULE_KEYS = {"name", "when", "allow", "deny", "approve", "mask_profile", "rate_limit", "description", "direction",
              "blast_radius"}
_WHEN_KEYS = {"sub", "roles", "client_id", "connection", "environment", "method", "tool", "resource", "prompt", "args",
              "sql", "shell"}
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
class SqlPredicate:
    arg: str
    classes: frozenset[str] | None       # every class of the SQL must be in here
    any_classes: frozenset[str]          # at least one class of the SQL is in here
    not_classes: frozenset[str]          # no class of the SQL is in here
    tables: frozenset[str] | None
    dialect: str

    def test(self, arguments: dict) -> bool:
        sql = arguments.get(self.arg)
        if not isinstance(sql, str):
            return False
        info = sqlclass.classify(sql, self.dialect)
        if self.classes is not None and not info.classes <= self.classes:
            return False
        if self.any_classes and not info.classes & self.any_classes:
            return False
        if info.classes & self.not_classes:
            return False
        if self.tables is not None and not (info.tables & self.tables):
            return False
        return True


@dataclass(frozen=True)
class ShellPredicate:
    """Checks on a command line as a POSIX shell would split it (addons/shellguard.py)."""
    arg: str
    commands: tuple[str, ...] | None     # every program started must match one of these globs
    any_command: tuple[str, ...]         # at least one program started matches one of these
    operators: bool | None               # may it chain/redirect/substitute? None = not checked

    def test(self, arguments: dict) -> bool:
        cmd = arguments.get(self.arg)
        if not isinstance(cmd, str):
            return False
        info = shell_info(cmd)
        if not info.parsed:
            # a shell would refuse it too; an allow-list never matches it, a deny list does
            return self.commands is None and bool(self.any_command)
        if self.commands is not None and not (info.programs and all(_any_glob(p, self.commands) for p in info.programs)):
            return False
        if self.any_command and not any(_any_glob(p, self.any_command) for p in info.programs):
            return False
        return self.operators is None or self.operators or not info.operators


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
    approvers: tuple[str, ...] = ()
    timeout: float = DEFAULT_APPROVAL_TIMEOUT
    mask_profile: str | None = None
    rate_limit: tuple[int, float] | None = None
    blast: BlastRadius | None = None

    def matches_subject(self, identity: Identity | None, connection: str, environment: str = "") -> bool:
        if self.connections and not _any_glob(connection, self.connections):
            return False
        if self.environments and not _any_glob(environment, self.environments):
            return False
        if identity is None:
            return not (self.subs or self.roles or self.client_ids)
        if self.subs and not _any_glob(identity.sub, self.subs):
            return False
        if self.roles and not set(identity.roles) & set(self.roles):
            return False
        if self.client_ids and (identity.client_id is None or not _any_glob(identity.client_id, self.client_ids)):
            return False
        return True

    def matches_method(self, method: str | None) -> bool:
        return _any_glob(method or "", self.methods)

    def matches_name(self, target: str | None) -> bool:
        """The tool / resource / prompt globs (none: any)."""
        return not self.targets or (target is not None and _any_glob(target, self.targets))

    def matches_target(self, method: str | None, target: str | None) -> bool:
        return self.matches_method(method) and self.matches_name(target)

    def matches(self, identity: Identity | None, connection: str, msg: Message, environment: str = "") -> bool:
        if not self.matches_subject(identity, connection, environment) or not self.matches_target(msg.method, msg.target):
            return False
        return self.failed_condition(msg.arguments) is None

    @property
    def has_conditions(self) -> bool:
        """Argument conditions (args / shell / sql), whose cost grows with the arguments."""
        return bool(self.args) or self.shell is not None or self.sql is not None

    def failed_condition(self, arguments: dict) -> str | None:
        """Which argument condition does not hold (args / shell / sql), or None."""
        if not all(p.test(arguments) for p in self.args):
            return "args"
        if self.shell is not None and not self.shell.test(arguments):
            return "shell"
        if self.sql is not None and not self.sql.test(arguments):
            return "sql"
        return None

    def subject_mismatch(self, identity: Identity | None, connection: str, environment: str = "") -> str:
        """What keeps this rule from applying to the caller (for refusals and explain)."""
        if self.connections and not _any_glob(connection, self.connections):
            return f"it is for connection(s) {', '.join(self.connections)}"
        if self.environments and not _any_glob(environment, self.environments):
            return f"it is for environment(s) {', '.join(self.environments)}"
        if self.roles and not (identity and set(identity.roles) & set(self.roles)):
            return f"it needs one of the roles {', '.join(self.roles)}"
        if self.subs and not (identity and _any_glob(identity.sub, self.subs)):
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
    # per policy object (not an init field): replace() with another blocklist gets a new one
    scan_cache: ScanCache = field(default_factory=ScanCache, init=False, repr=False, compare=False)


def _any_glob(value: str, globs: Iterable[str]) -> bool:
    return _glob_matcher(tuple(globs))(value)


@lru_cache(maxsize=4096)
def _glob_matcher(globs: tuple[str, ...]) -> Callable[[str], bool]:
    """One compiled test per glob list (rules are compiled once; this runs per request):
    exact names by set lookup, wildcards by one combined regex (fnmatch semantics)."""
    exact = frozenset(g for g in globs if not any(c in g for c in "*?["))
    wild = [g for g in globs if g not in exact]
    rx = re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in wild)) if wild else None
    if rx is None:
        return exact.__contains__
    return lambda v: v in exact or rx.match(v) is not None


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
        from addons.rules import to_plain
        out.append(ArgPredicate(item["path"], expr, op, to_plain(value) if op in ("equals", "one_of") else value))
    return tuple(out)


def _parse_sql(loc: Located, when: Any, dialect: str) -> SqlPredicate | None:
    s = when.get("sql")
    if s is None:
        return None
    if not isinstance(s, dict):
        raise loc.error(when, "'sql' must be a mapping (arg, class, not_class, tables)", "sql")
    unknown = set(map(str, s)) - {"arg", "class", "any_class", "not_class", "tables", "dialect"}
    if unknown:
        raise loc.error(s, f"unknown sql key(s): {', '.join(sorted(unknown))}")
    classes = _strs(loc, s, "class")
    not_classes = _strs(loc, s, "not_class")
    any_classes = _strs(loc, s, "any_class")
    bad = (set(classes) | set(not_classes) | set(any_classes)) - SQL_CLASSES
    if bad:
        raise loc.error(s, f"unknown SQL class(es) {', '.join(sorted(bad))}; use {', '.join(sorted(SQL_CLASSES))}")
    tables = _strs(loc, s, "tables")
    return SqlPredicate(str(s.get("arg", "sql")), frozenset(classes) if classes else None,
                        frozenset(any_classes), frozenset(not_classes),
                        frozenset(t.lower() for t in tables) if tables else None, str(s.get("dialect", dialect)))


def _parse_shell(loc: Located, when: Any) -> ShellPredicate | None:
    s = when.get("shell")
    if s is None:
        return None
    if not isinstance(s, dict):
        raise loc.error(when, "'shell' must be a mapping (arg, commands, any_command, operators)", "shell")
    unknown = set(map(str, s)) - {"arg", "commands", "any_command", "operators"}
    if unknown:
        raise loc.error(s, f"unknown shell key(s): {', '.join(sorted(unknown))}", sorted(unknown)[0])
    commands = _strs(loc, s, "commands") if "commands" in s else None
    any_command = _strs(loc, s, "any_command")
    if commands is None and not any_command:
        raise loc.error(s, "'shell' needs 'commands' (allow-list) or 'any_command'")
    ops = s.get("operators", False if commands is not None else None)
    if ops is not None and not isinstance(ops, bool):
        raise loc.error(s, "'operators' takes true or false", "operators")
    return ShellPredicate(str(s.get("arg", "command")), commands, any_command, ops)


def _parse_blast(loc: Located, node: Any, name: str) -> BlastRadius | None:
    b = node.get("blast_radius")
    if b is None:
        return None
    if not isinstance(b, dict):
        raise loc.error(node, f"rule {name}: blast_radius must be a mapping", "blast_radius")
    unknown = set(map(str, b)) - {"items", "max_per_call", "max_per_window", "per"}
    if unknown:
        raise loc.error(b, f"rule {name}: unknown blast_radius key(s) {', '.join(sorted(unknown))}", sorted(unknown)[0])
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


def parse_rule(loc: Located, node: Any, index: int, dialect: str) -> Rule:
    if not isinstance(node, dict):
        raise loc.error(node, "a rule must be a mapping")
    unknown = set(map(str, node)) - _RULE_KEYS
    if unknown:
        raise loc.error(node, f"unknown rule key(s): {', '.join(sorted(unknown))}", sorted(unknown)[0])
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
    unknown = set(map(str, when)) - _WHEN_KEYS
    if unknown:
        raise loc.error(when, f"rule {name}: unknown 'when' key(s): {', '.join(sorted(unknown))}", sorted(unknown)[0])
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
        args=_parse_args(loc, when), sql=_parse_sql(loc, when, dialect), shell=_parse_shell(loc, when),
        approvers=approvers, timeout=timeout,
        mask_profile=str(node["mask_profile"]) if node.get("mask_profile") else None, rate_limit=rate,
        blast=_parse_blast(loc, node, name),
    )


def _line(node: Any) -> int | None:
    from addons.rules import line_of
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
        unknown = set(map(str, data)) - {"rules", "baseline", "sql_dialect"}
        if unknown:
            raise loc.error(data, f"unknown top-level key(s): {', '.join(sorted(unknown))}", sorted(unknown)[0])
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
            r = parse_rule(loc, node, i, dialect)
            if r.name in names:
                raise loc.error(node, f"rule name {r.name!r} already used in {names[r.name]}")
            names[r.name] = f"{f}:{r.line}"
            rules.append(r)
    blocklist = parse_blocklist(Path(rules_dir) / "blocklist.yaml")
    return Policy(rules, tuple(baseline) if baseline is not None else DEFAULT_BASELINE, blocklist, dialect,
                  tuple(files))


def policy_files(rules_dir: str | Path) -> list[Path]:
    return rules_files(rules_dir, "policy") + [Path(rules_dir) / "blocklist.yaml"]


# --- evaluation -------------------------------------------------------------------

def _decision(rule: Rule, msg: Message) -> Decision:
    return Decision(rule.action, rule.name, rule.reason, rule.mask_profile, rule.approvers,
                    rule.timeout if rule.action == "approve" else None, msg.id)


def matching_rules(policy: Policy, identity: Identity | None, connection: str, msg: Message,
                   direction: str = "client_to_server", environment: str = "") -> list[Rule]:
    return [r for r in policy.rules if r.direction == direction and r.matches(identity, connection, msg, environment)]


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
    candidates = [r for r in policy.rules if r.direction == direction
                  and r.matches_subject(identity, connection, environment) and r.matches_target(msg.method, msg.target)]
    baseline = direction == "client_to_server" and identity is not None and _any_glob(msg.method or "", policy.baseline)
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
    matched = [r for r in candidates if r.failed_condition(msg.arguments) is None]
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
            cond = r.failed_condition(msg.arguments)
            if cond is not None:
                return r, f"its {cond} condition does not hold for these arguments"
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


def visibility(policy: Policy, identity: Identity | None, connection: str, method: str,
               environment: str = "") -> Callable[[str], bool]:
    """A test for the items of one list: may the caller use this tool/resource/prompt at
    all (allowed or approvable for some arguments)? Rules with argument or SQL predicates
    count as 'some arguments'; a deny rule hides the item only when it has no argument
    predicates. Subject and method are matched once per list, not once per item."""
    call_method = LIST_CALL_METHOD[method]
    rules = [r for r in policy.rules
             if r.direction == "client_to_server" and r.matches_subject(identity, connection, environment)
             and r.matches_method(call_method)]

    def test(name: str) -> bool:
        any_ok = False
        for r in rules:
            if not r.matches_name(name):
                continue
            if r.action == "deny" and not r.args and r.sql is None and r.shell is None:
                return False
            if r.action in ("allow", "approve"):
                any_ok = True
        return any_ok
    return test


def visible(policy: Policy, identity: Identity | None, connection: str, method: str, name: str,
            environment: str = "") -> bool:
    return visibility(policy, identity, connection, method, environment)(name)


def filter_list_result(policy: Policy, identity: Identity | None, connection: str, method: str,
                       result: Any, environment: str = "") -> Any:
    """Drop list items the caller may not use. Returns a new result dict."""
    key = LIST_METHODS.get(method)
    if key is None or not isinstance(result, dict) or not isinstance(result.get(key), list):
        return result
    name_key = "uri" if key == "resources" else ("uriTemplate" if key == "resourceTemplates" else "name")
    test = visibility(policy, identity, connection, method, environment)
    kept = [item for item in result[key]
            if isinstance(item, dict) and isinstance(item.get(name_key), str) and test(item[name_key])]
    return {**result, key: kept}


def explain(policy: Policy, identity: Identity | None, connection: str, msg: Message,
            environment: str = "") -> list[str]:
    """Human-readable trace: every rule that matched and the final decision."""
    lines = []
    for r in matching_rules(policy, identity, connection, msg, environment=environment):
        lines.append(f"  matched {r.action:7} {r.name}  ({r.file}:{r.line})")
    d = evaluate(policy, identity, connection, msg, environment=environment)
    near = nearest_rule(policy, identity, connection, msg, environment=environment) if d.rule is None else None
    if near is not None:
        lines.append(f"  nearest {near[0].action:7} {near[0].name}  ({near[0].file}:{near[0].line}): {near[1]}")
    lines.append(f"decision: {d.action.upper()}  rule: {d.rule or '(default deny)'}"
                 + (f"  reason: {d.reason}" if d.reason else "")
                 + (f"  approvers: {', '.join(d.approvers)}  timeout: {d.timeout:g}s" if d.action == "approve" else ""))
    return lines
