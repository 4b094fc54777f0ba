"""The `shell:` allow-list checked on meaning: every command of a list, every option, every
path (pure). Combines shellsyntax (how the shell splits the line), programs (what each
program does with its words) and pathguard (which paths a rule allows)."""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from addons.core.shell import paths as pathguard
from addons.core.shell.programs import Access, Model, analyse
from addons.core.shell.syntax import CommandList, Simple, SyntaxRefused, Word, parse

OPERATORS = frozenset({"pipe", "and", "or", "sequence", "redirect", "background"})
LIST_OPERATORS = ("pipe", "and", "or", "sequence")        # what `operators: true` means
SYSTEM_BIN = frozenset({"/bin", "/usr/bin", "/usr/local/bin", "/sbin", "/usr/sbin"})
# environment assignments before a command that cannot load code (LD_PRELOAD, PATH, ... can)
SAFE_ASSIGN = re.compile(r"(LC_[A-Z]+|LANG|LANGUAGE)=(?:[A-Za-z][A-Za-z0-9_.@-]*)?")
MAX_DEPTH = 4
_READ_REDIRECT = frozenset({"<", "<>"})
_WRITE_REDIRECT = frozenset({">", ">>", ">|", "&>", "&>>", "<>"})


@dataclass(frozen=True)
class ShellSpec:
    commands: tuple[str, ...]                   # program globs a command may start
    operators: frozenset[str] = frozenset()
    roots: pathguard.Roots = pathguard.Roots()
    options: dict[str, frozenset[str]] = field(default_factory=dict)   # extra options: program or "*"
    exec: tuple[str, ...] = ()                  # programs allowed to run anything (no model)


@dataclass
class PathVerdict:
    access: Access
    problem: str | None


@dataclass
class CommandVerdict:
    text: str
    program: str
    problem: str | None = None
    paths: list[PathVerdict] = field(default_factory=list)
    wrapped: list["CommandVerdict"] = field(default_factory=list)

    def first_problem(self) -> str | None:
        if self.problem:
            return self.problem
        for p in self.paths:
            if p.problem:
                return p.problem
        return next((w.first_problem() for w in self.wrapped if w.first_problem()), None)


@dataclass
class ShellVerdict:
    problem: str | None = None                  # syntax or operator problem
    commands: list[CommandVerdict] = field(default_factory=list)

    @property
    def reason(self) -> str | None:
        if self.problem:
            return self.problem
        return next((f"{c.program}: {c.first_problem()}" for c in self.commands if c.first_problem()), None)

    @property
    def ok(self) -> bool:
        return self.reason is None

    def lines(self) -> list[str]:
        """For `explain`: each command, its verdict and each path's."""
        out = [f"    shell: {self.problem}"] if self.problem else []
        for c in self.commands:
            out += _lines(c, "    ")
        return out


def _lines(c: CommandVerdict, indent: str) -> list[str]:
    out = [f"{indent}command `{c.text}`: {'REFUSED ' + c.problem if c.problem else 'model ok'}"]
    for p in c.paths:
        out.append(f"{indent}  {p.access.access} {p.access.path} ({p.access.via}): {p.problem or 'ok'}")
    for w in c.wrapped:
        out += _lines(w, indent + "  ")
    return out


def check(command: str, spec: ShellSpec, models: dict[str, Model], protected: tuple[str, ...] = ()) -> ShellVerdict:
    try:
        parsed: CommandList = parse(command)
    except SyntaxRefused as e:
        return ShellVerdict(str(e))
    verdict = ShellVerdict()
    used = set(parsed.connectors)
    if any(not _descriptor(r.op, r.target) for c in parsed.commands for r in c.redirects):
        used.add("redirect")                              # 2>&1 alone touches no file
    missing = sorted(used - spec.operators)
    if missing:
        verdict.problem = f"operator(s) not allowed by the rule: {', '.join(missing)}"
    for simple in parsed.commands:
        verdict.commands.append(_command(simple, spec, models, protected, 0))
    return verdict


def _command(simple: Simple, spec: ShellSpec, models: dict[str, Model], protected: tuple[str, ...],
             depth: int) -> CommandVerdict:
    words = list(simple.words)
    text = " ".join(w.text for w in words)[:200]
    while words and "=" in words[0].text and re.match(r"[A-Za-z_][A-Za-z0-9_]*=", words[0].text):
        if not SAFE_ASSIGN.fullmatch(words[0].text):
            return CommandVerdict(text, "?", f"environment assignment {words[0].text.split('=')[0]}= is refused")
        words.pop(0)
    v = CommandVerdict(text, "?")
    for r in simple.redirects:
        v.paths += _redirect(r.op, r.target, spec, protected)
    v.paths += [p for r in simple.redirects if r.target.brace
                for p in [PathVerdict(Access(r.target.text, "write", r.op), "brace expansion in a redirection")]]
    if not words:
        v.problem = "no program to run"
        return v
    head = words[0]
    v.program = name = head.text.rsplit("/", 1)[-1]
    if head.glob or head.tilde or not name:
        v.problem = f"program name {head.text!r} cannot be proven"
        return v
    if "/" in head.text and head.text.rsplit("/", 1)[0] not in SYSTEM_BIN:
        v.problem = f"{head.text}: only programs from {', '.join(sorted(SYSTEM_BIN))} may be named by path"
        return v
    if not _any_glob(name, spec.commands):
        v.problem = f"program {name} is not in the rule's allow-list"
        return v
    if _any_glob(name, spec.exec):
        return v                                          # declared: may run anything
    model = models.get(name)
    if model is None:
        v.problem = f"no program model for {name} (rules/programs.yaml)"
        return v
    brace = next((w.text for w in words if w.brace), None)
    if brace is not None:
        v.problem = f"{brace}: brace expansion turns one word into several (write them out)"
        return v
    a = analyse(model, words[1:], spec.options.get(name, frozenset()) | spec.options.get("*", frozenset()))
    if a.problem:
        v.problem = a.problem
        return v
    for acc in a.accesses:
        v.paths.append(PathVerdict(acc, pathguard.check(acc.path, acc.access, spec.roots, protected, acc.glob)))
    if a.wrapped is not None:
        if depth >= MAX_DEPTH:
            v.problem = "wrappers nested too deeply"
        else:
            v.wrapped.append(_command(Simple(a.wrapped), spec, models, protected, depth + 1))
    return v


def _any_glob(name: str, globs: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def _descriptor(op: str, target: Word) -> bool:
    return op in (">&", "<&") and (target.text.isdigit() or target.text == "-")


def _redirect(op: str, target: Word, spec: ShellSpec, protected: tuple[str, ...]) -> list[PathVerdict]:
    if _descriptor(op, target):
        return []                                         # 2>&1: a descriptor, not a file
    if op == "<<<":
        return []                                         # here-string: text
    out = []
    if op in _READ_REDIRECT:
        acc = Access(target.text, "read", op, target.glob)
        out.append(PathVerdict(acc, pathguard.check(acc.path, "read", spec.roots, protected, acc.glob)))
    if op in _WRITE_REDIRECT or op in (">&", "<&"):
        acc = Access(target.text, "write", op, target.glob)
        out.append(PathVerdict(acc, pathguard.check(acc.path, "write", spec.roots, protected, acc.glob)))
    return out
