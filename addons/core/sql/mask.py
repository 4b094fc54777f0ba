"""Sensitive columns masked *inside* the SQL before it is forwarded (pure).

Output masking only sees the final text: `reverse(ssn)`, `ssn || 'x'`, a map keyed by ssn or
`WHERE ssn = '…'` used as an oracle all get past it. So every reference to a sensitive column,
wherever it stands (select list, expressions, WHERE/JOIN/GROUP BY/ORDER BY, subqueries, CTEs,
lateral joins, struct/map constructors, window clauses), is replaced by the mask expression:
the database itself only ever computes on the masked value.

Constructs that reach a column without naming it are expanded or refused:
  `*` / `t.*` over a table with sensitive (or undeclared) columns  -> expanded from the
                                  rule's declared column list, else refused
  `* EXCLUDE/REPLACE`, `* LIKE`, `COLUMNS(...)`, `#n`, a table used as a row value
  (`SELECT c FROM customers c`, `to_json(customers)`), NATURAL JOIN, `USING (ssn)`,
  a column alias list on such a table (`customers AS t(a, b, c, d)` renames ssn to d),
  method-call syntax on a name (`ssn.reverse()`, `c.to_json()`: the parser keeps no column),
  PIVOT/UNPIVOT directly over such a table                      -> refused
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from functools import lru_cache

from sqlglot import exp

from addons.core.sql.classify import SqlInfo, cte_names_visible, normalise_identifier, table_key

STYLES = ("redact", "last4")


@dataclass(frozen=True)
class HiddenNames:
    """Key names rules/masking.yaml hides: field globs and key-name regexes (case-insensitive)."""
    globs: tuple[str, ...] = ()
    regexes: tuple[str, ...] = ()

    def match(self, name: str) -> bool:
        n = name.lower()
        return any(fnmatch.fnmatchcase(n, g) for g in self.globs) or \
            any(_regex(r).search(n) for r in self.regexes)


@lru_cache(maxsize=256)
def _regex(rx: str) -> re.Pattern:
    return re.compile(rx, re.I)


@dataclass(frozen=True)
class ColumnPolicy:
    sensitive: dict[str, str]                      # column (case-folded) -> style
    schema: dict[str, tuple[str, ...]] = field(default_factory=dict)   # table key -> its columns
    patterns: HiddenNames = HiddenNames()          # names rules/masking.yaml hides: style redact

    def style(self, column: str) -> str | None:
        """The mask of a column name (case-folded), or None when it is not sensitive."""
        if column in self.sensitive:
            return self.sensitive[column]
        return "redact" if self.patterns.match(column) else None

    def risky(self, table: str) -> bool:
        """May a `*` over this table reach a sensitive column?"""
        cols = self.schema.get(table)
        return cols is None or any(self.style(c.lower()) for c in cols)


@dataclass(frozen=True)
class Rewrite:
    sql: str | None                 # what the database receives (None: refused)
    refused: str | None = None      # why, naming the column / construct
    masked: tuple[str, ...] = ()    # columns whose references were replaced
    expanded: tuple[str, ...] = ()  # tables whose `*` was expanded


class Refused(Exception):
    pass


def mask_expression(name: str, style: str, column: exp.Column) -> exp.Expression:
    if style == "last4":
        return exp.DPipe(this=exp.Literal.string("***"),
                         expression=exp.Anonymous(this="right", expressions=[
                             exp.Cast(this=column.copy(), to=exp.DataType.build("VARCHAR")), exp.Literal.number(4)]),
                         safe=True)
    # a cast, not a bare literal: DuckDB refuses `ORDER BY '<literal>'`
    return exp.Cast(this=exp.Literal.string(f"[MASKED:{name}]"), to=exp.DataType.build("VARCHAR"))


def rewrite(info: SqlInfo, policy: ColumnPolicy) -> Rewrite:
    if not (policy.sensitive or policy.patterns.globs or policy.patterns.regexes) or info.canonical is None:
        return Rewrite(info.canonical)
    try:
        trees = info.trees()
        masked: list[str] = []
        expanded: list[str] = []
        for t in trees:
            _Rewriter(info.dialect, policy, masked, expanded).run(t)
        sql = ";\n".join(t.sql(dialect=info.dialect, comments=False) for t in trees)
    except Refused as e:
        return Rewrite(None, str(e))
    except Exception as e:  # noqa: BLE001 - a statement that cannot be rewritten is refused
        return Rewrite(None, f"cannot rewrite the statement ({type(e).__name__})")
    return Rewrite(sql, None, tuple(dict.fromkeys(masked)), tuple(dict.fromkeys(expanded)))


class _Rewriter:
    def __init__(self, dialect: str, policy: ColumnPolicy, masked: list[str], expanded: list[str]):
        self.dialect, self.policy, self.masked, self.expanded = dialect, policy, masked, expanded

    def norm(self, ident) -> str:
        return normalise_identifier(ident, self.dialect)

    def base_table(self, node: exp.Expression) -> str | None:
        if isinstance(node, exp.Table) and isinstance(node.this, exp.Identifier) and not cte_names_visible(node):
            return table_key(node, self.dialect)
        return None

    def run(self, tree: exp.Expression) -> None:
        risky = {t: k for t in tree.find_all(exp.Table) if (k := self.base_table(t)) is not None and self.policy.risky(k)}
        if risky:
            self.check_constructs(tree, risky)
            for star in list(tree.find_all(exp.Star)):
                self.star(star)
        for col in list(tree.find_all(exp.Column)):
            if isinstance(col.this, exp.Identifier):
                name = self.norm(col.this)
                style = self.policy.style(name)
                if style is not None:
                    self.replace(col, name, style)

    def check_constructs(self, tree: exp.Expression, risky: dict[exp.Table, str]) -> None:
        # a table's name or alias used as a value is the whole row (DuckDB: a struct), unless
        # that table has a column of that name (columns bind first)
        rows: dict[str, set[str]] = {}
        for t, key in risky.items():
            # `customers AS t(a, b, c, d)` renames columns by position: `d` is then ssn unmasked
            if isinstance(t.args.get("alias"), exp.TableAlias) and t.args["alias"].columns:
                raise Refused(f"a column alias list on {key} (rename its columns in a subquery)")
            cols = {c.lower() for c in self.policy.schema.get(key, ())}
            for n in [key.rsplit(".", 1)[-1]] + ([self.norm(t.args["alias"].this)] if t.alias else []):
                rows[n] = rows[n] & cols if n in rows else cols
        for node in tree.walk():
            kind = type(node).__name__           # by name: older sqlglot releases lack these classes
            if kind == "Columns":
                raise Refused("COLUMNS(...) over a table with sensitive columns")
            if kind == "PositionalColumn":
                raise Refused("a positional column (#n) over a table with sensitive columns")
            if isinstance(node, exp.Pivot):
                src = node.this if isinstance(node.this, exp.Table) else node.parent
                if isinstance(src, exp.Table) and src in risky:
                    raise Refused(f"PIVOT/UNPIVOT directly over {risky[src]} (pivot a subquery that names its columns)")
            if isinstance(node, exp.Join):
                if str(node.args.get("method") or "").upper() == "NATURAL":
                    raise Refused("NATURAL JOIN with a table that has sensitive columns")
                for ident in node.args.get("using") or ():
                    if self.policy.style(self.norm(ident)):
                        raise Refused(f"JOIN ... USING ({ident.name}): a sensitive column")
            if isinstance(node, exp.Dot) and not isinstance(node.parent, exp.Dot):
                base = node
                while isinstance(base, (exp.Dot, exp.Paren)):
                    base = base.this
                # DuckDB's method syntax `ssn.reverse()`, `c.to_json()`: sqlglot keeps the
                # receiver as a bare name, not a column, so it would escape the masking
                if isinstance(base, exp.Identifier):
                    raise Refused(f"{node.sql(dialect=self.dialect)[:60]}: method-call syntax over a table "
                                  "with sensitive columns (write f(x) instead of x.f())")
            if isinstance(node, exp.Var) and self.policy.style(node.name.lower()):
                raise Refused(f"{node.name} used where the parser does not see a column")
            if isinstance(node, exp.Column) and isinstance(node.this, exp.Identifier):
                n = self.norm(node.this)
                if n in rows and n not in rows[n]:
                    raise Refused(f"the whole row of a table with sensitive columns ({node.name})")

    def star(self, star: exp.Star) -> None:
        parent = star.parent
        if isinstance(parent, exp.Count) or (isinstance(parent, exp.Anonymous) and parent.name.lower() == "count"):
            return
        qualified = isinstance(parent, exp.Column) and parent.this is star
        item = parent if qualified else star
        select = item.parent
        if not isinstance(select, exp.Select) or item.arg_key != "expressions" \
                or any(star.args.get(k) for k in ("except_", "except", "replace", "rename", "ilike")):
            raise Refused("this use of * over a table with sensitive columns (list the columns)")
        sources = self.sources(select)
        # a table of this SELECT that is not a plain FROM/JOIN item (`FROM (a JOIN b)`,
        # `FROM (customers)`) cannot be expanded item by item
        direct = {id(node) for _, _, node in sources}
        for t in select.find_all(exp.Table):
            key = self.base_table(t)
            if key is not None and self.policy.risky(key) and id(t) not in direct \
                    and t.find_ancestor(exp.Select) is select:
                raise Refused(f"* over a nested join or parenthesised {key} (list the columns)")
        if qualified:
            q = self.norm(parent.args.get("table"))
            sources = [src for src in sources if src[0] == q]
            if not sources:
                raise Refused(f"{q}.* names no table of its SELECT")
        if not any(key is not None and self.policy.risky(key) for _, key, _ in sources):
            return
        cols: list[exp.Expression] = []
        for alias, key, _ in sources:
            if key is not None:
                declared = self.policy.schema.get(key)
                if declared is None:
                    raise Refused(f"* over {key}: its columns are not declared in the rule's tables")
                self.expanded.append(key)
                cols += [exp.column(c, table=alias, quoted=True) for c in declared]
            elif alias:
                cols.append(exp.Column(this=exp.Star(), table=exp.to_identifier(alias, quoted=True)))
            else:
                raise Refused("* over a source without a name next to a table with sensitive columns")
        idx = item.index
        exprs = list(select.expressions)
        select.set("expressions", exprs[:idx] + cols + exprs[idx + 1:])

    def sources(self, select: exp.Select) -> list[tuple[str, str | None, exp.Expression]]:
        """(name, base table key or None for a derived source, node) per FROM/JOIN item, in order."""
        items = []
        frm = select.args.get("from_") or select.args.get("from")
        if frm is not None:
            items.append(frm.this)
        items += [j.this for j in select.args.get("joins") or ()]
        out: list[tuple[str, str | None, exp.Expression]] = []
        for it in items:
            alias = self.norm(it.args["alias"].this) if it.args.get("alias") and it.args["alias"].this else ""
            key = self.base_table(it)
            if key is not None:
                out.append((alias or key.rsplit(".", 1)[-1], key, it))
            elif isinstance(it, exp.Table) and isinstance(it.this, exp.Identifier):   # a CTE
                out.append((alias or self.norm(it.this), None, it))
            else:
                out.append((alias, None, it))
        return out

    def replace(self, col: exp.Column, name: str, style: str) -> None:
        self.masked.append(name)
        new = mask_expression(name, style, col)
        if isinstance(col.parent, exp.Select) and col.arg_key == "expressions":
            new = exp.alias_(new, col.this.name, quoted=True)
        col.replace(new)
