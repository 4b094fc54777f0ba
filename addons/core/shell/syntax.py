"""A command line split the way a POSIX shell splits it, keeping what quoting hid (pure).

`shlex` drops the quotes, so afterwards `'x$'` and `$HOME`, `'*.py'` and `*.py`, `'|'` and
`|` look alike. The shell policy needs to know which words the shell will still expand
(variables, globs, `~`) and which characters are operators, so this lexer tracks the
quoting of every character. It accepts a deliberately small subset of sh: anything it
does not understand (substitutions, here-documents, subshells, comments) is reported as
such and the policy refuses it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_COMMAND = 64 * 1024      # longer command lines are refused (bounded work)
MAX_WORDS = 4096

# longest first: the lexer takes the longest operator at a position
_OPERATORS = ("&>>", "<<<", "<<-", "&&", "||", ";;", "|&", ">>", ">|", "<>", "<<", ">&", "<&", "&>",
              "|", "&", ";", "<", ">", "(", ")")
_OP_START = frozenset("".join(_OPERATORS))
REDIRECTS = frozenset({"<", ">", ">>", ">|", "<>", "<<", "<<-", "<<<", ">&", "<&", "&>", "&>>"})
# list operator -> the name rules use in `operators:`
CONNECTORS = {"|": "pipe", "|&": "pipe", "&&": "and", "||": "or", ";": "sequence", "\n": "sequence",
              "&": "background"}
_EXPANSION = re.compile(r"[A-Za-z_0-9{(@*#?$!\-'\"]")


class SyntaxRefused(ValueError):
    """The command uses shell syntax the policy cannot reason about."""


@dataclass
class Word:
    text: str                    # after quote removal
    glob: bool = False           # an unquoted * ? [ or {a,b} the shell expands
    tilde: bool = False          # unquoted ~ at the start
    brace: bool = False          # an unquoted {a,b} / {1..9}: one word becomes several
    fd: bool = False             # digits directly before a redirection (2>)


@dataclass
class Redirect:
    op: str
    target: Word


@dataclass
class Simple:
    words: list[Word] = field(default_factory=list)
    redirects: list[Redirect] = field(default_factory=list)


@dataclass
class CommandList:
    commands: list[Simple]
    connectors: list[str]        # names from CONNECTORS, between commands (and a trailing `&`)


def _lex(command: str) -> list[Word | str]:
    """Words and operator strings. Raises SyntaxRefused."""
    out: list[Word | str] = []
    i, n = 0, len(command)
    word: list[str] | None = None
    glob = tilde = brace = False
    last_close = command.rfind("}")

    def end_word() -> None:
        nonlocal word, glob, tilde, brace
        if word is not None:
            out.append(Word("".join(word), glob or brace, tilde, brace=brace))
        word, glob, tilde, brace = None, False, False, False

    while i < n:
        c = command[i]
        if c in " \t":
            end_word()
            i += 1
            continue
        if c in "\n\r":
            end_word()
            out.append("\n")
            i += 1
            continue
        if c == "\0":
            raise SyntaxRefused("NUL character in the command")
        if word is None and c == "#":
            raise SyntaxRefused("comments are not accepted")
        op = next((o for o in _OPERATORS if command.startswith(o, i)), None) if c in _OP_START else None
        if op is not None:
            if op in ("<", ">") and command.startswith("(", i + 1):
                raise SyntaxRefused("process substitution <( ) / >( ) is not accepted")
            if word is not None and op in REDIRECTS and "".join(word).isdigit() and not glob:
                out.append(Word("".join(word), fd=True))      # 2> : a file descriptor, not a word
                word = None
            end_word()
            out.append(op)
            i += len(op)
            continue
        if word is None:
            word = []
            tilde = c == "~"
        if c == "\\":
            if i + 1 < n and command[i + 1] == "\n":
                i += 2                                   # line continuation
                continue
            if i + 1 >= n:
                raise SyntaxRefused("trailing backslash")
            word.append(command[i + 1])
            i += 2
            continue
        if c == "'":
            j = command.find("'", i + 1)
            if j < 0:
                raise SyntaxRefused("unbalanced single quote")
            word.append(command[i + 1:j])
            i = j + 1
            continue
        if c == '"':
            i = _double_quoted(command, i + 1, word)
            continue
        if c == "`":
            raise SyntaxRefused("command substitution ` ` is not accepted")
        if c == "$" and i + 1 < n and _EXPANSION.match(command[i + 1]):
            raise SyntaxRefused("variables and substitutions ($...) are not accepted: their value is not known")
        if c in "*?[":
            glob = True
        elif c == "{" and last_close > i:
            brace = True                         # conservatively: any unquoted { with a } after it
        word.append(c)
        i += 1
    end_word()
    return out


def _double_quoted(command: str, i: int, word: list[str]) -> int:
    """Append the inside of "..." starting at i; return the index after the closing quote."""
    n = len(command)
    while i < n:
        c = command[i]
        if c == '"':
            return i + 1
        if c == "`":
            raise SyntaxRefused("command substitution ` ` is not accepted")
        if c == "$" and i + 1 < n and _EXPANSION.match(command[i + 1]) and command[i + 1] not in "'\"":
            raise SyntaxRefused("variables and substitutions ($...) are not accepted: their value is not known")
        if c == "\\" and i + 1 < n and command[i + 1] in '$`"\\\n':
            if command[i + 1] != "\n":
                word.append(command[i + 1])
            i += 2
            continue
        if c == "\0":
            raise SyntaxRefused("NUL character in the command")
        word.append(c)
        i += 1
    raise SyntaxRefused("unbalanced double quote")


def parse(command: str) -> CommandList:
    """The list of simple commands and the operators between them. Raises SyntaxRefused."""
    if len(command) > MAX_COMMAND:
        raise SyntaxRefused(f"command longer than {MAX_COMMAND} characters")
    tokens = _lex(command)
    if len(tokens) > MAX_WORDS:
        raise SyntaxRefused(f"more than {MAX_WORDS} words")
    commands: list[Simple] = [Simple()]
    connectors: list[str] = []
    i = 0
    while i < len(tokens):
        t = tokens[i]
        cur = commands[-1]
        if isinstance(t, Word) and t.fd:
            t = tokens[i + 1]                            # the redirection it belongs to
            i += 1
        if isinstance(t, Word):
            cur.words.append(t)
        elif t in REDIRECTS:
            if t in ("<<", "<<-"):
                raise SyntaxRefused("here-documents are not accepted")
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            if not isinstance(nxt, Word):
                raise SyntaxRefused(f"redirection {t} without a target")
            cur.redirects.append(Redirect(t, nxt))
            i += 1
        elif t in CONNECTORS:
            if not cur.words and not cur.redirects:
                if t == "\n" and not connectors:
                    i += 1
                    continue                             # blank leading line
                if t == "\n" and commands and connectors and connectors[-1] in ("and", "or", "pipe"):
                    i += 1
                    continue                             # `a &&\n b` continues the list
                raise SyntaxRefused(f"operator {t.strip() or 'newline'} without a command before it")
            connectors.append(CONNECTORS[t])
            commands.append(Simple())
        else:
            raise SyntaxRefused(f"{t!r} (subshells, case) is not accepted")
        i += 1
    if not commands[-1].words and not commands[-1].redirects:
        commands.pop()
        if connectors and connectors[-1] not in ("sequence", "background"):
            raise SyntaxRefused("the command ends with an operator")
        if connectors and connectors[-1] == "sequence":
            connectors.pop()                              # `ls;` / trailing newline
    if not commands:
        raise SyntaxRefused("empty command")
    return CommandList(commands, connectors)
