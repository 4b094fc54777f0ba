"""Known-secret redaction: find the gateway's own secrets in any text, in one pass. Pure.

The gateway knows its secrets exactly (service credentials, issuer key, masking key,
the caller's token), so unlike detectors it can look for *those values* wherever they
appear: raw and in the usual encodings (base64 / base64url at every byte alignment, hex,
URL-encoding, JSON \\u escapes, reversed, separators removed). High-entropy values are
also matched by every fragment of at least MIN_FRAGMENT characters, so a secret split
across SSE events, chunks or fields is still caught as long as each piece is that long.

All variant strings go into one Aho-Corasick DFA over bytes (ahocorasick-rs, Rust): one
pass over the text whatever the number of secrets (bench/secrets_bench.py prints the
numbers; several hundred times faster than a compiled regex alternation of the same
strings). Text is scanned as UTF-8 bytes; patterns are whole UTF-8 strings, so matches
never cut a character.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable

import ahocorasick_rs

REDACTED = "[redacted:known-secret]"
REDACTED_B = REDACTED.encode()
MIN_FRAGMENT = 16      # shortest fragment of a secret that is redacted on its own
MIN_SECRET = 8         # shorter values would redact ordinary words: not registered
_SEPARATORS = re.compile(r"[^A-Za-z0-9]")


@dataclass(frozen=True)
class Secret:
    """One value to hide. `label` names it in logs and audit events; never the value."""

    label: str
    value: str | bytes               # bytes: binary key material (only its encodings are text)
    fragments: str | bytes | None = None   # high-entropy part whose fragments are matched too
                                           # (default: the whole value)


def _b64_alignments(b: bytes, alphabet: str) -> list[str]:
    """The base64 of b as it appears inside any larger base64 text (3 byte alignments)."""
    out = []
    for off in range(3):
        enc = base64.b64encode(b"\0" * off + b).decode()
        if alphabet == "url":
            enc = enc.replace("+", "-").replace("/", "_")
        skip = (0, 2, 3)[off]
        end = (8 * (off + len(b))) // 6
        if end - skip >= MIN_SECRET:
            out.append(enc[skip:end])
    return out


def _encodings(b: bytes) -> list[str]:
    """Encodings of raw bytes whose every fragment identifies the value."""
    return [*_b64_alignments(b, "std"), *_b64_alignments(b, "url"), b.hex(), b.hex().upper()]


def variants(secret: Secret) -> tuple[set[str], set[str]]:
    """(exact strings, strings whose MIN_FRAGMENT-long pieces are matched too)."""
    exact: set[str] = set()
    frag: set[str] = set()
    v = secret.value
    core = secret.fragments if secret.fragments is not None else v
    core_b = core.encode() if isinstance(core, str) else core
    frag.update(_encodings(core_b))
    if isinstance(core, str):
        frag.update((core, core[::-1], urllib.parse.quote(core, safe=""), _SEPARATORS.sub("", core)))
    if isinstance(v, str):
        b = v.encode()
        exact.update((v, v[::-1], urllib.parse.quote(v, safe=""), urllib.parse.quote_plus(v),
                      json.dumps(v)[1:-1], "".join(f"\\u{ord(c):04x}" for c in v),
                      "".join(f"\\u{ord(c):04X}" for c in v), _SEPARATORS.sub("", v)))
        exact.update(_encodings(b))
    else:
        exact.update(_encodings(v))
    return ({e for e in exact if len(e) >= MIN_SECRET}, {f for f in frag if len(f) >= MIN_SECRET})


class SecretIndex:
    """Compiled automaton over every variant of a set of secrets (immutable once built)."""

    def __init__(self, secrets: Iterable[Secret], dfa: bool = True):
        """dfa: a DFA scans ~3x faster but takes ~50 ms to build per few hundred patterns:
        right for the gateway's own secrets (built on load and rotation), not for a
        per-caller token (built on the request path)."""
        labels: list[str] = []
        words: dict[bytes, int] = {}             # pattern -> index of its secret's label
        for s in secrets:
            if len(s.value) < MIN_SECRET:
                continue
            i = len(labels)
            labels.append(s.label)
            exact, frag = variants(s)
            found = set(exact)
            for f in frag:
                if len(f) <= MIN_FRAGMENT:
                    found.add(f)
                else:
                    found.update(f[j:j + MIN_FRAGMENT] for j in range(len(f) - MIN_FRAGMENT + 1))
            for w in found:
                words.setdefault(w.encode(), i)
        self.labels: tuple[str, ...] = tuple(labels)
        self._owner = list(words.values())
        self.longest = max(map(len, words), default=0)
        impl = ahocorasick_rs.Implementation.DFA if dfa else None
        self._ac = ahocorasick_rs.BytesAhoCorasick(list(words), implementation=impl) if words else None

    def __bool__(self) -> bool:
        return self._ac is not None

    def __deepcopy__(self, memo: dict) -> "SecretIndex":
        return self          # immutable; mitmproxy deep-copies flow metadata (flow.copy())

    def __reduce__(self):
        return (SecretIndex, ((),))   # never serialise the secrets (flow files): an empty index

    def spans(self, data: bytes) -> tuple[list[tuple[int, int]], set[str]]:
        """Merged [start, end) byte ranges of secret material in data, and the labels hit."""
        if self._ac is None:
            return [], set()
        hits = self._ac.find_matches_as_indexes(data, overlapping=True)
        if not hits:
            return [], set()
        owner = self._owner
        found = {self.labels[owner[p]] for p, _, _ in hits}
        return _merge([(a, b) for _, a, b in hits]), found


def _splice(data: bytes, spans: list[tuple[int, int]]) -> bytes:
    out, pos = [], 0
    for a, b in spans:
        out.append(data[pos:a])
        out.append(REDACTED_B)
        pos = b
    out.append(data[pos:])
    return b"".join(out)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    ranges = sorted(ranges)
    merged = ranges[:1]
    for a, b in ranges[1:]:
        if a <= merged[-1][1]:                 # overlapping or adjacent pieces: one secret
            if b > merged[-1][1]:
                merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return merged


def find_spans(indexes: Iterable[SecretIndex], data: bytes) -> tuple[list[tuple[int, int]], set[str]]:
    """Merged byte ranges of every index's secrets in data, and the labels found."""
    ranges: list[tuple[int, int]] = []
    labels: set[str] = set()
    for idx in indexes:
        spans, hit = idx.spans(data)
        ranges += spans
        labels |= hit
    return (_merge(ranges) if len(ranges) > 1 else ranges), labels


def redact_bytes(indexes: Iterable[SecretIndex], data: bytes) -> tuple[bytes, set[str]]:
    """data with every known secret replaced by REDACTED; the labels found."""
    spans, labels = find_spans(indexes, data)
    return (_splice(data, spans) if spans else data), labels


def redact_str(indexes: Iterable[SecretIndex], s: str) -> tuple[str, set[str]]:
    new, labels = redact_bytes(indexes, s.encode("utf-8", "surrogatepass"))
    return (new.decode("utf-8", "surrogatepass") if labels else s), labels


def redact_obj(indexes: list[SecretIndex], obj: Any, labels: set[str] | None = None) -> Any:
    """A copy of a decoded JSON value with secrets redacted in every string and key
    (`labels` collects what was found). The input is returned as is when nothing is."""
    labels = set() if labels is None else labels
    if isinstance(obj, str):
        new, hit = redact_str(indexes, obj)
        labels |= hit
        return new
    if isinstance(obj, list):
        out = [redact_obj(indexes, v, labels) for v in obj]
        return obj if all(a is b for a, b in zip(out, obj)) else out
    if isinstance(obj, dict):
        changed = False
        d = {}
        for k, v in obj.items():
            nk = redact_obj(indexes, k, labels) if isinstance(k, str) else k
            nv = redact_obj(indexes, v, labels)
            changed = changed or nk is not k or nv is not v
            d[nk] = nv
        return d if changed else obj
    return obj


class StreamRedactor:
    """Redacts a byte stream cut at arbitrary points. Holds back the last (longest
    pattern - 1) bytes, and any match that reaches the end of what has arrived (a fragment
    may go on in the next chunk), so a secret is always replaced whole."""

    def __init__(self, indexes: list[SecretIndex], keep: int):
        self.indexes = indexes
        self.keep = keep
        self.carry = b""
        self.labels: set[str] = set()

    def feed(self, data: bytes, final: bool = False) -> bytes:
        buf = self.carry + data
        spans, _ = find_spans(self.indexes, buf)
        cut = len(buf) if final else max(0, len(buf) - self.keep)
        if not final:
            for a, b in spans:
                if b == len(buf):
                    cut = min(cut, a)          # may continue: decide with the next chunk
                elif a < cut < b:
                    cut = b                    # complete: emit it whole now
        done = [(a, b) for a, b in spans if b <= cut]
        if done:
            self.labels |= find_spans(self.indexes, buf[:cut])[1]
        self.carry = buf[cut:]
        return _splice(buf[:cut], done) if done else buf[:cut]


# --- building secrets ---------------------------------------------------------------

_JWT = re.compile(r"^[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{16,}$")


def token_secret(label: str, token: str) -> Secret:
    """A bearer token. A JWT's header and payload are shared with every token of its
    issuer (same alg, same claims): only its signature is matched by fragments."""
    if _JWT.match(token):
        return Secret(label, token, token.rsplit(".", 1)[1])
    return Secret(label, token)


def pem_secrets(label: str, pem: bytes | str) -> list[Secret]:
    """A PEM private key: its base64 body (any fragment), and the raw private value as
    JWK `d` / hex / base64 (EC, Ed25519, RSA) when the key can be loaded."""
    text = pem.decode() if isinstance(pem, bytes) else pem
    body = "".join(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("-----"))
    out = [Secret(label, body)] if body else []
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
        key = serialization.load_pem_private_key(text.encode(), password=None)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            n = (key.curve.key_size + 7) // 8
            out.append(Secret(f"{label} (d)", key.private_numbers().private_value.to_bytes(n, "big")))
        elif isinstance(key, ed25519.Ed25519PrivateKey):
            out.append(Secret(f"{label} (d)", key.private_bytes(serialization.Encoding.Raw,
                                                                 serialization.PrivateFormat.Raw,
                                                                 serialization.NoEncryption())))
        elif isinstance(key, rsa.RSAPrivateKey):
            d = key.private_numbers().d
            out.append(Secret(f"{label} (d)", d.to_bytes((d.bit_length() + 7) // 8, "big")))
    except (ValueError, TypeError, binascii.Error):
        pass                          # not a loadable key: the body alone is still matched
    return out


class TokenIndexCache:
    """Per-caller token indexes, built once per token (bounded LRU; keyed by digest)."""

    def __init__(self, size: int = 1024):
        self.size = size
        self._d: OrderedDict[bytes, SecretIndex] = OrderedDict()

    def get(self, token: str) -> SecretIndex:
        k = hashlib.sha256(token.encode()).digest()
        idx = self._d.get(k)
        if idx is None:
            idx = self._d[k] = SecretIndex([token_secret("caller token", token)], dfa=False)
            while len(self._d) > self.size:
                self._d.popitem(last=False)
        else:
            self._d.move_to_end(k)
        return idx


# --- tokens in URLs -------------------------------------------------------------------

TOKEN_PARAM = re.compile(r"token|secret|passw|key|auth|sig|code|credential|session|jwt|bearer", re.I)
JWT_SHAPE = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
URL_REDACTED = "[redacted]"


def redact_url(path: str, indexes: Iterable[SecretIndex] = ()) -> str:
    """A request path as it may be recorded or logged: query values whose name looks like
    a credential (token, access_token, jwt, key, api_key, ...), any JWT-shaped query value
    or path segment (also percent-encoded), and every known secret are replaced."""
    base, sep, query = path.partition("?")
    segs = [URL_REDACTED if JWT_SHAPE.search(urllib.parse.unquote(s)) else s for s in base.split("/")]
    out = "/".join(segs)
    if sep:
        pairs = []
        for pair in query.split("&"):
            k, eq, v = pair.partition("=")
            if eq and (TOKEN_PARAM.search(urllib.parse.unquote_plus(k))
                       or JWT_SHAPE.search(urllib.parse.unquote_plus(v))):
                pair = f"{k}={URL_REDACTED}"
            elif not eq and JWT_SHAPE.search(urllib.parse.unquote_plus(k)):
                pair = URL_REDACTED
            pairs.append(pair)
        out += "?" + "&".join(pairs)
    return redact_str(indexes, out)[0]
