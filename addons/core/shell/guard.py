"""Blocklist matching over normalised strings (pure).

Attackers hide commands from naive matching with quoting (`n''c`), escapes (`\\n\\c`,
`$'\\x6e\\x63'`), `$IFS`, encodings (percent, base64, \\u escapes) and case. Every string is
expanded into a bounded set of *views* (raw, decoded, de-obfuscated, folded) and a pattern
matches if it matches any view. This is a heuristic layer on top of allow-lists: it catches
the well-known shapes of dangerous commands, it is not a shell parser and never a reason to
allow something.
"""
from __future__ import annotations

import base64
import binascii
import codecs
import fnmatch
import json
import re
import shlex
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

MAX_VIEWS = 64
MAX_DEPTH = 3
MAX_LEN = 256 * 1024

_B64_BLOB = re.compile(r"(?<![A-Za-z0-9+/=_-])([A-Za-z0-9+/_-]{8,}={0,2})(?![A-Za-z0-9+/=_-])")
_ESCAPE = re.compile(r"\\u\{?([0-9a-fA-F]{4})\}?|\\U([0-9a-fA-F]{8})|\\x([0-9a-fA-F]{2})")
# $'\x72m' (bash ANSI-C quoting) spells a word the scan would not see
_ANSI_C = re.compile(r"\$'((?:[^'\\]|\\.)*)'")
# ${IFS}, $@, $9: expand to a space or nothing between the letters of a word
_IFS = re.compile(r"\$\{IFS(?:[^}]*)\}|\$IFS\b|\$\{?9\}?|\$@|\$\*")
_EMPTY_SUBST = re.compile(r"\$\(\s*\)|`\s*`|\$\{[A-Za-z_][A-Za-z0-9_]*:0:0\}")
# a=r; b=m; $a$b: variables assigned in the same line are substituted
_VAR_ASSIGN = re.compile(r"(?:^|[;&|\s])([A-Za-z_][A-Za-z0-9_]*)=(\"[^\"]*\"|'[^']*'|[^\s;&|]+)")
_WS = re.compile(r"\s+")


@dataclass(frozen=True)
class Pattern:
    name: str
    regex: re.Pattern
    category: str
    description: str = ""


@dataclass(frozen=True)
class Hit:
    pattern: str
    category: str
    path: str            # where in the arguments (JSON-ish path), never the value


def _unescape_ansi_c(m: re.Match) -> str:
    try:
        return codecs.decode(m.group(1).encode("latin-1", "backslashreplace"), "unicode_escape")
    except (UnicodeDecodeError, ValueError):
        return m.group(1)


def _expand_vars(s: str) -> str:
    """a=/dev/tcp; b=nc; $b -e … -> substitute simple assignments (bounded)."""
    assigns = dict((k, v.strip("'\"")) for k, v in _VAR_ASSIGN.findall(s)[:32])
    if not assigns:
        return s
    def sub(m: re.Match) -> str:
        return assigns.get(m.group(1) or m.group(2), m.group(0))
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", sub, s)


def deobfuscate(s: str) -> str:
    """What a shell would most likely execute, for matching purposes."""
    s = _ANSI_C.sub(_unescape_ansi_c, s)
    s = _EMPTY_SUBST.sub("", s)
    s = _expand_vars(s)
    s = _IFS.sub(" ", s)
    s = s.replace("\\\n", "")
    s = re.sub(r"\\(.)", r"\1", s)           # backslash escapes: \n\c -> nc
    s = s.replace("'", "").replace('"', "")   # quotes split words: n''c -> nc
    s = _WS.sub(" ", s)
    return s.strip()


# Programs worth resolving when a command names them by a glob (/bin/n? -e, /usr/bin/py*3):
# the shell expands the glob to a real binary, so match what it would most likely start.
GLOB_TARGETS = ("nc", "ncat", "netcat", "socat", "bash", "sh", "dash", "zsh", "ksh", "python", "python3",
                "perl", "ruby", "php", "lua", "node", "curl", "wget", "rm", "dd", "mkfs", "crontab",
                "base64", "telnet", "openssl", "busybox", "powershell", "pwsh")
# a word in command position (start, or after ; & | ( or a newline) containing ? * or [
_GLOB_WORD = re.compile(r"(^|[;&|(\n]\s*)((?:[\w.\-?*\[\]]*/)*)([\w.\-]*[?*\[][\w.\-?*\[\]]*)(?=\s|$)")


# unambiguous (no character both in an item and a separator): linear, no backtracking blow-up
_BRACE = re.compile(r"\{([^{}\s,]*(?:,[^{}\s,]*)+)\}")
# /bin//sh, /bin/./sh and `rm -rf /.` name what they would without the extra spelling:
# dot segments, repeated slashes, a trailing /. or /.. all become one /
_REDUNDANT_PATH = tuple(re.compile(p) for p in (r"/(?:\.{1,2}/)+", r"/{2,}", r"(?<!\S)/\.{1,2}(?=[\s;&|)]|$)"))
# ${HOME:0:1} is "/"
_ROOT_SLICE = re.compile(r"\$\{(?:PATH|HOME|PWD|OLDPWD|SHELL):0:1\}")


def _strip_block_comments(s: str) -> str:
    """Remove /* ... */ in one pass (a regex would rescan to the end for every unclosed /*)."""
    out, i = [], 0
    while (start := s.find("/*", i)) != -1:
        end = s.find("*/", start + 2)
        if end == -1:
            break
        out.append(s[i:start] + " ")
        i = end + 2
    out.append(s[i:])
    return "".join(out)


def _expand(s: str) -> str:
    """What bash expansions and SQL comments turn the text into: brace lists
    ({nc,-e,sh} -> nc -e sh), one-character slices of a path variable (${PATH:0:1} -> /),
    /**/ comments (COPY t TO/**/PROGRAM), and redundant path spellings (/dev//tcp,
    /dev/./tcp, rm -rf /. -> /)."""
    # substring tests first: most arguments need none of these rewrites (hot path)
    if "{" in s and "," in s:
        s = _BRACE.sub(lambda m: m.group(1).replace(",", " "), s)
    if "${" in s:
        s = _ROOT_SLICE.sub("/", s)
    if "/*" in s:
        s = _strip_block_comments(s)
    if "/." in s or "//" in s:
        for rx in _REDUNDANT_PATH:
            s = rx.sub("/", s)
    return s


def _unglob(s: str) -> str:
    """Replace a globbed program name by the first dangerous program it matches."""
    def sub(m: re.Match) -> str:
        name = m.group(3)
        hit = next((p for p in GLOB_TARGETS if fnmatch.fnmatchcase(p, name.lower())), None)
        return m.group(1) + m.group(2) + hit if hit and name.strip("*") else m.group(0)
    return _GLOB_WORD.sub(sub, s) if ("?" in s or "*" in s or "[" in s) else s


def _decodings(s: str) -> Iterator[str]:
    if "%" in s:
        d = urllib.parse.unquote(s)
        if d != s:
            yield d
    if "\\u" in s or "\\x" in s:
        try:
            yield json.loads('"' + s.replace('"', '\\"') + '"') if "\\u" in s else s
        except ValueError:
            pass
        try:
            yield codecs.decode(s.encode("latin-1", "backslashreplace"), "unicode_escape")
        except (UnicodeDecodeError, ValueError):
            pass
        # the escapes alone, whatever else is malformed around them (a stray backslash
        # must not make the whole string undecodable)
        yield _ESCAPE.sub(lambda m: chr(int(m.group(1) or m.group(2) or m.group(3), 16)), s)
    for m in _B64_BLOB.finditer(s):
        blob = m.group(1)
        for dec in (base64.b64decode, base64.urlsafe_b64decode):
            try:
                raw = dec(blob + "=" * (-len(blob) % 4))
                text = raw.decode("utf-8")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                continue
            if text.isprintable() or "\n" in text:
                yield text
                break


def views(s: str) -> list[str]:
    """Bounded set of normalised views of one string."""
    s = s[:MAX_LEN]
    seen: list[str] = []
    frontier = [s]
    for _ in range(MAX_DEPTH):
        nxt: list[str] = []
        for v in frontier:
            d = deobfuscate(v)
            # no lower-cased copies: blocklist patterns are compiled case-insensitive
            for c in (v, d, _unglob(_expand(d)), *_decodings(v)):
                if c not in seen and len(seen) < MAX_VIEWS:
                    seen.append(c)
                    nxt.append(c)
        frontier = nxt
        if not frontier:
            break
    return seen


def iter_strings(obj: Any, path: str = "$") -> Iterator[tuple[str, str]]:
    """Every string (keys too) in a JSON value, with its path."""
    stack = [(obj, path)]
    while stack:
        node, p = stack.pop()
        if isinstance(node, str):
            yield p, node
        elif isinstance(node, dict):
            for k, v in node.items():
                yield f"{p}.{k}(key)", str(k)
                stack.append((v, f"{p}.{k}"))
        elif isinstance(node, list):
            stack.extend((v, f"{p}[{i}]") for i, v in enumerate(node))


class ScanCache:
    """Bounded memo of the blocklist verdict per string, for one pattern set.

    Tool names, keys and common argument values repeat on every call; their views and
    ~50 regex searches each are the policy's largest per-request cost. Only short strings
    are kept, and the oldest entry goes when the cache is full."""

    def __init__(self, max_entries: int = 4096, max_len: int = 512):
        self.max_entries, self.max_len = max_entries, max_len
        self._verdicts: dict[str, tuple[str, str] | None] = {}

    def __len__(self) -> int:
        return len(self._verdicts)

    def verdict(self, s: str, pats: list[Pattern]) -> tuple[str, str] | None:
        """(pattern name, category) of the first pattern any view of s matches, or None."""
        if len(s) > self.max_len:
            return _first_match(s, pats)
        try:
            return self._verdicts[s]
        except KeyError:
            pass
        v = _first_match(s, pats)
        if len(self._verdicts) >= self.max_entries:
            del self._verdicts[next(iter(self._verdicts))]
        self._verdicts[s] = v
        return v


def _first_match(s: str, pats: list[Pattern]) -> tuple[str, str] | None:
    for v in views(s):
        for p in pats:
            if p.regex.search(v):
                return p.name, p.category
    return None


class ScanBudgetExceeded(Exception):
    """The scan ran past its deadline: the arguments were not checked, so the call is refused."""


def text_size(obj: Any, limit: int) -> int:
    """Characters of all strings (keys too) in a JSON value; stops counting past `limit`."""
    total, stack = 0, [obj]
    while stack and total <= limit:
        node = stack.pop()
        if isinstance(node, str):
            total += len(node)
        elif isinstance(node, dict):
            total += sum(len(str(k)) for k in node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return total


def scan(arguments: Any, patterns: Iterable[Pattern], cache: ScanCache | None = None,
         deadline: float | None = None) -> Hit | None:
    """First blocklist hit in any string of `arguments`, or None. `cache` must belong to
    this pattern set. Past `deadline` (time.monotonic()) raises ScanBudgetExceeded."""
    pats = list(patterns)
    for path, s in iter_strings(arguments):
        if deadline is not None and time.monotonic() > deadline:
            raise ScanBudgetExceeded()
        v = cache.verdict(s, pats) if cache is not None else _first_match(s, pats)
        if v is not None:
            return Hit(v[0], v[1], path)
    return None


# --- allow-list checks (`shell:` rule predicate) ------------------------------------

_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
# programs that run the command given to them: the wrapped program counts as run too
WRAPPERS = frozenset({"sudo", "doas", "env", "nohup", "nice", "ionice", "time", "exec", "command", "builtin",
                      "timeout", "stdbuf", "xargs", "setsid", "chroot", "unbuffer", "watch", "strace"})


@dataclass(frozen=True)
class ShellInfo:
    programs: tuple[str, ...]   # basenames of every program a shell would start (wrapped ones too)
    operators: bool             # ; && || | & ( ) redirects, newlines, $( ) ` ` <( ) — anything but one simple command
    parsed: bool = True         # False: the shell itself would not parse it (unbalanced quotes)


def _program(tokens: list[str], i: int) -> tuple[list[str], int]:
    """Programs started by the simple command at tokens[i:], and the index after it.
    Redirection targets are skipped; after a wrapper (sudo, env, xargs, ...) every
    further word counts as a program it may run (its options are not known here)."""
    progs: list[str] = []
    wrapped = False
    while i < len(tokens) and (not _is_op(tokens[i]) or _is_redirect(tokens[i])):
        t = tokens[i]
        if _is_redirect(t):
            i += 2                                   # the operator and its file
            continue
        if t.isdigit() and i + 1 < len(tokens) and _is_redirect(tokens[i + 1]):
            i += 1                                   # file descriptor of a redirection (2>)
            continue
        if (not progs or wrapped) and not _ASSIGN.match(t) and not (wrapped and t.startswith("-")):
            name = t.rsplit("/", 1)[-1]
            progs.append(name)
            wrapped = wrapped or name in WRAPPERS
        i += 1
    return progs, i


def _is_redirect(tok: str) -> bool:
    return _is_op(tok) and ("<" in tok or ">" in tok)


def _is_op(tok: str) -> bool:
    return bool(tok) and all(c in ";&|<>()" for c in tok)


def shell_info(command: str) -> ShellInfo:
    """Parse a command line the way a POSIX shell splits it (quotes, backslashes)."""
    substitution = any(x in command for x in ("`", "$(", "<(", ">(", "${"))
    multiline = "\n" in command or "\r" in command
    lex = shlex.shlex(command.replace("\r", "\n").replace("\n", " ; "), posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    try:
        tokens = list(lex)
    except ValueError:
        return ShellInfo((), True, parsed=False)
    programs: list[str] = []
    ops = substitution or multiline or any(_is_op(t) for t in tokens)
    i = 0
    while i < len(tokens):
        if _is_op(tokens[i]) and not _is_redirect(tokens[i]):
            i += 1
            continue
        progs, i = _program(tokens, i)
        programs += progs
    return ShellInfo(tuple(programs), ops)
