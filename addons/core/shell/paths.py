"""Is a path inside the roots a rule allows, and outside the gateway's own directories? Pure.

Roots are lexical: a path is normalised as text (`.` and `..` folded, duplicate slashes
removed) without asking the upstream's file system, which the gateway generally cannot
see. Relative paths are taken against the rule's declared working directory `cwd`; when
none is declared they stay relative to the upstream's own working directory and must not
climb out of it. What cannot be proven is refused: `~`, NUL or newline, `..` that leaves
the working directory, a glob whose literal prefix is not under an allowed root, and
(when the path exists on the gateway's machine, as for a local upstream) a path whose
symlinks resolve outside its root or into a protected directory.
"""
from __future__ import annotations

import fnmatch
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
# the repository's own secrets, rules and recordings: protected even when the gateway's
# options point elsewhere (a demo server started from the checkout runs next to them)
REPO_PROTECTED = tuple(str(REPO / d) for d in (".secrets", "rules", "recordings"))
_GLOB = frozenset("*?[{")


@dataclass(frozen=True)
class Roots:
    read: tuple[str, ...] | None = None     # None: any path (except protected ones)
    write: tuple[str, ...] = ()             # default: no writes
    cwd: str | None = None                  # absolute; None = the upstream's own


def normalise(path: str, cwd: str | None) -> str:
    """Lexical normal form: absolute when `path` is or `cwd` is known, else relative
    ('.' for the working directory itself). Raises ValueError when it cannot be proven."""
    if not path:
        raise ValueError("empty path")
    if any(c in path for c in "\0\n\r"):
        raise ValueError("NUL or newline in a path")
    if path.startswith("~"):
        raise ValueError("~ (a home directory) cannot be proven")
    if not path.startswith("/") and cwd is not None:
        path = posixpath.join(cwd, path)
    norm = posixpath.normpath(path)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    if norm == ".." or norm.startswith("../"):
        raise ValueError("climbs out of the working directory with ..")
    return norm


def _under(path: str, root: str) -> bool:
    if root == ".":
        return not path.startswith("/")
    if root == "/":
        return path.startswith("/")
    return path == root or path.startswith(root + "/")


def _matches_root(path: str, root: str) -> bool:
    """root: `dir/**` (the directory and everything below), or a path whose components
    may hold * ? [ ] (never crossing a /)."""
    if root.endswith("/**"):
        base = root[:-3] or "/"
        return _under(path, base)
    if root == "**":
        return True
    p, r = path.split("/"), root.split("/")
    return len(p) == len(r) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(p, r))


def _root_form(root: str, cwd: str | None) -> str:
    star = root.endswith("/**")
    base = root[:-3] if star else root
    try:
        base = normalise(base or "/", cwd)
    except ValueError:
        return root
    return (base.rstrip("/") + "/**") if star else base


def literal_prefix(path: str) -> str:
    """The directory part before the first glob character (`src/*.py` -> `src`)."""
    parts = path.split("/")
    keep = []
    for part in parts:
        if any(c in part for c in _GLOB):
            break
        keep.append(part)
    return "/".join(keep) or ("/" if path.startswith("/") else ".")


def check(path: str, access: str, roots: Roots, protected: tuple[str, ...] = (), glob: bool = False) -> str | None:
    """Why `path` may not be read / written under `roots`, or None when it may."""
    try:
        if glob:
            # `..` written out, or a component like `.*` / `.?` that the shell matches to `..`
            if any(c == ".." or (c[:1] == "." and fnmatch.fnmatchcase("..", c)) for c in path.split("/")):
                return f"{path}: a glob with .. cannot be proven"
            norm = normalise(literal_prefix(path), roots.cwd)
        else:
            norm = normalise(path, roots.cwd)
    except ValueError as e:
        return f"{path}: {e}"
    allowed = roots.read if access == "read" else roots.write
    cwd = roots.cwd
    if allowed is not None:
        forms = [_root_form(r, cwd) for r in allowed]
        # a glob expands below its literal prefix: only a `dir/**` root covers all of it
        ok = any(_under(norm, f[:-3] or "/") for f in forms if f.endswith("/**")) if glob else \
            any(_matches_root(norm, f) for f in forms)
        if not ok:
            return f"{path}: outside the {access} roots ({', '.join(allowed) or 'none'})"
    for p in protected:
        # inside a protected directory, or a directory a recursive read would descend into it
        if norm.startswith("/") and (_under(norm, p) or _under(p, norm)):
            return f"{path}: the gateway's own files (secrets, rules, recordings) are never {access}able"
    if not norm.startswith("/") and norm.split("/")[0] in {posixpath.basename(p) for p in protected}:
        # the upstream's working directory is unknown: it may be the gateway's checkout
        return (f"{path}: names a directory like the gateway's own ({norm.split('/')[0]}) relative to an "
                "undeclared working directory; declare cwd: in the rule")
    return _resolved(norm, access, roots, protected, allowed)


def _resolved(norm: str, access: str, roots: Roots, protected: tuple[str, ...],
              allowed: tuple[str, ...] | None) -> str | None:
    """Symlinks, when the path exists here (a local upstream): the real path must pass too."""
    if not norm.startswith("/"):
        return None
    real = os.path.realpath(norm)
    if real == norm:
        return None
    for p in protected:
        if _under(real, p) or _under(p, real):
            return f"{norm}: a symlink leads into the gateway's own files"
    if allowed is not None:
        forms = [_root_form(r, roots.cwd) for r in allowed]
        if not any(_matches_root(real, f) for f in forms):
            return f"{norm}: a symlink leads outside the {access} roots"
    return None


def protected_dirs(*paths: str | None) -> tuple[str, ...]:
    """Absolute, symlink-resolved forms of the gateway's own directories, plus the repo's."""
    out: list[str] = []
    for p in (*REPO_PROTECTED, *paths):
        if not p:
            continue
        for form in (os.path.abspath(p), os.path.realpath(p)):
            if form not in out:
                out.append(form)
    return tuple(out)


def credential_files(rules_dir: str, sources: list[str]) -> list[str]:
    """Paths of `file:` credentials as connections.yaml names them (relative: rules dir or cwd)."""
    out = []
    for src in sources:
        kind, _, ref = src.partition(":")
        if kind == "file" and ref:
            out += [ref] if os.path.isabs(ref) else [os.path.join(rules_dir, ref), os.path.abspath(ref)]
    return out
