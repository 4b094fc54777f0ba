"""Masking core: detectors, field/JSONPath rules, mask styles, profiles. Pure: no mitmproxy.

`mask_message(profile, msg)` returns the JSON-RPC message as the caller may see it plus
what was masked (path, type, count; never the value). It is copy-on-write: the input is
never mutated, and when nothing was masked the very same object comes back, so the
response pipeline can forward the original bytes untouched.

Performance notes (a 256 KiB result must be cheap; bench/masking_bench.py measures it):
every regex is compiled once per profile load; free text gets one Aho-Corasick pass for
the detectors' needles and a digit count, then only the detectors that can match run;
field-name lookups are memoised per key; JSONPath rules run as a small automaton advanced
while the document is walked once (jsonpath-ng is used to parse and validate them, and to
evaluate the rare expressions the automaton does not cover, e.g. filters). Per message:
scans and partial/hash masks are memoised by value, one path node serves every row of an
array (a hit costs a lookup, not a path rendering), and the JSON text twin of
structuredContent reuses its masking when it is exactly its serialisation.
"""
from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import ahocorasick_rs
from jsonpath_ng import jsonpath as jp
from jsonpath_ng.exceptions import JsonPathLexerError, JsonPathParserError
from jsonpath_ng.ext import parse as jsonpath_parse

from addons.core.globs import matches_any
from addons.core.mcpwire import McpParseError, strict_loads
from addons.core.record import MaskEvent
from addons.core.rules import Located, RulesError, line_of, load_yaml, rules_files

MAX_DEPTH = 64             # deeper documents are refused (fail closed), like the parser
MAX_NODES = 2_000_000      # per message; bounds the work a hostile upstream can cause
MAX_EVENT_PATHS = 1024     # distinct (path, type) pairs kept per message
MAX_RENDERED = 65_536      # memoised path texts per message
MAX_MEMO = 8192            # memoised scans / styled values per message
MAX_MEMO_LEN = 1024        # longest value memoised
MIN_DETECT_LEN = 6         # shortest string any detector can match ("a@b.cc")

STYLES = ("redact", "partial", "hash", "keep")
DETECTOR_STYLES = ("redact", "partial", "hash", "off")


class MaskError(Exception):
    """The message cannot be masked safely; the pipeline must refuse it (fail closed)."""


# --- detectors ---------------------------------------------------------------------------

def luhn_ok(digits: str) -> bool:
    total, alt = 0, False
    for ch in reversed(digits):
        d = ord(ch) - 48
        if alt:
            d *= 2
            if d > 9:
                d -= 9
        total += d
        alt = not alt
    return total % 10 == 0


# Issuer prefixes of the major card networks: a Luhn-valid 16-digit order number that
# starts with e.g. 1 or 9 is not a card (Luhn alone passes one random number in ten).
_CARD_PREFIX = re.compile(r"^(?:4|5[1-5]|2[2-7]|3[47]|3[068]|35|6[05]|62|64|65)")


def _card_ok(text: str) -> bool:
    digits = re.sub(r"[ -]", "", text)
    if not 13 <= len(digits) <= 19:
        return False
    seps = set(re.findall(r"[ -]", text))
    return len(seps) <= 1 and bool(_CARD_PREFIX.match(digits)) and luhn_ok(digits)


def iban_ok(text: str) -> bool:
    s = text.replace(" ", "").upper()
    if not 15 <= len(s) <= 34 or not s[:2].isalpha() or not s[2:4].isdigit():
        return False
    rearranged = s[4:] + s[:4]
    num = "".join(str(int(c, 36)) for c in rearranged)
    return int(num) % 97 == 1


def _ssn_ok(text: str) -> bool:
    d = re.sub(r"[ -]", "", text)
    area, group, serial = d[:3], d[3:5], d[5:]
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def _phone_ok(text: str) -> bool:
    n = sum(c.isdigit() for c in text)
    return 10 <= n <= 15


@dataclass(frozen=True)
class Detector:
    """One free-text detector. Each runs as its own regex pass: every pattern starts with
    a literal or a character class (boundary look-behinds come after the first token) so
    the regex engine can skip ahead, and a cheap pre-check skips the pass entirely on
    text that cannot match (_NEEDLES, _MIN_DIGITS); a single alternation of all of them is 4x slower in CPython."""

    name: str
    pattern: str                      # may contain a named group `v` = the part to mask
    validate: Callable[[str], bool] | None = None
    lower: bool = False               # pattern is written for the lowercased text
    tag: str = ""                     # [MASKED:tag]; default: the name

    @property
    def label(self) -> str:
        return self.tag or self.name


_KEYCH = r"A-Za-z0-9_.\-"
_VALUE = r"""(?:"(?:[^"\\\n]|\\.){1,512}"|'[^'\n]{1,512}'|[^\s,;&"'<>{}\[\]()]{1,512})"""
_SECRET_WORDS = (r"password|passwd|passphrase|pwd|secret|api[_-]?key|apikey|access[_-]?key|"
                 r"access[_-]?token|auth[_-]?token|refresh[_-]?token|id[_-]?token|private[_-]?key|"
                 r"client[_-]?secret|credentials?")
_SECRET_HINTS = ("pass", "pwd", "secret", "key", "token", "credential")


# Literal needles that must occur for a detector to have any chance; one regex pass over
# each lowercased string is cheap (C substring search), so clean strings cost no detector pass.
_NEEDLES: dict[str, tuple[str, ...]] = {
    "private_key": ("private key-----",), "jwt": ("eyj",),
    "aws_access_key": ("akia", "asia", "abia", "acca"), "aws_secret_key": ("aws",),
    "gcp_api_key": ("aiza",), "github_token": ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
    "slack_token": ("xox",), "stripe_key": ("k_live_", "k_test_"), "bearer_token": ("bearer", "basic"),
    "secret_assignment": ("pass", "pwd", "secret", "key", "token", "credential"), "email": ("@",),
}
_BY_NEEDLE: dict[str, set[str]] = {}   # needle -> detectors
for _d, _ns in _NEEDLES.items():
    for _n in _ns:
        _BY_NEEDLE.setdefault(_n, set()).add(_d)
_NEEDLE_LIST = tuple(_BY_NEEDLE)
# every needle in one pass (Aho-Corasick, overlapping: every needle that occurs is reported)
_NEEDLE_AC = ahocorasick_rs.AhoCorasick(list(_NEEDLE_LIST))
_NEEDLE_DETS = [frozenset(_BY_NEEDLE[n]) for n in _NEEDLE_LIST]
_NOTHING: frozenset[str] = frozenset()
_MIN_DIGITS = {"iban": 6, "payment_card": 13, "ssn": 9, "phone": 10}


# Priority order: where two hits overlap, the one starting first wins, then the earlier here.
DETECTORS: dict[str, Detector] = {d.name: d for d in (
    Detector("private_key",
             r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----(?:[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|[\s\S]*)"),
    Detector("jwt", r"eyJ(?<![\w-]eyJ)[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"),
    Detector("aws_access_key", r"(?:AKIA|ASIA|ABIA|ACCA)(?<![A-Za-z0-9]....)[A-Z0-9]{16}(?![A-Za-z0-9])"),
    Detector("aws_secret_key",
             r"aws[\w\"' .-]{0,24}?(?:secret|key)[\w\"']{0,24}\s*[:=]\s*[\"']?(?P<v>[a-z0-9/+=]{40})(?![a-z0-9/+=])", lower=True),
    Detector("gcp_api_key", r"AIza(?<![\w-]....)[0-9A-Za-z_-]{35}(?![\w-])"),
    Detector("github_token", r"g(?<!\wg)(?:h[pousr]_[A-Za-z0-9]{36,255}|ithub_pat_[A-Za-z0-9_]{22,255})(?!\w)"),
    Detector("slack_token", r"xox(?<![\w-]xox)[abprs]-[A-Za-z0-9-]{10,250}"),
    Detector("stripe_key", r"[sr]k_(?<!\w.k_)(?:live|test)_[A-Za-z0-9]{16,247}(?!\w)"),
    Detector("bearer_token", r"(?:bearer|basic)\s+(?P<v>[a-z0-9._~+/-]{12,}=*)", lower=True),
    Detector("secret_assignment",
             rf"(?:{_SECRET_WORDS})[{_KEYCH}]{{0,40}}[\"']?\s*[:=]\s*(?P<v>{_VALUE})", lower=True, tag="secret"),
    Detector("email",
             r"[A-Za-z0-9._%+-](?<![\w.%+-].)[A-Za-z0-9._%+-]{0,63}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*"
             r"\.[A-Za-z]{2,24}(?![\w-])"),
    Detector("iban", r"[A-Z](?<![A-Za-z0-9].)[A-Z]\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![A-Za-z0-9])",
             validate=iban_ok),
    Detector("payment_card", r"\d(?<![\w.-]\d)(?:[ -]?\d){12,18}(?![\d-])", validate=_card_ok),
    Detector("ssn", r"\d(?<![\w-]\d)\d{2}(?P<sep>[- ])\d{2}(?P=sep)\d{4}(?![\d-])", validate=_ssn_ok),
    Detector("phone",
             r"(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}"
             r"|\d(?<![\w+]\d)\d{2}[.-]\d{3}[.-]\d{4})(?![\w-])",
             validate=_phone_ok),
)}
_PRIORITY = {name: i for i, name in enumerate(DETECTORS)}
_COMPILED = {d.name: re.compile(d.pattern) for d in DETECTORS.values()}

# A text hit whose value is already a mask must not be masked again (idempotence).
_ALREADY = re.compile(r"^[\"']?(?:\[MASKED:[\w.-]*\]|\[HASH:[0-9a-f]{12}\]|\**)[\"']?$")
# what a value _ALREADY matches can start with ("\n": `$` matches before a final newline):
# a cheap pre-check before the regex
_ALREADY_FIRST = frozenset(("", "\n", "[", "*", '"', "'"))


# --- styles ------------------------------------------------------------------------------

_EMAIL = re.compile(r"^([^@\s]+)@([^@\s]+)$")
_ALNUM = re.compile(r"[^\W_]")
_SECRET_TYPES = frozenset({"private_key", "jwt", "aws_access_key", "aws_secret_key", "gcp_api_key", "github_token",
                           "slack_token", "stripe_key", "bearer_token", "secret"})


def apply_style(style: str, type_: str, value: str, key: bytes) -> str:
    if style == "redact":
        return f"[MASKED:{type_}]"
    if style == "hash":
        digest = hmac.new(key, value.strip().encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
        return f"[HASH:{digest[:12]}]"
    if style == "partial":
        return _partial(type_, value)
    raise ValueError(f"unknown mask style {style!r}")


def _partial(type_: str, value: str) -> str:
    m = _EMAIL.match(value.strip())
    if m and (type_ == "email" or "email" in type_ or "." in m.group(2)):
        return f"{m.group(1)[0]}***@{m.group(2)}"
    if type_ in _SECRET_TYPES:
        return f"[MASKED:{type_}]"   # no "last 4" of a credential
    # [^\W_] is exactly str.isalnum() (sre's word class = isalnum or "_"): C-speed counting
    n_alnum = len(_ALNUM.findall(value))
    if n_alnum < 8:  # keeping 4 of a short value would show too much of it
        return f"[MASKED:{type_}]"
    cut, seen = len(value), 0          # start of the tail holding the last 4 alnum chars
    while seen < 4:
        cut -= 1
        if value[cut].isalnum():
            seen += 1
    return _ALNUM.sub("*", value[:cut]) + value[cut:]


# --- JSONPath automaton ------------------------------------------------------------------

_DESC = ("desc",)
_ANY = ("any",)


class _Unsupported(Exception):
    pass


def _steps(node: Any) -> list[tuple]:
    """jsonpath-ng AST -> list of steps the walk automaton understands."""
    if isinstance(node, (jp.Root, jp.This)):
        return []
    if isinstance(node, jp.Child):
        return _steps(node.left) + _steps(node.right)
    if isinstance(node, jp.Descendants):
        return _steps(node.left) + [_DESC] + _steps(node.right)
    if isinstance(node, jp.Wildcard):
        return [_ANY]
    if isinstance(node, jp.Fields):
        if "*" in node.fields:
            return [_ANY]
        return [("field", frozenset(node.fields))]
    if isinstance(node, jp.Index):
        return [("index", tuple(node.indices))]
    if isinstance(node, jp.Slice):
        return [("slice", node.start, node.end, node.step)]
    raise _Unsupported(type(node).__name__)


def _step_matches(step: tuple, key: Any, length: int) -> bool:
    kind = step[0]
    if kind == "any":
        return True
    if kind == "field":
        return isinstance(key, str) and key in step[1]
    if not isinstance(key, int):
        return False
    if kind == "index":
        return any(key == (i if i >= 0 else length + i) for i in step[1])
    _, start, end, stp = step
    return key in range(length)[slice(start, end, stp)]


@dataclass
class _PathRule:
    rule: int                                   # index into Profile.rules
    expr: str
    steps: list[tuple] | None                   # None -> evaluated with jsonpath-ng
    compiled: Any = None


# --- profiles ----------------------------------------------------------------------------

@dataclass
class Rule:
    name: str
    style: str
    type: str | None = None                     # tag in [MASKED:type]; default: the key
    fields: tuple[str, ...] = ()                # case-insensitive globs on key names
    regex: tuple[str, ...] = ()                 # case-insensitive regexes on key names
    paths: tuple[str, ...] = ()                 # JSONPath expressions
    line: int | None = None
    key_re: re.Pattern | None = field(default=None, repr=False)

    def tag(self, key: Any) -> str:
        if self.type:
            return self.type
        return str(key).lower() if isinstance(key, str) and key else "field"


@dataclass
class Profile:
    name: str
    rules: list[Rule] = field(default_factory=list)
    detectors: dict[str, str] = field(default_factory=dict)    # detector -> style (never "off")
    hash_key: bytes = b""
    line: int | None = None
    description: str = ""

    def __post_init__(self) -> None:
        self.compile()

    # compiled state -----------------------------------------------------------------
    def compile(self) -> None:
        self._key_cache: dict[str, int] = {}
        self._path_rules: list[_PathRule] = []
        self._desc_fields: dict[str, int] = {}
        text_keys: list[str] = []
        for i, r in enumerate(self.rules):
            parts = [fnmatch.translate(g).replace(r"\Z", "") for g in r.fields] + list(r.regex)
            r.key_re = re.compile("|".join(f"(?:{p})" for p in parts), re.I) if parts else None
            last_fields: list[str] = []
            for expr in r.paths:
                tree = jsonpath_parse(expr)
                try:
                    steps = _steps(tree)
                    if len(steps) == 2 and steps[0] is _DESC and steps[1][0] == "field":
                        # `$..name`: any key called exactly `name` -> a dict lookup, no automaton
                        for n in steps[1][1]:
                            self._desc_fields.setdefault(n, i)
                        last_fields += sorted(steps[1][1])
                        continue
                    self._path_rules.append(_PathRule(i, expr, steps))
                    if steps and steps[-1][0] == "field":
                        last_fields += sorted(steps[-1][1])
                except _Unsupported:
                    self._path_rules.append(_PathRule(i, expr, None, tree))
            if r.style == "keep":
                continue
            # the same names are looked for as `key: value` / `"key": "value"` in free text
            # (and, for JSONPath rules, the last field name: `$..api_token` -> api_token)
            text_keys += [_glob_to_key_regex(g) for g in r.fields]
            text_keys += [_strip_anchors(x) for x in r.regex]
            text_keys += [re.escape(n.lower()) for n in last_fields]
        self._has_fallback = any(p.steps is None for p in self._path_rules)
        self._dets = [(DETECTORS[n], _COMPILED[n], st) for n, st in self.detectors.items()]
        # the same, as _scan_new runs them: by needle, and by the digits they need
        plan = {d.name: (_MIN_DIGITS.get(d.name, 0), d.name, rx, st, "v" in rx.groupindex, _PRIORITY[d.name],
                         d.label, d.validate, d.lower) for d, rx, st in self._dets}
        self._needled = {n: e for n, e in plan.items() if n in _NEEDLES}
        self._digits = [e for n, e in plan.items() if n not in _NEEDLES]
        self._kv = None
        if text_keys:
            # `key: value` pairs whose key names a masked field; matched on lowercased text
            # from the distinctive part of the name, the whole key is then checked exactly
            alt = "|".join(dict.fromkeys(text_keys))
            self._kv = re.compile(rf"(?P<k>{alt})[{_KEYCH}]*[\"']?\s*[:=]\s*(?P<v>{_VALUE})")
        self._scans = bool(self._dets) or self._kv is not None
        # masks nothing at all (e.g. an explicit pass-through profile)
        self.empty = not self._scans and not any(r.style != "keep" for r in self.rules)

    def path_rule_for_key(self, key: str) -> int:
        """First JSONPath rule whose last step names `key` (for `key: value` in free text)."""
        k = key.lower()
        for n, i in self._desc_fields.items():
            if n.lower() == k:
                return i
        for pr in self._path_rules:
            if pr.steps and pr.steps[-1][0] == "field" and k in {f.lower() for f in pr.steps[-1][1]}:
                return pr.rule
        return -1

    def rule_for_key(self, key: str) -> int:
        """Index of the first rule whose field patterns match `key`, or -1."""
        hit = self._key_cache.get(key)
        if hit is None:
            hit = self._desc_fields.get(key, -1)
            for i, r in enumerate(self.rules):
                if 0 <= hit <= i:
                    break
                if r.key_re is not None and r.key_re.fullmatch(key):
                    hit = i
                    break
            if len(self._key_cache) > 8192:
                self._key_cache.clear()
            self._key_cache[key] = hit
        return hit


def _glob_to_key_regex(glob: str) -> str:
    """Glob -> regex for its distinctive part in lowercased text (outer `*` dropped: the
    whole key around a hit is re-checked with Profile.rule_for_key)."""
    out = []
    for ch in glob.lower().strip("*") or "*":
        if ch == "*":
            out.append(f"[{_KEYCH}]*")
        elif ch == "?":
            out.append(f"[{_KEYCH}]")
        else:
            out.append(re.escape(ch))
    return "".join(out)


def _strip_anchors(rx: str) -> str:
    rx = rx[1:] if rx.startswith("^") else rx
    rx = rx[:-1] if rx.endswith("$") and not rx.endswith(r"\$") else rx
    return f"(?i:{rx})"


# --- the walk ----------------------------------------------------------------------------

class _Ctx:
    __slots__ = ("p", "events", "nodes", "fallback", "rendered", "keys", "structured", "scanned", "styled")

    def __init__(self, profile: Profile):
        self.p = profile
        self.events: dict[tuple[str, str], int] = {}
        self.nodes = 0
        self.fallback: set[tuple] | None = None
        # id(path node) -> (node, rendered text): the node is kept alive so its id is not
        # reused; one message's walk only, bounded by MAX_RENDERED
        self.rendered: dict[int, tuple[tuple, str]] = {}
        # (id(parent node), key, type) -> (parent node, events key): a hit on a key already
        # seen under the same parent (every row of an array shares one parent node, see
        # _children) costs a lookup, not a rendering. Bounded by MAX_RENDERED.
        self.keys: dict[tuple, tuple[tuple, tuple[str, str]]] = {}
        # a tool result's structuredContent, masked: (original, masked, changed, rendered
        # path, events it produced). Its text twin in content[] reuses it (same data).
        self.structured: tuple[Any, Any, bool, str, dict] | None = None
        # per-message memos of pure functions of the profile and a value (values repeat
        # down a column): text -> (scanned text, tags hit in order); (style, tag, value) ->
        # masked value. Bounded by MAX_MEMO entries each.
        self.scanned: dict[str, tuple[str, tuple[str, ...]]] = {}
        self.styled: dict[tuple[str, str, str], str] = {}

    def hit(self, path: tuple, type_: str, n: int = 1) -> None:
        if not path:
            self._count("", type_, n)
            return
        parent, seg = path
        if isinstance(seg, _Mark):
            self._count(self.path_text(parent) + seg, type_, n)
            return
        fk = (id(parent), seg, type_)
        ent = self.keys.get(fk)
        if ent is None or ent[0] is not parent:
            ent = (parent, (self.path_text(parent) + _seg_text(seg), type_))
            if len(self.keys) < MAX_RENDERED:
                self.keys[fk] = ent
        k = ent[1]
        events = self.events
        c = events.get(k)
        if c is not None:
            events[k] = c + n
        elif len(events) < MAX_EVENT_PATHS:
            events[k] = n
        else:
            events[("$", "other")] = events.get(("$", "other"), 0) + n

    def path_text(self, path: tuple) -> str:
        """_render(path), memoised per path node: rows of one array share their parent's
        text, so a hit costs a lookup and one concatenation instead of a walk to the root."""
        if not path:
            return ""
        ent = self.rendered.get(id(path))
        if ent is not None and ent[0] is path:
            return ent[1]
        parent, seg = path
        text = self.path_text(parent) + _seg_text(seg)
        if len(self.rendered) < MAX_RENDERED:
            self.rendered[id(path)] = (path, text)
        return text

    def _count(self, text: str, type_: str, n: int) -> None:
        k = (text, type_)
        if k in self.events or len(self.events) < MAX_EVENT_PATHS:
            self.events[k] = self.events.get(k, 0) + n
        else:
            self.events[("$", "other")] = self.events.get(("$", "other"), 0) + n

    def style(self, style: str, tag: str, value: str) -> str:
        """apply_style, memoised per message (a keyed hash or a partial mask per value)."""
        if style == "redact":
            return f"[MASKED:{tag}]"
        k = (style, tag, value)
        out = self.styled.get(k)
        if out is None:
            out = apply_style(style, tag, value, self.p.hash_key)
            if len(self.styled) < MAX_MEMO and len(value) <= MAX_MEMO_LEN:
                self.styled[k] = out
        return out


class _Mark(str):
    """A path segment written as is: '$', '(json)', '(table)'."""


_ROOT = _Mark("$")
_JSON = _Mark("(json)")
_TABLE = _Mark("(table)")
_SIMPLE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def _render(path: tuple) -> str:
    """Linked path (parent, key) -> '$.a.b[*].c'. Built only when something is masked."""
    segs = []
    while path:
        path, seg = path
        segs.append(seg)
    out = []
    for s in reversed(segs):
        if isinstance(s, _Mark):
            out.append(s)
        elif isinstance(s, int):
            out.append("[*]")
        elif _SIMPLE_KEY.fullmatch(s):
            out.append("." + s)
        else:
            out.append("[" + json.dumps(s, ensure_ascii=False) + "]")
    return "".join(out)


def _seg_text(s: Any) -> str:
    if isinstance(s, _Mark):
        return s
    if isinstance(s, int):
        return "[*]"
    if _SIMPLE_KEY.fullmatch(s):
        return "." + s
    return "[" + json.dumps(s, ensure_ascii=False) + "]"


def _shape(path: tuple) -> tuple:
    """The path with array indices erased: rows of one array share one rendered path."""
    segs = []
    while path:
        path, seg = path
        segs.append(-1 if isinstance(seg, int) else seg)
    return tuple(segs)


def _advance(p: Profile, states: tuple, key: Any, length: int) -> tuple[tuple, int]:
    """Advance JSONPath automaton states by one child key; returns (states, matched rule or -1)."""
    out: list[tuple[int, int]] = []
    matched = -1
    prs = p._path_rules
    for pi, si in states:
        steps = prs[pi].steps
        if steps[si] is _DESC:
            out.append((pi, si))          # descendant: stay alive at any depth
            si += 1
            if si == len(steps):
                continue
        if _step_matches(steps[si], key, length):
            nxt = si + 1
            if nxt == len(steps):
                r = prs[pi].rule
                matched = r if matched < 0 else min(matched, r)
            else:
                out.append((pi, nxt))
    return (tuple(dict.fromkeys(out)) if out else ()), matched


def _root_states(p: Profile) -> tuple:
    return tuple((i, 0) for i, pr in enumerate(p._path_rules) if pr.steps)


def _fallback_paths(p: Profile, doc: Any) -> set[tuple] | None:
    """Concrete paths (tuples of keys) matched by rules the automaton cannot run."""
    if not p._has_fallback:
        return None
    out: set[tuple] = set()
    for pr in p._path_rules:
        if pr.steps is not None:
            continue
        try:
            found = pr.compiled.find(doc)
        except Exception as e:  # noqa: BLE001 - a rule that cannot run must not pass data
            raise MaskError(f"JSONPath {pr.expr!r} failed: {type(e).__name__}") from None
        for datum in found:
            out.add((pr.rule, tuple(_flatten(datum.full_path))))
    return out


def _flatten(path: Any) -> list[Any]:
    if isinstance(path, jp.Child):
        return _flatten(path.left) + _flatten(path.right)
    if isinstance(path, jp.Fields):
        return [path.fields[0]]
    if isinstance(path, jp.Index):
        return [path.indices[0]]
    return []


def _fallback_rule(ctx: _Ctx, keys: tuple) -> int:
    best = -1
    for rule, k in ctx.fallback or ():
        if k == keys and (best < 0 or rule < best):
            best = rule
    return best


def _mask_doc(ctx: _Ctx, doc: Any, path: tuple) -> tuple[Any, bool]:
    """Structural masking of one document (structuredContent, JSON text, error.data, ...)."""
    ctx.fallback = _fallback_paths(ctx.p, doc)
    _count_nodes(ctx, 1)
    return _walk(ctx, doc, path, _root_states(ctx.p), (), 1, -1, None)


def _count_nodes(ctx: _Ctx, n: int) -> None:
    """Values are counted when their container is entered (all of its children are walked)."""
    ctx.nodes += n
    if ctx.nodes > MAX_NODES:
        raise MaskError(f"response has more than {MAX_NODES} JSON values")


def _walk(ctx: _Ctx, value: Any, path: tuple, states: tuple, keys: tuple, depth: int,
          forced: int, key: Any) -> tuple[Any, bool]:
    """One value, already counted (_count_nodes)."""
    if depth > MAX_DEPTH:
        raise MaskError(f"response nested deeper than {MAX_DEPTH}")
    p = ctx.p
    if forced >= 0:
        rule = p.rules[forced]
        if rule.style == "keep":
            return value, False
        if isinstance(value, (dict, list)):
            return _children(ctx, value, path, (), keys, depth, forced, key)
        return _leaf(ctx, rule, value, path, key)
    if isinstance(value, (dict, list)):
        return _children(ctx, value, path, states, keys, depth, -1, None)
    if isinstance(value, str) and len(value) >= MIN_DETECT_LEN and p._scans:
        new = _scan_text(ctx, value, path)
        return new, new is not value
    return value, False


def _leaf(ctx: _Ctx, rule: Rule, value: Any, path: tuple, key: Any) -> tuple[Any, bool]:
    """A scalar a field/JSONPath rule matched: masked whole (numbers become masked strings)."""
    if rule.style == "keep" or value is None or value == "":
        return value, False
    text = value if isinstance(value, str) else json.dumps(value)
    if text[:1] in _ALREADY_FIRST and _ALREADY.match(text):
        return value, False
    tag = rule.type or (key.lower() if type(key) is str and key else rule.tag(key))
    ctx.hit(path, tag)
    return ctx.style(rule.style, tag, text), True


def _children(ctx: _Ctx, value: dict | list, path: tuple, states: tuple, keys: tuple, depth: int,
              forced: int, tagkey: Any) -> tuple[Any, bool]:
    """Children of a container; `forced` = rule inherited from a matched ancestor (whose
    key, `tagkey`, names the [MASKED:type] of every leaf below it)."""
    p = ctx.p
    changed: dict[Any, Any] | None = None
    is_dict = isinstance(value, dict)
    items = value.items() if is_dict else enumerate(value)
    length = len(value)
    track_keys = ctx.fallback is not None
    key_cache = p._key_cache
    rules = p.rules
    scans = p._scans
    if depth + 1 > MAX_DEPTH and length:
        raise MaskError(f"response nested deeper than {MAX_DEPTH}")
    _count_nodes(ctx, length)
    # every element of an array gets the same path node (an index renders as [*]), so the
    # rendered paths and event keys below it are computed once per array, not per row
    item_path = None if is_dict else (path, 0)
    for k, v in items:
        child_states: tuple = ()
        child_keys = keys + (k,) if track_keys else ()
        if forced >= 0:
            rule_i, tkey = forced, tagkey
        else:
            best = key_cache.get(k) if is_dict else -1
            if best is None:
                best = p.rule_for_key(k) if isinstance(k, str) else -1
            if states:
                child_states, pm = _advance(p, states, k, length)
                if pm >= 0 and (best < 0 or pm < best):
                    best = pm
            if track_keys:
                fb = _fallback_rule(ctx, child_keys)
                if fb >= 0 and (best < 0 or fb < best):
                    best = fb
            rule_i, tkey = best, k
        t = type(v)
        if t is dict or t is list or (t is not str and isinstance(v, (dict, list))):
            # what _walk would do for a container (its depth was checked above)
            cpath = (path, k) if is_dict else item_path
            if rule_i < 0:
                new, ch = _children(ctx, v, cpath, child_states, child_keys, depth + 1, -1, None)
            elif rules[rule_i].style == "keep":
                continue
            else:
                new, ch = _children(ctx, v, cpath, (), child_keys, depth + 1, rule_i, tkey)
            if not ch:
                continue
        elif rule_i >= 0:      # a scalar (the common case): no call to _walk
            new, ch = _leaf(ctx, rules[rule_i], v, (path, k) if is_dict else item_path, tkey)
            if not ch:
                continue
        elif scans and (t is str or isinstance(v, str)) and len(v) >= MIN_DETECT_LEN:
            new = _scan_text(ctx, v, (path, k) if is_dict else item_path)
            if new is v:
                continue
        else:
            continue
        if changed is None:
            changed = {}
        changed[k] = new
    if changed is None:
        return value, False
    if is_dict:
        out = dict(value)
        out.update(changed)          # same keys: the order is kept
        return out, True
    lst = list(value)
    for i, new in changed.items():
        lst[i] = new
    return lst, True


def _scan_text(ctx: _Ctx, text: str, path: tuple) -> str:
    """Detectors (and `key: value` of masked field names) over free text; same object if clean.

    Memoised per message: the same string (a status, a name down a column) is scanned once."""
    ent = ctx.scanned.get(text) if len(text) <= MAX_MEMO_LEN else None
    if ent is None:
        tags: list[str] = []
        new = _scan_new(ctx, text, tags)
        if len(text) <= MAX_MEMO_LEN and len(ctx.scanned) < MAX_MEMO:
            ctx.scanned[text] = (None if new is text else new, tuple(tags))
    else:
        new, tags = (text if ent[0] is None else ent[0]), ent[1]
    for tag in tags:
        ctx.hit(path, tag)
    return new


def _scan_new(ctx: _Ctx, text: str, tags: list[str]) -> str:
    """The scan itself; the tag of each value masked is appended to `tags`, in text order."""
    p = ctx.p
    raw = text.encode("utf-8", "surrogatepass")
    ndig = len(raw) - len(raw.translate(None, b"0123456789"))
    low = text.lower()
    # one Aho-Corasick pass for all needles (26 substring searches cost 5x as much)
    found = _NEEDLE_AC.find_matches_as_indexes(low, overlapping=True)
    if not found:
        maybe = _NOTHING
    elif len(found) == 1:
        maybe = _NEEDLE_DETS[found[0][0]]
    else:
        maybe = {d for i, _, _ in found for d in _NEEDLE_DETS[i]}
    hits: list[tuple[int, int, int, int, str, str]] = []   # start, prio, vs, ve, style, tag
    kv = p._kv is not None and (":" in text or "=" in text)
    if not found and ndig < 6 and not kv:
        return text
    same_len = len(low) == len(text)   # case mapping can change lengths outside ASCII
    # only the detectors whose needle occurs or whose digit count is reached (the order
    # does not matter: hits are sorted below)
    run = [p._needled[d] for d in maybe if d in p._needled]
    if ndig >= 6:
        run += [e for e in p._digits if ndig >= e[0]]
    for _, name, rx, style, has_v, prio, label, validate, lower in run:
        if lower and not same_len:
            rx, subject = re.compile(rx.pattern, re.I), text
        else:
            subject = low if lower else text
        pos = 0
        while True:
            if name == "email":
                # an e-mail holds an '@' at most 64 characters after its start, within one
                # run of local-part characters (no space): skip the prose before it
                at = text.find("@", pos)
                if at < 0:
                    break
                pos = max(pos, at - 66, text.rfind(" ", 0, at) + 1)
            m = rx.search(subject, pos)
            if m is None:
                break
            start, end = m.span()
            if validate is not None and not validate(text[start:end]):
                pos = start + 1          # a failed candidate must not hide one inside it
                continue
            pos = end if end > start else start + 1
            vs, ve = m.span("v") if has_v and m.start("v") >= 0 else (start, end)
            hits.append((start, prio, vs, ve, style, label))
    if kv:
        rx, subject = (p._kv, low) if same_len else (re.compile(p._kv.pattern, re.I), text)
        for m in rx.finditer(subject):
            ks, ke = m.span("k")
            while ks > 0 and (text[ks - 1].isalnum() or text[ks - 1] in "_.-"):
                ks -= 1
            while ke < len(text) and (text[ke].isalnum() or text[ke] in "_.-"):
                ke += 1
            key = text[ks:ke]
            ri = p.rule_for_key(key)
            if ri < 0:
                ri = p.path_rule_for_key(key)
            if ri < 0 or p.rules[ri].style == "keep":
                continue
            rule = p.rules[ri]
            vs, ve = m.span("v")
            hits.append((ks, len(_PRIORITY), vs, ve, rule.style, rule.tag(key)))
    if not hits:
        return text
    if len(hits) > 1:
        hits.sort()
    out: list[str] = []
    pos = 0
    for start, _, vs, ve, style, tag in hits:
        if vs < pos:
            continue                     # overlaps an earlier hit
        val = text[vs:ve]
        if len(val) >= 2 and val[0] == val[-1] and val[0] in "\"'":
            vs, ve, val = vs + 1, ve - 1, val[1:-1]
        if not val or (val[:1] in _ALREADY_FIRST and _ALREADY.match(val)):
            continue
        out.append(text[pos:vs])
        out.append(ctx.style(style, tag, val))
        pos = ve
        tags.append(tag)
    if not out:
        return text
    out.append(text[pos:])
    return "".join(out)


# --- text blocks: JSON, delimited tables, free text -------------------------------------

def _mask_text_block(ctx: _Ctx, text: str, path: tuple) -> str:
    stripped = text.lstrip()
    if stripped[:1] in ("{", "["):
        twin = ctx.structured
        if twin is not None and _serialises(twin[0], text):
            # the text is structuredContent as json.dumps writes it: one C-speed dump and a
            # compare instead of a strict parse, a deep compare and a second walk
            return _reuse_structured(ctx, twin, text, (path, _JSON))
        try:
            doc = strict_loads(text)
        except McpParseError as e:
            if "deeper" in e.message:
                raise MaskError(f"JSON text nested deeper than {MAX_DEPTH}") from None
            doc = None     # not strict JSON (duplicate keys, NaN, ...): masked as free text
        if isinstance(doc, (dict, list)):
            if twin is not None and doc == twin[0] and _same_json(doc, twin[0]):
                return _reuse_structured(ctx, twin, text, (path, _JSON))
            new, changed = _mask_doc(ctx, doc, (path, _JSON))
            return _dumps_like(new, text) if changed else text
    if "\n" in text and ctx.p.rules:
        text = _mask_table(ctx, text, path)
    if ctx.p._scans and len(text) >= MIN_DETECT_LEN:
        return _scan_text(ctx, text, path)
    return text


def _serialises(value: Any, text: str) -> bool:
    """`text` is exactly json.dumps(value) in the text's own layout, so it decodes to
    exactly `value` (a decoded JSON value) under any JSON parser: no duplicate keys,
    escapes or number spellings another parser could read differently."""
    layout = _layout(text)
    if not layout["ensure_ascii"] and text.isascii():
        layout["ensure_ascii"] = True     # the same text for an ASCII value, written faster
    try:
        return json.dumps(value, allow_nan=False, **layout) == text
    except (TypeError, ValueError):
        return False


def _same_json(a: Any, b: Any) -> bool:
    """Equal as JSON, not only as Python values (1 == 1.0 == True): a text that differs in a
    number's type from structuredContent is masked on its own, not replaced by it."""
    try:
        return (json.dumps(a, sort_keys=True, allow_nan=False)
                == json.dumps(b, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError):
        return False


def _reuse_structured(ctx: _Ctx, twin: tuple, text: str, path: tuple) -> str:
    """The JSON text equals the structuredContent already masked: serialise that result
    in the text's layout and count the same maskings under the text's path."""
    _, masked, changed, prefix, events = twin
    tprefix = _render(path)
    for (p, t), n in events.items():
        ctx._count(tprefix + p[len(prefix):], t, n)
    return _dumps_like(masked, text) if changed else text


def _layout(original: str) -> dict[str, Any]:
    """json.dumps arguments that write JSON in roughly the layout `original` has. No
    circular-reference check: what is written here was walked first, and a cycle fails
    that walk (MaskError at MAX_DEPTH)."""
    # isascii() is O(1) and a one-character search runs at memchr speed: test those first
    ascii_ = original.isascii() and "\\" in original and "\\u" in original
    nl = original.find("\n")
    if nl >= 0:
        rest = original[nl + 1:]
        return {"ensure_ascii": ascii_, "check_circular": False,
                "indent": len(rest) - len(rest.lstrip(" ")) or 2}
    if '": ' in original or '", ' in original:
        return {"ensure_ascii": ascii_, "check_circular": False}
    return {"ensure_ascii": ascii_, "check_circular": False, "separators": (",", ":")}


def _dumps_like(obj: Any, original: str) -> str:
    """Re-serialise JSON text in roughly the layout it came in."""
    return json.dumps(obj, **_layout(original))


_TABLE_SEPS = (",", "\t", "|", ";")


def _mask_table(ctx: _Ctx, text: str, path: tuple) -> str:
    """CSV / TSV / markdown tables: mask whole columns whose header names a masked field."""
    lines = text.split("\n")
    header = lines[0]
    sep = max(_TABLE_SEPS, key=header.count)
    if header.count(sep) < 1:
        return text
    cells = [c.strip().strip("\"'`").strip() for c in header.split(sep)]
    p = ctx.p
    cols = {}
    for i, c in enumerate(cells):
        if c:
            ri = p.rule_for_key(c)
            if ri >= 0 and p.rules[ri].style != "keep":
                cols[i] = (p.rules[ri], c)
    if not cols:
        return text
    width = len(cells)
    changed = False
    tpath = (path, _TABLE)
    for li in range(1, len(lines)):
        parts = lines[li].split(sep)
        if len(parts) != width:
            continue          # quoted separators or prose: left to the detectors
        for ci, (rule, colname) in cols.items():
            cell = parts[ci]
            val = cell.strip()
            q = val[:1] if len(val) >= 2 and val[0] == val[-1] and val[0] in "\"'" else ""
            inner = val[1:-1] if q else val
            if not inner or set(inner) <= set("-: ") or _ALREADY.match(inner):
                continue
            masked = apply_style(rule.style, rule.tag(colname), inner, p.hash_key)
            lead = cell[: len(cell) - len(cell.lstrip())]
            trail = cell[len(cell.rstrip()):]
            parts[ci] = f"{lead}{q}{masked}{q}{trail}"
            ctx.hit((tpath, colname), rule.tag(colname))
            changed = True
        lines[li] = sep.join(parts)
    return "\n".join(lines) if changed else text


# --- JSON-RPC message --------------------------------------------------------------------

def _content_block(ctx: _Ctx, block: Any, path: tuple) -> tuple[Any, bool]:
    if not isinstance(block, dict):
        return block, False
    t = block.get("type")
    if t == "text" and isinstance(block.get("text"), str):
        new = _mask_text_block(ctx, block["text"], (path, "text"))
        return ({**block, "text": new}, True) if new is not block["text"] else (block, False)
    if t == "resource" and isinstance(block.get("resource"), dict):
        res, ch = _resource(ctx, block["resource"], (path, "resource"))
        return ({**block, "resource": res}, True) if ch else (block, False)
    return block, False


def _resource(ctx: _Ctx, res: dict, path: tuple) -> tuple[dict, bool]:
    if isinstance(res.get("text"), str):
        new = _mask_text_block(ctx, res["text"], (path, "text"))
        if new is not res["text"]:
            return {**res, "text": new}, True
    return res, False


def _list_of(ctx: _Ctx, items: Any, path: tuple, fn) -> tuple[Any, bool]:
    if not isinstance(items, list):
        return items, False
    out, changed = items, False
    for i, it in enumerate(items):
        new, ch = fn(ctx, it, (path, i))
        if ch:
            if not changed:
                out, changed = list(items), True
            out[i] = new
    return out, changed


def _result(ctx: _Ctx, result: dict, path: tuple) -> tuple[dict, bool]:
    """Tool results, resource contents, prompt messages (by shape, so tasks/result,
    legacy-SSE stream responses and batches are covered without knowing the method)."""
    upd: dict[str, Any] = {}
    ctx.structured = None
    if "structuredContent" in result:
        sc = result["structuredContent"]
        before = dict(ctx.events)
        new, ch = _mask_doc(ctx, sc, (path, "structuredContent"))
        if ch:
            upd["structuredContent"] = new
        if isinstance(sc, (dict, list)):
            delta = {k: n - before.get(k, 0) for k, n in ctx.events.items() if n != before.get(k, 0)}
            if ("$", "other") not in delta:       # event paths were capped: mask the text itself
                ctx.structured = (sc, new, ch, _render((path, "structuredContent")), delta)
    if isinstance(result.get("content"), list):
        new, ch = _list_of(ctx, result["content"], (path, "content"), _content_block)
        if ch:
            upd["content"] = new
    ctx.structured = None
    if isinstance(result.get("contents"), list):
        new, ch = _list_of(ctx, result["contents"], (path, "contents"),
                           lambda c, r, pth: _resource(c, r, pth) if isinstance(r, dict) else (r, False))
        if ch:
            upd["contents"] = new
    if isinstance(result.get("messages"), list):
        new, ch = _list_of(ctx, result["messages"], (path, "messages"), _prompt_message)
        if ch:
            upd["messages"] = new
    if isinstance(result.get("content"), dict):            # sampling result: one block
        new, ch = _content_block(ctx, result["content"], (path, "content"))
        if ch:
            upd["content"] = new
    return ({**result, **upd}, True) if upd else (result, False)


def _prompt_message(ctx: _Ctx, m: Any, path: tuple) -> tuple[Any, bool]:
    if not isinstance(m, dict):
        return m, False
    c = m.get("content")
    if isinstance(c, list):
        new, ch = _list_of(ctx, c, (path, "content"), _content_block)
    else:
        new, ch = _content_block(ctx, c, (path, "content"))
    return ({**m, "content": new}, True) if ch else (m, False)


def _error(ctx: _Ctx, err: dict, path: tuple) -> tuple[dict, bool]:
    upd: dict[str, Any] = {}
    if isinstance(err.get("message"), str):
        new = _mask_text_block(ctx, err["message"], (path, "message"))
        if new is not err["message"]:
            upd["message"] = new
    if "data" in err:
        d = err["data"]
        if isinstance(d, str):
            new = _mask_text_block(ctx, d, (path, "data"))
            ch = new is not d
        else:
            new, ch = _mask_doc(ctx, d, (path, "data"))
        if ch:
            upd["data"] = new
    return ({**err, **upd}, True) if upd else (err, False)


_PARAMS_SKIP = frozenset({"_meta", "progressToken", "requestedSchema"})


def _params(ctx: _Ctx, method: str, params: dict, path: tuple) -> tuple[dict, bool]:
    """Server->client notifications (logging, progress) and requests (sampling, elicitation)."""
    upd: dict[str, Any] = {}
    for k, v in params.items():
        if k in _PARAMS_SKIP:
            continue
        if k == "messages" and isinstance(v, list):
            new, ch = _list_of(ctx, v, (path, "messages"), _prompt_message)
        elif isinstance(v, str):
            new = _mask_text_block(ctx, v, (path, k))
            ch = new is not v
        else:
            # rules apply relative to each param value (e.g. logging `data`)
            new, ch = _mask_doc(ctx, v, (path, k))
        if ch:
            upd[k] = new
    return ({**params, **upd}, True) if upd else (params, False)


def mask_message(profile: Profile, msg: dict) -> tuple[dict, list[MaskEvent]]:
    """Mask one JSON-RPC message. Copy-on-write: returns `msg` itself when nothing changed.

    Raises MaskError when the message cannot be masked safely (too deep / too large).
    """
    if profile.empty or not isinstance(msg, dict):
        return msg, []
    ctx = _Ctx(profile)
    upd: dict[str, Any] = {}
    root = ((), _ROOT)
    if isinstance(msg.get("result"), dict):
        new, ch = _result(ctx, msg["result"], (root, "result"))
        if ch:
            upd["result"] = new
    if isinstance(msg.get("error"), dict):
        new, ch = _error(ctx, msg["error"], (root, "error"))
        if ch:
            upd["error"] = new
    if isinstance(msg.get("method"), str) and isinstance(msg.get("params"), dict):
        new, ch = _params(ctx, msg["method"], msg["params"], (root, "params"))
        if ch:
            upd["params"] = new
    events = [MaskEvent(path=p, type=t, count=n) for (p, t), n in ctx.events.items()]
    return ({**msg, **upd} if upd else msg), events


def mask_value(profile: Profile, value: Any, root: str = "$") -> tuple[Any, list[MaskEvent]]:
    """Mask an arbitrary JSON value (e.g. tool arguments shown to an approver)."""
    if profile.empty:
        return value, []
    ctx = _Ctx(profile)
    if isinstance(value, str):
        new = _mask_text_block(ctx, value, ((), _Mark(root)))
    else:
        new, _ = _mask_doc(ctx, value, ((), _Mark(root)))
    return new, [MaskEvent(path=p, type=t, count=n) for (p, t), n in ctx.events.items()]


# --- configuration -----------------------------------------------------------------------

@dataclass
class Selector:
    profile: str
    name: str = ""
    connections: tuple[str, ...] = ()     # globs; empty = any
    tools: tuple[str, ...] = ()           # globs; empty = any
    roles: tuple[str, ...] = ()           # any of; empty = any
    subjects: tuple[str, ...] = ()        # globs; empty = any
    clients: tuple[str, ...] = ()         # globs; empty = any
    line: int | None = None

    def matches(self, connection: str | None, tool: str | None, roles: Iterable[str],
                sub: str | None, client: str | None, *, any_tool: bool = False) -> bool:
        if self.connections and not matches_any(connection, self.connections):
            return False
        if self.tools and not any_tool and not matches_any(tool, self.tools):
            return False
        if self.roles and not set(self.roles) & set(roles):
            return False
        if self.subjects and not matches_any(sub, self.subjects):
            return False
        if self.clients and not matches_any(client, self.clients):
            return False
        return True


@dataclass
class MaskConfig:
    profiles: dict[str, Profile]
    selectors: list[Selector]
    default: str
    files: tuple[str, ...] = ()
    requests: Profile | None = None    # `requests:`: client->server arguments as shown and stored

    def mask_request(self, msg: dict) -> tuple[dict, list[MaskEvent]]:
        """A client->server JSON-RPC message as it may be shown or stored: `params.arguments`
        masked with the `requests:` rules (the upstream still receives the original)."""
        params = msg.get("params")
        if self.requests is None or not isinstance(params, dict) or "arguments" not in params:
            return msg, []
        args, events = mask_value(self.requests, params["arguments"], "$.params.arguments")
        if args is params["arguments"]:
            return msg, events
        return {**msg, "params": {**params, "arguments": args}}, events

    def select(self, connection: str | None, tool: str | None, roles: Iterable[str] = (),
               sub: str | None = None, client: str | None = None) -> list[Profile]:
        """Profiles to apply, in order. A known tool: the first matching selector (or the
        default). An unknown tool (e.g. responses on a legacy SSE stream): every profile a
        selector for this caller could pick, applied one after the other (never less
        masking than any of them)."""
        roles = tuple(roles)
        if tool is not None:
            for s in self.selectors:
                if s.matches(connection, tool, roles, sub, client):
                    return [self.profiles[s.profile]]
            return [self.profiles[self.default]]
        names: list[str] = []
        for s in self.selectors:
            if s.matches(connection, None, roles, sub, client, any_tool=True):
                names.append(s.profile)
                if not s.tools:
                    break        # later selectors can never be reached for this caller
        else:
            names.append(self.default)
        return [self.profiles[n] for n in dict.fromkeys(names)]


BUILTIN_DEFAULT = "default"


def builtin_config(hash_key: bytes = b"") -> MaskConfig:
    """Used when no masking.yaml exists: every detector redacts (safe default)."""
    prof = Profile(BUILTIN_DEFAULT, [], {d: "redact" for d in DETECTORS}, hash_key,
                   description="built-in: all detectors redact")
    return MaskConfig({BUILTIN_DEFAULT: prof}, [], BUILTIN_DEFAULT)


_TOP_KEYS = {"version", "default_profile", "profiles", "select", "description", "requests"}
REQUESTS = "requests:"     # `requests:` parsed like a profile under a name no profile can have
_PROFILE_KEYS = {"description", "extends", "rules", "detectors"}
_RULE_KEYS = {"name", "fields", "regex", "path", "paths", "style", "type"}
_SELECT_KEYS = {"name", "connection", "connections", "tool", "tools", "role", "roles", "subject",
                "subjects", "client", "clients", "profile"}


def _strs(loc: Located, node: Any, key: str, v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        return (v,)
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return tuple(v)
    raise loc.error(node, f"{key}: expected a string or a list of strings", key)


def parse_masking(path: str | Path, data: Any, hash_key: bytes = b"") -> MaskConfig:
    """Validate one masking.yaml document (ruamel round-trip nodes) -> MaskConfig."""
    loc = Located(str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RulesError(path, line_of(data), "masking rules must be a mapping")
    loc.check_keys(data, _TOP_KEYS)
    raw_profiles = data.get("profiles") or {}
    if not isinstance(raw_profiles, dict):
        raise loc.error(data, "profiles: expected a mapping of profile name -> profile", "profiles")
    parsed: dict[str, tuple[list[Rule], dict[str, str], str | None, int | None, str]] = {}
    for pname, pnode in raw_profiles.items():
        if not isinstance(pname, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", pname):
            raise loc.error(raw_profiles, f"bad profile name {pname!r}", pname)
        parsed[pname] = _profile_parts(loc, pname, pnode, raw_profiles)
    if data.get("requests") is not None:
        # not selectable (the name cannot be a profile name): masks c2s arguments everywhere shown
        parsed[REQUESTS] = _profile_parts(loc, REQUESTS, data["requests"], data, "requests")

    profiles: dict[str, Profile] = {}

    def build(name: str, chain: tuple[str, ...]) -> Profile:
        if name in profiles:
            return profiles[name]
        rules, dets, ext, line, desc = parsed[name]
        all_rules, all_dets = list(rules), {}
        if ext is not None:
            if ext not in parsed:
                raise RulesError(path, line, f"profile {name}: extends unknown profile {ext!r}")
            if ext in chain:
                raise RulesError(path, line, f"profile {name}: extends cycle {' -> '.join(chain + (ext,))}")
            parent = build(ext, chain + (ext,))
            all_rules += parent.rules           # own rules first: first match wins
            all_dets.update(parent.detectors)
        all_dets.update(dets)
        all_dets = {k: v for k, v in all_dets.items() if v != "off"}
        all_dets = {k: all_dets[k] for k in DETECTORS if k in all_dets}  # detector priority order
        try:
            prof = Profile(name, all_rules, all_dets, hash_key, line, desc)
        except re.error as e:
            raise RulesError(path, line, f"profile {name}: invalid regular expression: {e}") from None
        profiles[name] = prof
        return prof

    for pname in parsed:
        build(pname, (pname,))
    requests = profiles.pop(REQUESTS, None)
    if not profiles:
        profiles[BUILTIN_DEFAULT] = builtin_config(hash_key).profiles[BUILTIN_DEFAULT]

    default = data.get("default_profile", BUILTIN_DEFAULT if BUILTIN_DEFAULT in profiles else None)
    if not isinstance(default, str) or default not in profiles:
        raise loc.error(data, f"default_profile must name a profile (have: {', '.join(profiles)})",
                        "default_profile" if "default_profile" in data else None)
    selectors = [_parse_selector(loc, i, s, data.get("select"), profiles)
                 for i, s in enumerate(_seq(loc, data, "select", None))]
    return MaskConfig(profiles, selectors, default, (str(path),), requests)


def _profile_parts(loc: Located, pname: str, pnode: Any, owner: Any, key: str | None = None) -> tuple:
    """(rules, detectors, extends, line, description) of one profile node (`owner[key]`)."""
    key = key or pname
    if pnode is None:
        pnode = {}
    if not isinstance(pnode, dict):
        raise loc.error(owner, f"profile {pname}: expected a mapping", key)
    loc.check_keys(pnode, _PROFILE_KEYS, context=f"profile {pname}: ")
    rules = [_parse_rule(loc, pname, i, r, pnode.get("rules"))
             for i, r in enumerate(_seq(loc, pnode, "rules", pname))]
    dets = _parse_detectors(loc, pname, pnode)
    ext = pnode.get("extends")
    if ext is not None and not isinstance(ext, str):
        raise loc.error(pnode, f"profile {pname}: extends must name a profile", "extends")
    return rules, dets, ext, line_of(owner, key), str(pnode.get("description") or "")


def _seq(loc: Located, node: dict, key: str, owner: str | None) -> list:
    v = node.get(key)
    if v is None:
        return []
    if not isinstance(v, list):
        raise loc.error(node, f"{owner + ': ' if owner else ''}{key}: expected a list", key)
    return v


def _parse_rule(loc: Located, pname: str, i: int, r: Any, seq: Any) -> Rule:
    where = f"profile {pname}, rule {i + 1}"
    if not isinstance(r, dict):
        raise RulesError(loc.file, line_of(seq, i), f"{where}: expected a mapping")
    loc.check_keys(r, _RULE_KEYS, context=f"{where}: ")
    style = r.get("style", "redact")
    if style not in STYLES:
        raise loc.error(r, f"{where}: style must be one of {', '.join(STYLES)}", "style" if "style" in r else None)
    fields_ = _strs(loc, r, "fields", r["fields"]) if "fields" in r else ()
    regex = _strs(loc, r, "regex", r["regex"]) if "regex" in r else ()
    paths: tuple[str, ...] = ()
    for key in ("path", "paths"):
        if key in r:
            paths += _strs(loc, r, key, r[key])
    if not (fields_ or regex or paths):
        raise RulesError(loc.file, line_of(seq, i), f"{where}: needs fields, regex or path")
    for rx in regex:
        try:
            re.compile(rx)
        except re.error as e:
            raise loc.error(r, f"{where}: invalid regex {rx!r}: {e}", "regex") from None
    for expr in paths:
        try:
            jsonpath_parse(expr)
        except (JsonPathLexerError, JsonPathParserError, Exception) as e:  # noqa: BLE001
            raise loc.error(r, f"{where}: invalid JSONPath {expr!r}: {e}", "path" if "path" in r else "paths") from None
    type_ = r.get("type")
    if type_ is not None and (not isinstance(type_, str) or not re.fullmatch(r"[\w.-]{1,40}", type_)):
        raise loc.error(r, f"{where}: type must be a short word (letters, digits, _ . -)", "type")
    name = str(r.get("name") or f"{pname}#{i + 1}")
    return Rule(name, style, type_, fields_, regex, paths, line_of(seq, i))


def _parse_detectors(loc: Located, pname: str, pnode: dict) -> dict[str, str]:
    if "detectors" not in pnode:
        return {}
    v = pnode["detectors"]
    if v is None or v is False or v == "off":
        return {d: "off" for d in DETECTORS}
    if isinstance(v, str):
        if v == "all" or v in DETECTOR_STYLES:
            style = "redact" if v == "all" else v
            return {d: style for d in DETECTORS}
        raise loc.error(pnode, f"profile {pname}: detectors: expected all, off, a style, a list or a mapping", "detectors")
    if isinstance(v, list):
        out = {}
        for name in v:
            if name not in DETECTORS:
                raise loc.error(pnode, f"profile {pname}: unknown detector {name!r} "
                                       f"(known: {', '.join(DETECTORS)})", "detectors")
            out[name] = "redact"
        return out
    if isinstance(v, dict):
        out = {}
        if "default" in v:
            if v["default"] not in DETECTOR_STYLES:
                raise loc.error(v, f"profile {pname}: detector style must be one of {', '.join(DETECTOR_STYLES)}", "default")
            out = {d: v["default"] for d in DETECTORS}
        for name, style in v.items():
            if name == "default":
                continue
            if name not in DETECTORS:
                raise loc.error(v, f"profile {pname}: unknown detector {name!r} (known: {', '.join(DETECTORS)})", name)
            if style not in DETECTOR_STYLES:
                raise loc.error(v, f"profile {pname}: detector style must be one of {', '.join(DETECTOR_STYLES)}", name)
            out[name] = style
        return out
    raise loc.error(pnode, f"profile {pname}: detectors: expected all, off, a style, a list or a mapping", "detectors")


def _parse_selector(loc: Located, i: int, s: Any, seq: Any, profiles: dict[str, Profile]) -> Selector:
    where = f"select rule {i + 1}"
    if not isinstance(s, dict):
        raise RulesError(loc.file, line_of(seq, i), f"{where}: expected a mapping")
    loc.check_keys(s, _SELECT_KEYS, context=f"{where}: ")
    prof = s.get("profile")
    if not isinstance(prof, str) or prof not in profiles:
        raise loc.error(s, f"{where}: profile must name a defined profile (have: {', '.join(profiles)})",
                        "profile" if "profile" in s else None)

    def get(*keys: str) -> tuple[str, ...]:
        out: tuple[str, ...] = ()
        for k in keys:
            if k in s:
                out += _strs(loc, s, k, s[k])
        return out

    return Selector(prof, str(s.get("name") or f"select#{i + 1}"), get("connection", "connections"),
                    get("tool", "tools"), get("role", "roles"), get("subject", "subjects"),
                    get("client", "clients"), line_of(seq, i))


def load_masking(rules_dir: str | Path, hash_key: bytes = b"") -> MaskConfig:
    """rules/masking.yaml (+ masking.d/*.yaml merged: later files add profiles/selectors).

    No masking.yaml at all -> the built-in default (every detector redacts)."""
    files = [f for f in rules_files(rules_dir, "masking") if f.exists()]
    if not files:
        return builtin_config(hash_key)
    merged: MaskConfig | None = None
    for f in files:
        cfg = parse_masking(f, load_yaml(f), hash_key)
        if merged is None:
            merged = cfg
            continue
        for name in cfg.profiles:
            if name in merged.profiles and name != BUILTIN_DEFAULT:
                raise RulesError(f, cfg.profiles[name].line, f"profile {name} is already defined in {merged.files[0]}")
        merged = MaskConfig({**merged.profiles, **cfg.profiles}, merged.selectors + cfg.selectors,
                            merged.default, merged.files + cfg.files)
    assert merged is not None
    return merged


def validate_dir(rules_dir: str | Path) -> list[str]:
    """Errors as `file:line: message` (for `mcp-bastion check`)."""
    try:
        load_masking(rules_dir)
    except RulesError as e:
        return [str(e)]
    return []
