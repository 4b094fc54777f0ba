"""The one glob matcher of the rules (connection, tool, principal, client names): fnmatch
semantics, case-sensitive, compiled once per glob list."""
from __future__ import annotations

import fnmatch
import re
from functools import lru_cache
from typing import Callable, Iterable


@lru_cache(maxsize=4096)
def glob_matcher(globs: tuple[str, ...]) -> Callable[[str], bool]:
    """One compiled test per glob list (rules are compiled once; this runs per request):
    exact names by set lookup, wildcards by one combined regex."""
    exact = frozenset(g for g in globs if not any(c in g for c in "*?["))
    wild = [g for g in globs if g not in exact]
    rx = re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in wild)) if wild else None
    if rx is None:
        return exact.__contains__
    return lambda v: v in exact or rx.match(v) is not None


def matches_any(value: str | None, globs: Iterable[str]) -> bool:
    return value is not None and glob_matcher(tuple(globs))(value)
