"""Caller-chosen text made safe for a person to read: one helper for logs, CLI tables and
mitmweb comments (pure, no mitmproxy).

A token's `sub`, a tool name or an argument may carry a newline (a forged log line), an
ANSI escape sequence (rewrites the operator's terminal), or invisible / bidi-reordering
characters (text that reads differently from what it is). `esc` shows each of them as a
visible escape (`\n`, `\x1b`, `\u202e`); nothing else changes.
"""
from __future__ import annotations

import logging
import re
from typing import Any

# C0 and C1 controls, DEL, line/paragraph separators, zero-width and bidi control
# characters, word joiners, the BOM.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
# json.dumps escapes C0 controls inside strings itself; its raw \t \n \r are indentation
_JSON_UNSAFE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _one(m: re.Match) -> str:
    c = m.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def _json_one(m: re.Match) -> str:
    return f"\\u{ord(m.group()):04x}"


def esc(value: Any, json_text: bool = False) -> str:
    """`value` as text with every control, invisible or reordering character escaped.
    json_text: `value` is JSON; use JSON's \\uXXXX form so it stays valid JSON."""
    text = value if isinstance(value, str) else str(value)
    return _JSON_UNSAFE.sub(_json_one, text) if json_text else _UNSAFE.sub(_one, text)


class _EscapeFilter(logging.Filter):
    """Formats the record once and escapes the result: one event is one log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        record.msg, record.args = _UNSAFE.sub(_one, msg), None
        return True


_FILTER = _EscapeFilter()


def get_logger(name: str) -> logging.Logger:
    """logging.getLogger(name) whose messages (and their arguments) are escaped."""
    log = logging.getLogger(name)
    if _FILTER not in log.filters:
        log.addFilter(_FILTER)
    return log
