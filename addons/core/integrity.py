"""Tool integrity, pure: pinned tool definitions, look-alike names, prompt-injection
scanning and output caps (docs/integrity.md). No mitmproxy here."""
from __future__ import annotations

import difflib
import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from addons.core.rules import Located, RulesError, RulesWatch, load_yaml
from addons.core.textsafe import get_logger

log = get_logger("bastion.integrity")

PINNED_FIELDS = ("name", "title", "description", "inputSchema", "outputSchema", "annotations")
INJECTION_MODES = ("mark", "strip", "refuse", "off")
META_KEY = "io.mcp-bastion/injection"


# --- per-connection settings ------------------------------------------------------------

@dataclass(frozen=True)
class IntegrityConfig:
    require_pins: bool = False
    injection: str = "mark"           # mark | strip | refuse | off
    max_output_chars: int = 0         # 0 = no cap
    on_oversize: str = "truncate"     # truncate | refuse


def parse_integrity(loc: Located, spec: Any, name: str) -> IntegrityConfig:
    """The `integrity:` mapping of a connection in connections.yaml."""
    if spec is None:
        return IntegrityConfig()
    if not isinstance(spec, dict):
        raise loc.error(spec, f"connection {name}: integrity must be a mapping")
    loc.check_keys(spec, {"require_pins", "injection", "max_output_chars", "on_oversize"}, "integrity ", context=f"connection {name}: ")
    req = spec.get("require_pins", False)
    inj = str(spec.get("injection", "mark"))
    cap = spec.get("max_output_chars", 0)
    over = str(spec.get("on_oversize", "truncate"))
    if not isinstance(req, bool):
        raise loc.error(spec, f"connection {name}: require_pins takes true or false", "require_pins")
    if inj not in INJECTION_MODES:
        raise loc.error(spec, f"connection {name}: injection must be one of {', '.join(INJECTION_MODES)}", "injection")
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
        raise loc.error(spec, f"connection {name}: max_output_chars must be a number >= 0", "max_output_chars")
    if over not in ("truncate", "refuse"):
        raise loc.error(spec, f"connection {name}: on_oversize must be truncate or refuse", "on_oversize")
    return IntegrityConfig(req, inj, cap, over)


# --- pins ---------------------------------------------------------------------------------

def canonical(tool: dict) -> dict:
    return {k: tool[k] for k in PINNED_FIELDS if k in tool and tool[k] is not None}


def tool_hash(tool: dict) -> str:
    data = json.dumps(canonical(tool), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(data.encode()).hexdigest()


def pins_dir(rules_dir: str | Path) -> Path:
    return Path(rules_dir) / "pins"


def pins_path(rules_dir: str | Path, connection: str) -> Path:
    return pins_dir(rules_dir) / f"{connection}.yaml"


class PinStore:
    """Every connection's pin file, read once and re-read after it changes: one cache and one
    poll shared by the integrity and argument-schema stages (built by addons/bastion.py)."""

    def __init__(self) -> None:
        self.rules_dir: str | None = None
        self._pins: dict[str, tuple[int, dict | None, SkeletonIndex]] = {}
        self._stale: set[str] = set()            # connections whose pin file may have changed
        self.poll = RulesWatch(self._changed)
        self.on_repin: list[Callable[[str], None]] = []   # called with a connection re-read

    def watch(self, rules_dir: str | Path) -> None:
        if str(rules_dir) != self.rules_dir:
            self.rules_dir = str(rules_dir)
            self._pins.clear()                   # another rules directory: other pin files
            self._stale.clear()
            pins = pins_dir(rules_dir)
            self.poll.watch(lambda: sorted(pins.glob("*.yaml")))

    def _changed(self) -> None:
        self._stale.update(self._pins)           # each re-reads its file on its next use

    def get(self, connection: str) -> tuple[dict | None, SkeletonIndex]:
        """Pins of a connection and their skeleton index. A pin file that fails to load is
        an error the first time, later the last good pins are kept (and the error logged)."""
        cached = self._pins.get(connection)
        if cached is not None and connection not in self._stale:
            return cached[1], cached[2]
        self._stale.discard(connection)
        assert self.rules_dir is not None, "PinStore.watch() first"
        path = pins_path(self.rules_dir, connection)
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = -1
        if cached is None or cached[0] != mtime:
            try:
                pins = load_pins(self.rules_dir, connection)
            except RulesError as e:
                if cached is None:
                    raise
                log.error("pin file rejected, keeping the last good pins: %s", e)
                return cached[1], cached[2]
            cached = (mtime, pins, skeleton_index(pins or ()))
            self._pins[connection] = cached
            for cb in self.on_repin:
                cb(connection)
        return cached[1], cached[2]


def load_pins(rules_dir: str | Path, connection: str) -> dict[str, dict] | None:
    """name -> {hash, definition}; None when the connection has no pin file."""
    path = pins_path(rules_dir, connection)
    if not path.exists():
        return None
    data = load_yaml(path)
    loc = Located(str(path))
    if not isinstance(data, dict) or not isinstance(data.get("tools"), dict):
        raise loc.error(data, "pin file needs a 'tools' mapping (written by `mcp-bastion pin`)")
    out = {}
    for name, entry in data["tools"].items():
        if not isinstance(entry, dict) or not str(entry.get("hash", "")).startswith("sha256:"):
            raise loc.error(data["tools"], f"tool {name}: needs hash: sha256:...", name)
        definition = json.loads(entry["definition"]) if isinstance(entry.get("definition"), str) else {}
        out[str(name)] = {"hash": str(entry["hash"]), "definition": definition}
    return out


def write_pins(rules_dir: str | Path, connection: str, tools: list[dict]) -> Path:
    from ruamel.yaml import YAML
    path = pins_path(rules_dir, connection)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"connection": connection,
           "tools": {t["name"]: {"hash": tool_hash(t),
                                 "definition": json.dumps(canonical(t), sort_keys=True, ensure_ascii=False)}
                     for t in sorted(tools, key=lambda t: t["name"])}}
    yaml = YAML()
    yaml.width = 4096
    with open(path, "w") as f:
        f.write(f"# Pinned tool definitions of connection {connection}: `mcp-bastion pin {connection}` writes\n"
                "# this file; review changes with `mcp-bastion pin --diff`. A tool whose definition no\n"
                "# longer matches is hidden and its calls are refused (docs/integrity.md).\n")
        yaml.dump(doc, f)
    return path


def diff_pins(pins: dict[str, dict], tools: list[dict]) -> list[str]:
    """Unified diff of pinned vs current definitions (pretty JSON), tool by tool."""
    current = {t["name"]: canonical(t) for t in tools if isinstance(t.get("name"), str)}
    lines: list[str] = []
    for name in sorted(set(pins) | set(current)):
        old = pins.get(name, {}).get("definition")
        new = current.get(name)
        if name in pins and new is not None and pins[name]["hash"] == tool_hash(new):
            continue
        a = json.dumps(old, indent=2, sort_keys=True, ensure_ascii=False).splitlines() if old is not None else []
        b = json.dumps(new, indent=2, sort_keys=True, ensure_ascii=False).splitlines() if new is not None else []
        label = "removed" if new is None else ("new, not pinned" if old is None else "changed")
        lines.append(f"== {name}: {label}")
        lines += list(difflib.unified_diff(a, b, f"pinned/{name}", f"current/{name}", lineterm=""))
    return lines


# --- look-alike names ------------------------------------------------------------------------

# letters other scripts lend to impostors of ASCII names (Cyrillic, Greek, others); NFKC
# already folds fullwidth forms, ligatures and mathematical alphabets
_CONFUSABLE = str.maketrans({
    "а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "у": "y", "х": "x", "і": "i", "ј": "j", "ѕ": "s", "һ": "h",
    "ԁ": "d", "ɡ": "g", "ӏ": "l", "ո": "n", "ս": "u", "α": "a", "ο": "o", "ρ": "p", "ν": "v", "κ": "k", "τ": "t",
    "ι": "i", "υ": "u", "χ": "x", "ε": "e", "ı": "i", "ɑ": "a", "ℓ": "l", "‐": "-", "‑": "-", "–": "-", "_": "_",
})
_INVISIBLE = re.compile("[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
                        "\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\U000e0000-\U000e0fff]")


@lru_cache(maxsize=4096)     # pure: a tool called again is not normalised again
def skeleton(name: str) -> str:
    """What a name looks like: NFKC, invisible characters dropped, look-alikes mapped, case folded."""
    return _INVISIBLE.sub("", unicodedata.normalize("NFKC", name)).translate(_CONFUSABLE).casefold()


class SkeletonIndex(dict):
    """skeleton -> name. A type of its own so lookalike_of can tell it from a set of names
    in O(1) (checking every value on each lookup made a tools/list quadratic)."""


def skeleton_index(names) -> SkeletonIndex:
    """Built once per pin set (a 10,000-tool list stays linear)."""
    return SkeletonIndex((skeleton(n), n) for n in names)


def lookalike_of(name: str, known) -> str | None:
    """The known name this one imitates (same skeleton, different spelling), if any.
    `known`: names, or a skeleton_index of them."""
    index = known if isinstance(known, SkeletonIndex) else skeleton_index(known)
    twin = index.get(skeleton(name))
    return twin if twin is not None and twin != name else None


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.\-/]{1,128}")


def plain_name(name: str) -> bool:
    return _PLAIN_NAME.fullmatch(name) is not None


# --- prompt injection ----------------------------------------------------------------------

INJECTION_PATTERNS = [
    ("override", re.compile(r"\b(ignore|disregard|forget|override)\s+(all\s+|any\s+|the\s+)?(previous|prior|above|earlier|"
                            r"preceding|other|system)\s+(instructions|prompts?|rules|directions|messages)", re.I)),
    ("secrecy", re.compile(r"\b(do\s+not|don'?t|never|without)\s+(tell|telling|inform|informing|mention|mentioning|"
                           r"reveal|revealing|alert|alerting)\s+(the\s+)?(user|human|operator)", re.I)),
    ("role-hijack", re.compile(r"(<\s*/?\s*(system|assistant|instructions?|important)\s*>|\bnew\s+system\s+prompt\b|"
                               r"\byou\s+are\s+now\s+(in\s+)?(developer|admin|god|jailbreak)\s+mode\b)", re.I)),
    ("exfiltration", re.compile(r"\b(send|post|upload|forward|exfiltrate|transmit)\b[^\n]{0,80}?\b(to|into)\s+"
                                r"(https?://|[\w.-]+@[\w-]+\.)", re.I)),
    ("image-beacon", re.compile(r"!\[[^\]]*\]\(\s*https?://[^)\s]*\?[^)\s]*=[^)]*\)", re.I)),
    ("hidden-tags", re.compile("[\U000e0000-\U000e007f]+")),
    ("zero-width", re.compile("[\u200b-\u200d\u2060\u2062-\u2064\ufeff]+")),
]


@dataclass(frozen=True)
class Finding:
    kind: str
    start: int
    end: int


# words each pattern needs (lower case), so most text is dismissed by substring tests
# instead of case-insensitive regex scans (a 256 KiB result: ~17 ms -> ~1 ms); None:
# patterns for invisible characters, which ASCII text cannot hold
_NEEDS: dict[str, tuple[str, ...] | None] = {
    "override": ("ignore", "disregard", "forget", "override"),
    "secrecy": ("tell", "inform", "mention", "reveal", "alert"),
    "role-hijack": ("system", "assistant", "instruction", "important", "you are now"),
    "exfiltration": ("send", "post", "upload", "forward", "exfiltrate", "transmit"),
    "image-beacon": ("](",),
    "hidden-tags": None,
    "zero-width": None,
}


def scan(text: str) -> list[Finding]:
    out = []
    low, ascii_only = text.lower(), text.isascii()
    for kind, rx in INJECTION_PATTERNS:
        needs = _NEEDS[kind]
        if (ascii_only if needs is None else not any(w in low for w in needs)):
            continue
        out += [Finding(kind, m.start(), m.end()) for m in rx.finditer(text)]
    return sorted(out, key=lambda f: f.start)


DESCRIPTION_MEMO_CHARS = 2048     # descriptions up to this long have their scan remembered


@lru_cache(maxsize=2048)
def _scan_memo(text: str) -> tuple[Finding, ...]:
    return tuple(scan(text))


def scan_description(text: str) -> list[Finding]:
    """scan() of a tool description: the same descriptions come back in every tools/list,
    so short ones are scanned once (bounded memo of a pure function)."""
    return list(_scan_memo(text)) if len(text) <= DESCRIPTION_MEMO_CHARS else scan(text)


def strip(text: str, findings: list[Finding]) -> str:
    """Remove the offending spans (hidden characters vanish; phrases become a marker)."""
    out, pos = [], 0
    for f in findings:
        if f.start < pos:
            continue
        out.append(text[pos:f.start])
        if f.kind not in ("hidden-tags", "zero-width"):
            out.append("[removed by mcp-bastion]")
        pos = f.end
    out.append(text[pos:])
    return "".join(out)


# --- output cap ------------------------------------------------------------------------------
# The cap applies to each representation of a result: the text blocks together, and the
# structuredContent as JSON (tools usually return both, with the same data).

def _marker(total: int, cap: int) -> str:
    return f"[truncated by mcp-bastion: {total} characters, limit {cap}]"


def result_size(result: dict) -> int:
    text = sum(len(b["text"]) for b in result.get("content") or []
               if isinstance(b, dict) and isinstance(b.get("text"), str))
    structured = len(json.dumps(result["structuredContent"], ensure_ascii=False)) if "structuredContent" in result else 0
    return max(text, structured)


def truncate_result(result: dict, cap: int) -> dict | None:
    """Each representation cut to `cap` characters with an explicit marker, JSON and
    schema types intact (strings stay strings); None when that is impossible."""
    total = result_size(result)
    out = dict(result)
    budget, blocks, marked = cap, [], False
    for block in result.get("content") or []:
        if isinstance(block, dict) and isinstance(block.get("text"), str):
            text = block["text"]
            if len(text) > budget:
                text = text[:budget] + ("" if marked else "\n" + _marker(total, cap))
                marked = True
            budget = max(0, budget - len(text))
            block = {**block, "text": text}
        blocks.append(block)
    if "content" in result:
        out["content"] = blocks
    if "structuredContent" in result:
        cut = _cut_structured(result["structuredContent"], cap, _marker(total, cap))
        if cut is None:
            return None
        out["structuredContent"] = cut
    return out


def _cut_structured(doc: Any, cap: int, marker: str) -> Any:
    """Shorten the longest strings until the JSON fits `cap` (bounded number of passes)."""
    doc = json.loads(json.dumps(doc))          # a copy we may change
    for _ in range(64):
        size = len(json.dumps(doc, ensure_ascii=False))
        if size <= cap:
            return doc
        holder, key, longest = None, None, -1
        stack: list[Any] = [doc]
        while stack:
            node = stack.pop()
            items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
            for k, v in items:
                if isinstance(v, str) and len(v) > longest:
                    holder, key, longest = node, k, len(v)
                elif isinstance(v, (dict, list)):
                    stack.append(v)
        if holder is None or longest <= len(marker):
            return None
        keep = max(0, longest - (size - cap) - len(marker) - 8)
        holder[key] = holder[key][:keep] + " " + marker
    return None


def validate_pin_dir(rules_dir: str | Path) -> list[str]:
    """`mcp-bastion check`: every pin file parses."""
    errors = []
    for f in sorted((Path(rules_dir) / "pins").glob("*.yaml")):
        try:
            load_pins(rules_dir, f.stem)
        except RulesError as e:
            errors.append(str(e))
    return errors
