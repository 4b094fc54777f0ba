"""Loading rules files with ruamel.yaml: file:line errors and change detection.

Pure apart from file I/O. Every rules module (connections, policy, masking, ...)
loads through `load_yaml` so errors always read `rules/x.yaml:12: message`.
"""
from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from addons.core.textsafe import get_logger


class RulesError(Exception):
    """A rules file is invalid. str() is `file:line: message`."""

    def __init__(self, file: str | os.PathLike, line: int | None, message: str):
        self.file = str(file)
        self.line = line
        self.message = message
        loc = f"{self.file}:{line}" if line else self.file
        super().__init__(f"{loc}: {message}")


def _yaml() -> YAML:
    y = YAML(typ="rt")  # round-trip loader keeps line numbers (.lc)
    y.allow_duplicate_keys = False
    return y


def load_yaml(path: str | os.PathLike) -> Any:
    """Parse one YAML file; raise RulesError with file:line on any syntax problem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RulesError(p, None, "file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RulesError(p, None, f"cannot read: {e}") from None
    try:
        return _yaml().load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else None
        msg = " ".join(str(x) for x in (e.context, e.problem) if x)
        raise RulesError(p, line, msg or "YAML syntax error") from None
    except YAMLError as e:
        raise RulesError(p, None, str(e)) from None


def line_of(node: Any, key: Any = None) -> int | None:
    """1-based line of a mapping key / sequence item / node, when ruamel knows it."""
    try:
        if key is not None and isinstance(node, (CommentedMap, CommentedSeq)):
            if isinstance(node, CommentedMap):
                return node.lc.key(key)[0] + 1
            return node.lc.item(key)[0] + 1
        return node.lc.line + 1
    except (AttributeError, KeyError, IndexError, TypeError):
        return None


@dataclass
class Located:
    """Helper to raise RulesError for a node inside a file."""

    file: str

    def error(self, node: Any, message: str, key: Any = None) -> RulesError:
        return RulesError(self.file, line_of(node, key), message)

    def check_keys(self, node: Any, allowed: Iterable[str], what: str = "", context: str = "") -> None:
        """Refuse keys a section does not know, at the line of the first one (a typo must not
        silently drop a rule): "<context>unknown <what>key(s): a, b (expected one of …)"."""
        allowed = set(allowed)
        unknown = sorted(set(map(str, node)) - allowed)
        if unknown:
            raise self.error(node, f"{context}unknown {what}key(s): {', '.join(unknown)} "
                                   f"(expected one of {', '.join(sorted(allowed))})", unknown[0])


def to_plain(node: Any) -> Any:
    """Convert ruamel containers to plain dict/list (after validation)."""
    if isinstance(node, dict):
        return {str(k): to_plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [to_plain(v) for v in node]
    return node


class ChangeWatcher:
    """Tracks (mtime_ns, size) of a set of files; `changed()` says if any moved.

    Polling keeps this portable and dependency-free; callers poll every ~0.5 s
    from an asyncio task so edits take effect well inside 2 s.
    """

    def __init__(self, paths: Callable[[], Iterable[Path]]):
        self._paths = paths
        self._seen = self._snapshot()

    def _snapshot(self) -> dict[str, tuple[int, int] | None]:
        snap: dict[str, tuple[int, int] | None] = {}
        for p in self._paths():
            try:
                st = p.stat()
                snap[str(p)] = (st.st_mtime_ns, st.st_size)
            except OSError:
                snap[str(p)] = None
        return snap

    def changed(self) -> bool:
        now = self._snapshot()
        if now != self._seen:
            self._seen = now
            return True
        return False


def rules_files(rules_dir: str | os.PathLike, name: str) -> list[Path]:
    """`rules/<name>.yaml` plus `rules/<name>.d/*.yaml`, sorted, when present."""
    d = Path(rules_dir)
    out = [d / f"{name}.yaml"]
    extra = d / f"{name}.d"
    if extra.is_dir():
        out += sorted(extra.glob("*.yaml"))
    return out


RELOAD_INTERVAL = 0.5  # seconds; edits take effect well inside the promised 2 s


async def poll_forever(check: Callable[[], object], interval: float = RELOAD_INTERVAL) -> None:
    """Hot-reload loop shared by every addon: call `check` every `interval`. An exception
    is logged and the loop goes on (the last good rules stay in force)."""
    while True:
        await asyncio.sleep(interval)
        try:
            check()
        except Exception:  # noqa: BLE001 - a reload bug must not end reloading
            get_logger("bastion.rules").exception("reload check failed")


class RulesWatch:
    """The one hot-reload helper for every rules, key and secret file: watches a set of
    files and runs `on_change` from a poll task every RELOAD_INTERVAL (no stat() on the
    request path). `check()` is what the poll runs (tests call it to skip the wait)."""

    def __init__(self, on_change: Callable[[], object]) -> None:
        self.on_change = on_change
        self._watcher: ChangeWatcher | None = None
        self._task: asyncio.Task | None = None

    def watch(self, paths: Callable[[], Iterable[Path]]) -> None:
        self._watcher = ChangeWatcher(paths)

    def unwatch(self) -> None:
        self._watcher = None

    @property
    def watching(self) -> bool:
        return self._watcher is not None

    def start(self) -> None:
        if self._task is None:                   # one poll, however many stages share it
            self._task = asyncio.get_running_loop().create_task(poll_forever(self.check))

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def check(self) -> object:
        """on_change's result if a file moved, else None."""
        if self._watcher is not None and self._watcher.changed():
            return self.on_change()
        return None
