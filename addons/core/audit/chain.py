"""Tamper evidence for the audit store. Pure: no mitmproxy import.

- Every journal line ends with `"chain":"<hex>"`: sha256 over (chain key, previous line's
  chain, the line as written without this field). The chain runs across an instance's
  journals and segments in file order. The chain key is derived from the audit signing key,
  so a line appended, edited, removed or reordered by anyone without the key breaks it.
- Every Parquet segment gets `seg-<n>.manifest.json`: row count, previous / first / last
  chain value, the segment file's sha256, signed with the gateway's Ed25519 audit key
  (created 0600 in .secrets/ like the issuer key). Retention keeps the manifest of a
  deleted segment, re-signed as retired, so the chain still links across it.
- `verify_store` checks all of it for every instance and names the first broken record.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from addons.core.privatefiles import private_dir, write_private

GENESIS = "0" * 64
CHAIN_FIELD = b',"chain":"'
_CHAIN_TAIL = re.compile(rb',"chain":"([0-9a-f]{64})"\}$')
MANIFEST_VERSION = 1
DEFAULT_AUDIT_KEY = ".secrets/audit-signing-key.pem"


# --- keys ----------------------------------------------------------------------------------

def load_or_create_signing_key(path: str | os.PathLike) -> ed25519.Ed25519PrivateKey:
    """The audit signing key (Ed25519, PEM, 0600 in a 0700 directory), created when missing;
    never overwritten (a racing gateway keeps the first one)."""
    p = Path(path)
    if not p.exists():
        private_dir(p.parent)
        pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        write_private(p, pem, overwrite=False)
    key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{p}: the audit signing key must be an Ed25519 private key")
    return key


def load_verify_key(path: str | os.PathLike) -> tuple[ed25519.Ed25519PublicKey, bytes | None]:
    """(public key, chain key or None) from a private key PEM or a public key PEM. With only
    the public key, segments and manifests are verified but live journal chains are not."""
    data = Path(path).read_bytes()
    if b"PRIVATE KEY" in data:
        priv = serialization.load_pem_private_key(data, password=None)
        if not isinstance(priv, ed25519.Ed25519PrivateKey):
            raise ValueError(f"{path}: not an Ed25519 key")
        return priv.public_key(), chain_key(priv)
    pub = serialization.load_pem_public_key(data)
    if not isinstance(pub, ed25519.Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return pub, None


def chain_key(key: ed25519.Ed25519PrivateKey) -> bytes:
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    return hashlib.sha256(b"mcp-bastion audit chain v1\0" + raw).digest()


def key_id(pub: ed25519.Ed25519PublicKey) -> str:
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(pub: ed25519.Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


# --- the line chain ------------------------------------------------------------------------

class Chain:
    """Seals journal lines in write order. One per instance writer (its thread only)."""

    def __init__(self, key: bytes, prev: str = GENESIS):
        self._base = hashlib.sha256(key)
        self.prev = prev

    def link(self, canonical: bytes) -> str:
        h = self._base.copy()
        h.update(self.prev.encode())
        h.update(canonical)
        return h.hexdigest()

    def seal(self, line: bytes) -> bytes:
        """`{...}\\n` -> `{...,"chain":"<hex>"}\\n` (the canonical line is the input sans newline)."""
        canonical = line.rstrip(b"\n")
        self.prev = self.link(canonical)
        return canonical[:-1] + CHAIN_FIELD + self.prev.encode() + b'"}\n'


def unseal(line: bytes) -> tuple[bytes, str] | None:
    """(canonical line, its chain value), or None if the line carries no chain."""
    line = line.rstrip(b"\n")
    m = _CHAIN_TAIL.search(line)
    if m is None:
        return None
    return line[:m.start()] + b"}", m.group(1).decode()


@dataclass
class ChainCheck:
    lines: int = 0                 # non-empty lines seen
    first: str | None = None
    last: str | None = None
    broken_line: int | None = None  # 1-based line number of the first broken record
    reason: str = ""


def check_lines(lines: Iterable[bytes], key: bytes, prev: str, torn_ok: bool = True) -> ChainCheck:
    """Recompute the chain over journal lines. A last line that does not parse (torn write
    after a crash) is tolerated when torn_ok."""
    chain = Chain(key, prev)
    out = ChainCheck(last=prev)
    items = [(i, ln) for i, ln in enumerate(lines, 1) if ln.strip()]
    for pos, (no, ln) in enumerate(items):
        out.lines += 1
        parsed = unseal(ln)
        if parsed is None:
            if torn_ok and pos == len(items) - 1 and not ln.rstrip(b"\n").endswith(b"}"):
                out.lines -= 1
                break                      # torn last line: never committed
            out.broken_line, out.reason = no, "line has no chain value"
            return out
        canonical, got = parsed
        want = chain.link(canonical)
        if got != want:
            out.broken_line = no
            out.reason = ("chain mismatch: line edited, removed, reordered or inserted here"
                          if pos else "chain mismatch at the first line: a record before it was removed or "
                                      "this line was edited")
            return out
        chain.prev = got
        out.first = out.first or got
        out.last = got
    return out


# --- manifests -----------------------------------------------------------------------------

def manifest_path(segment: Path) -> Path:
    return segment.with_name(segment.name.replace(".parquet", ".manifest.json"))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _payload(m: dict) -> bytes:
    return json.dumps({k: v for k, v in m.items() if k != "signature"}, sort_keys=True,
                      separators=(",", ":")).encode()


def sign_manifest(m: dict, key: ed25519.Ed25519PrivateKey) -> dict:
    m = {k: v for k, v in m.items() if k != "signature"}
    m["key_id"] = key_id(key.public_key())
    m["signature"] = base64.b64encode(key.sign(_payload(m))).decode()
    return m


def make_manifest(segment: Path, name: str, instance: str, rows: int, check: ChainCheck, prev: str,
                  key: ed25519.Ed25519PrivateKey) -> dict:
    """Signed manifest of the segment file at `segment` (to be renamed to `name`)."""
    m = {"version": MANIFEST_VERSION, "instance": instance, "segment": name, "rows": rows,
         "prev_hash": prev, "first_hash": check.first, "last_hash": check.last or prev,
         "sha256": file_sha256(segment), "created": round(time.time(), 3),
         "journal_chain_ok": check.broken_line is None}
    if check.broken_line is not None:
        m["journal_broken_line"] = check.broken_line
        m["journal_broken_reason"] = check.reason
    return sign_manifest(m, key)


def manifest_problem(m: dict, pub: ed25519.Ed25519PublicKey) -> str | None:
    try:
        pub.verify(base64.b64decode(m.get("signature", "")), _payload(m))
    except (InvalidSignature, ValueError):
        return "manifest signature invalid (forged or edited manifest, or another key)"
    return None


def read_manifest(path: Path) -> dict | None:
    try:
        m = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def last_chain_value(d: Path, before: str | None = None) -> str:
    """Where an instance's chain continues: the last manifest's last hash (GENESIS if none);
    with `before` (a segment file name), only manifests of earlier segments count (a crash
    between writing a manifest and renaming its segment leaves one for the journal itself)."""
    last = GENESIS
    for mf in sorted(d.glob("seg-*.manifest.json")):
        if before is not None and mf.name >= before.replace(".parquet", ".manifest.json"):
            break
        m = read_manifest(mf)
        if m and isinstance(m.get("last_hash"), str):
            last = m["last_hash"]
    return last


def anchor(path: str | os.PathLike, m: dict) -> None:
    """Append a manifest's digest to an external append-only file (O_APPEND, fsynced)."""
    line = json.dumps({"time": m.get("created"), "instance": m.get("instance"), "segment": m.get("segment"),
                       "manifest_sha256": hashlib.sha256(_payload(m)).hexdigest(),
                       "last_hash": m.get("last_hash")}, separators=(",", ":")).encode() + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


# --- verification --------------------------------------------------------------------------

_FILE_NO = re.compile(r"^(?:seg|journal)-(\d{8})\.(?:parquet|jsonl|manifest\.json)$")


@dataclass
class Problem:
    file: Path
    record: str          # "line 12", "manifest", "segment", "chain link"
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.record}: {self.reason}"


@dataclass
class VerifyReport:
    problems: list[Problem]
    instances: int = 0
    segments: int = 0
    journals: int = 0
    rows: int = 0
    retired: int = 0
    unverified_journals: int = 0     # no chain key (public key only)


def verify_instance(d: Path, pub: ed25519.Ed25519PublicKey, ckey: bytes | None, rep: VerifyReport) -> None:
    numbers = sorted({int(m.group(1)) for m in (_FILE_NO.match(p.name) for p in d.iterdir()) if m})
    prev = GENESIS
    for n in numbers:
        seg, journal = d / f"seg-{n:08d}.parquet", d / f"journal-{n:08d}.jsonl"
        mf = manifest_path(seg)
        if mf.exists():
            m = read_manifest(mf)
            if m is None:
                rep.problems.append(Problem(mf, "manifest", "unreadable manifest"))
                return
            bad = manifest_problem(m, pub)
            if bad:
                rep.problems.append(Problem(mf, "manifest", bad))
                return
            if m.get("segment") != seg.name or m.get("instance") != d.name:
                rep.problems.append(Problem(mf, "manifest", f"manifest belongs to {m.get('instance')}/"
                                                            f"{m.get('segment')} (copied here)"))
                return
            if m.get("prev_hash") != prev:
                rep.problems.append(Problem(seg, "chain link", "does not continue the previous file's chain "
                                                               "(a segment or journal before it was removed, "
                                                               "replaced or reordered)"))
                return
            if seg.exists():
                rep.segments += 1
                rep.rows += int(m.get("rows") or 0)
                if file_sha256(seg) != m.get("sha256"):
                    rep.problems.append(Problem(seg, "segment", "file changed since its manifest was signed "
                                                                "(sha256 mismatch: replaced or edited)"))
                    return
            elif m.get("retired"):
                rep.retired += 1
            else:
                rep.problems.append(Problem(seg, "segment", "missing (deleted outside retention)"))
                return
            if not m.get("journal_chain_ok", True):
                rep.problems.append(Problem(seg, f"row from journal line {m.get('journal_broken_line')}",
                                            f"journal was already tampered with when rolled: "
                                            f"{m.get('journal_broken_reason')}"))
                return
            prev = m.get("last_hash") or prev
        elif seg.exists():
            rep.problems.append(Problem(seg, "segment", "no manifest (unsigned segment)"))
            return
        elif journal.exists():
            rep.journals += 1
            if ckey is None:
                rep.unverified_journals += 1
                return                      # the chain cannot continue past an unchecked journal
            with open(journal, "rb") as f:
                check = check_lines(f.read().split(b"\n"), ckey, prev)
            rep.rows += check.lines
            if check.broken_line is not None:
                rep.problems.append(Problem(journal, f"line {check.broken_line}", check.reason))
                return
            prev = check.last or prev


def verify_store(root: str | os.PathLike, pub: ed25519.Ed25519PublicKey, ckey: bytes | None) -> VerifyReport:
    """Check every instance of a store; per instance the first broken record is reported."""
    rep = VerifyReport([])
    r = Path(root)
    for d in sorted(p for p in r.iterdir() if p.is_dir() and not p.name.startswith(".")) if r.is_dir() else []:
        if not any(_FILE_NO.match(p.name) for p in d.iterdir()):
            continue
        rep.instances += 1
        verify_instance(d, pub, ckey, rep)
    return rep


def loose_modes(roots: Iterable[str | os.PathLike], limit: int = 10) -> list[str]:
    """Warnings for audit / secret files and directories that group or others can access
    (`mcp-bastion check`): directories should be 0700, files 0600."""
    out: list[str] = []
    n = 0

    def exposed(r: Path) -> Iterable[tuple[Path, int]]:
        # what lies below a directory group/others cannot enter (0700) is out of their reach
        stack = [r]
        while stack:
            p = stack.pop()
            try:
                mode = p.lstat().st_mode
            except OSError:
                continue
            if p.is_symlink():
                continue
            if mode & 0o077:
                yield p, mode
            if p.is_dir() and mode & 0o011:
                stack.extend(sorted(p.iterdir(), reverse=True))

    for root in roots:
        r = Path(root)
        if not r.exists():
            continue
        for p, mode in exposed(r):
            n += 1
            if n <= limit:
                want = "700" if p.is_dir() else "600"
                out.append(f"warning: {p} is accessible by group/others (mode {mode & 0o777:o}); chmod {want} it")
    if n > limit:
        out.append(f"warning: {n - limit} more file(s) with loose modes")
    return out


def check_anchor(root: str | os.PathLike, anchor_file: str | os.PathLike, rep: VerifyReport) -> None:
    """Every segment the anchor file lists must still have its manifest, with the same last
    chain value: catches the newest segments deleted, or a store re-sealed by the key holder."""
    r = Path(root)
    try:
        lines = Path(anchor_file).read_bytes().splitlines()
    except OSError as e:
        rep.problems.append(Problem(Path(anchor_file), "anchor", f"unreadable: {e.strerror}"))
        return
    for no, ln in enumerate(lines, 1):
        try:
            a = json.loads(ln)
            inst, seg = str(a["instance"]), str(a["segment"])
        except (ValueError, KeyError, TypeError):
            rep.problems.append(Problem(Path(anchor_file), f"line {no}", "not an anchor record"))
            return
        if not _FILE_NO.match(seg) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", inst):
            rep.problems.append(Problem(Path(anchor_file), f"line {no}", "not an anchor record"))
            return
        mf = manifest_path(r / inst / seg)
        m = read_manifest(mf)
        if m is None:
            rep.problems.append(Problem(mf, "manifest", f"missing, but anchored (anchor line {no}): "
                                                        "segment and manifest deleted"))
        elif m.get("last_hash") != a.get("last_hash"):
            rep.problems.append(Problem(mf, "manifest", f"differs from anchor line {no}: the store was "
                                                        "re-sealed after the fact"))
