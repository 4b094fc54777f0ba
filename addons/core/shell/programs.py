"""Program models (rules/programs.yaml): what one command's words make a program do. Pure.

A model lists a program's options and what each takes (a value, a file to read or write,
a program to run) and what its operands are. `analyse` reads a command's words the way
GNU getopt_long does (`-ofile`, `-o file`, `--output=file`, `--out` unique prefixes,
combined short flags `-nro file`, options after operands, `--`) and returns every path the
command reads or writes, or the first reason it cannot be allowed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from addons.core.rules import Located, load_yaml
from addons.core.shell.syntax import Word

SHIPPED = Path(__file__).resolve().parents[3] / "rules" / "programs.yaml"
KINDS = frozenset({"flag", "value", "optional", "read", "write", "exec", "files_from", "pattern", "pattern_file",
                   "deny", "recursive"})
# kinds that make a program dangerous when a glob could expand into an option word
RISKY = frozenset({"read", "write", "exec", "files_from", "pattern_file", "deny"})
OPERAND_KINDS = frozenset({"read", "write", "text", "none"})
_MODEL_KEYS = {"source", "operands", "pattern_first", "operand_match", "default_operand", "numeric_option", "words",
               "wraps", "assignments", "runs_programs", "options"}
_ASSIGN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


@dataclass(frozen=True)
class Model:
    name: str
    source: str = ""
    options: dict[str, str] = field(default_factory=dict)
    operands: tuple[str, ...] | str = "read"     # a kind for every operand, or one per position
    pattern_first: bool = False
    operand_match: re.Pattern | None = None
    default_operand: str | None = None
    numeric_option: bool = False
    words: bool = False
    wraps: int | None = None
    assignments: bool = False
    runs_programs: str | None = None

    @property
    def risky(self) -> bool:
        return any(k in RISKY for k in self.options.values())


@dataclass(frozen=True)
class Access:
    path: str
    access: str          # read / write
    via: str             # the option, or "operand"
    glob: bool = False


@dataclass
class Analysis:
    program: str
    accesses: list[Access] = field(default_factory=list)
    problem: str | None = None          # the first reason to refuse
    wrapped: list[Word] | None = None   # the command a wrapper runs


def load_models(path: str | Path) -> dict[str, Model]:
    """Parse a programs.yaml; raise RulesError (file:line) on any problem."""
    data = load_yaml(path)
    loc = Located(str(path))
    if not isinstance(data, dict) or not isinstance(data.get("programs"), dict):
        raise loc.error(data, "programs file needs a 'programs' mapping")
    return {str(name): _model(loc, str(name), node) for name, node in data["programs"].items()}


def _model(loc: Located, name: str, node: Any) -> Model:
    if not isinstance(node, dict):
        raise loc.error(node, f"program {name}: a model must be a mapping")
    loc.check_keys(node, _MODEL_KEYS, context=f"program {name}: ")
    options: dict[str, str] = {}
    for spellings, kind in (node.get("options") or {}).items():
        if kind not in KINDS:
            raise loc.error(node["options"], f"program {name}: unknown option kind {kind!r}", spellings)
        for s in str(spellings).split():
            if not s.startswith("-") or (not s.startswith("--") and len(s) != 2):
                raise loc.error(node["options"], f"program {name}: {s!r} is not an option spelling", spellings)
            options[s] = str(kind)
    ops = node.get("operands", "read")
    ops = tuple(map(str, ops)) if isinstance(ops, list) else str(ops)
    if not set((ops,) if isinstance(ops, str) else ops) <= OPERAND_KINDS:
        raise loc.error(node, f"program {name}: operands must be one of {', '.join(sorted(OPERAND_KINDS))} "
                        "or a list of them", "operands")
    try:
        match = re.compile(str(node["operand_match"])) if "operand_match" in node else None
    except re.error as e:
        raise loc.error(node, f"program {name}: operand_match: {e}", "operand_match") from None
    wraps = node.get("wraps")
    if wraps is not None and (isinstance(wraps, bool) or not isinstance(wraps, int) or wraps < 0):
        raise loc.error(node, f"program {name}: wraps takes a number of operands before the command", "wraps")
    return Model(name, str(node.get("source", "")), options, ops, bool(node.get("pattern_first")), match,
                 node.get("default_operand"), bool(node.get("numeric_option")), bool(node.get("words")),
                 wraps, bool(node.get("assignments")),
                 str(node["runs_programs"]) if node.get("runs_programs") else None)


def _long(model: Model, name: str, extra: frozenset[str]) -> tuple[str | None, str | None]:
    """(option, kind) for a --name written in full or as a unique prefix, or (None, why)."""
    longs = [o for o in (*model.options, *extra) if o.startswith("--")]
    if name in longs:
        return name, model.options.get(name, "flag")
    hits = sorted({o for o in longs if o.startswith(name)})
    if len(hits) == 1:
        return hits[0], model.options.get(hits[0], "flag")
    if hits:
        return None, f"option {name} is ambiguous ({', '.join(hits[:4])})"
    return None, f"option {name} is not in the model of {model.name}"


def analyse(model: Model, words: list[Word], allow: frozenset[str] = frozenset()) -> Analysis:
    """What the command `model.name words...` reads, writes and runs."""
    out = Analysis(model.name)
    if model.runs_programs:
        out.problem = f"{model.name} runs other programs ({model.runs_programs})"
        return out
    if model.words:
        return out
    operands: list[Word] = []
    after_dashes: set[int] = set()          # operands after `--` can never become options
    pattern_given = recursive = False
    i, done = 0, False

    def fail(why: str) -> Analysis:
        out.problem = why
        return out

    def take_value(opt: str, kind: str, inline: str | None) -> bool:
        nonlocal i, pattern_given, recursive
        if kind in ("flag", "recursive"):
            recursive = recursive or kind == "recursive"
            return inline is None
        if kind == "optional" and inline is None:
            return True
        if inline is None:
            if i + 1 >= len(words):
                return False
            i += 1
            val, glob = words[i].text, words[i].glob
            if glob:
                return False                    # the shell would turn it into several words
        else:
            val, glob = inline, False
        if kind in ("pattern", "pattern_file"):
            pattern_given = True
        if kind in ("read", "pattern_file"):
            out.accesses.append(Access(val, "read", opt, glob))
        elif kind == "write":
            out.accesses.append(Access(val, "write", opt, glob))
        return True

    while i < len(words):
        w = words[i]
        t = w.text
        if done or t == "-" or not t.startswith("-") or (model.wraps is not None and operands):
            if model.wraps is not None:
                operands = words[i:]                    # wrappers stop at their first operand
                break
            operands.append(w)
            if done:
                after_dashes.add(id(w))
        elif t == "--":
            done = True
        elif w.glob:
            return fail(f"{t}: a glob in an option position cannot be proven")
        elif t.startswith("--"):
            name, eq, val = t.partition("=")
            opt, kind = _long(model, name, allow)
            if opt is None:
                return fail(kind)
            if kind in ("exec", "files_from", "deny"):
                return fail(_kind_problem(model, opt, kind))
            if not take_value(opt, kind, val if eq else None):
                return fail(f"option {opt} " + ("takes no value" if eq else "needs a value (not a glob)"))
        elif model.numeric_option and t[1:].isdigit():
            pass
        else:
            for j, c in enumerate(t[1:], 1):
                opt = "-" + c
                kind = model.options.get(opt) or ("flag" if opt in allow else None)
                if kind is None:
                    return fail(f"option {opt} is not in the model of {model.name}")
                if kind in ("exec", "files_from", "deny"):
                    return fail(_kind_problem(model, opt, kind))
                if kind in ("flag", "recursive", "optional"):
                    recursive = recursive or kind == "recursive"
                    continue
                if not take_value(opt, kind, t[j + 1:] or None):
                    return fail(f"option {opt} needs a value (not a glob)")
                break
        i += 1
    if model.wraps is not None:
        return _wrapped(model, out, operands)
    return _operands(model, out, operands, pattern_given, recursive, after_dashes)


def _kind_problem(model: Model, opt: str, kind: str) -> str:
    if kind == "exec":
        return f"option {opt} of {model.name} runs a program"
    if kind == "files_from":
        return f"option {opt} of {model.name} reads file names from a file (not provable)"
    return f"option {opt} of {model.name} is refused (changes system state)"


def _wrapped(model: Model, out: Analysis, operands: list[Word]) -> Analysis:
    rest = list(operands)
    for _ in range(model.wraps or 0):
        if not rest:
            out.problem = f"{model.name} needs its operands and a command"
            return out
        rest.pop(0)
    while model.assignments and rest and _ASSIGN.match(rest[0].text):
        rest.pop(0)
    if not rest:
        out.problem = f"{model.name} without a command is refused"
        return out
    out.wrapped = rest
    return out


def _operands(model: Model, out: Analysis, operands: list[Word], pattern_given: bool, recursive: bool,
              after_dashes: set[int]) -> Analysis:
    if model.pattern_first and not pattern_given:
        if not operands:
            out.problem = f"{model.name} needs a pattern"
            return out
        if operands[0].glob:
            out.problem = f"{model.name}: a glob as the pattern expands to file names that are then read"
            return out
        operands = operands[1:]
    kinds = model.operands
    if kinds == "none" and operands:
        out.problem = f"{model.name} takes no operands ({operands[0].text!r})"
        return out
    if isinstance(kinds, tuple) and len(operands) > len(kinds):
        out.problem = f"{model.name} takes at most {len(kinds)} operand(s)"
        return out
    if isinstance(kinds, tuple) and any(w.glob for w in operands):
        out.problem = f"{model.name}: a glob could expand to several operands (the next one is written)"
        return out
    paths = 0
    for n, w in enumerate(operands):
        kind = kinds[n] if isinstance(kinds, tuple) else kinds
        if model.operand_match is not None and not model.operand_match.fullmatch(w.text):
            out.problem = f"{model.name}: operand {w.text!r} is not accepted"
            return out
        if kind in ("read", "write") and w.text != "-":
            if w.glob and w.text[:1] in "*?[{" and model.risky and id(w) not in after_dashes:
                out.problem = (f"{w.text}: a glob could expand to an option of {model.name}; "
                               f"write ./{w.text} or put -- before it")
                return out
            out.accesses.append(Access(w.text, kind, "operand", w.glob))
            paths += 1
    default = model.default_operand or ("." if recursive else None)
    if not paths and default and not operands:
        out.accesses.append(Access(default, "read", "default"))
    return out
