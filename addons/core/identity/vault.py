"""The credential vault: per-subject upstream tokens and API keys, encrypted at rest.

One JSON file (default .secrets/credentials.vault, written 0600, replaced atomically).
Each entry's secret is sealed with AES-256-GCM under the vault key; the entry's
connection, subject, kind, creation and expiry times are the associated data, so an
entry cannot be moved to another subject or connection, or have its expiry extended,
by editing the file. Revoking deletes the ciphertext and keeps only the metadata (a
revoked entry cannot be restored by editing `revoked` back).

The key (32 random bytes, base64url) comes from `file:PATH` (must be 0600; created by
`mcp-bastion creds set` when missing) or `env:NAME`. No mitmproxy import.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import secrets
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION = 1
DEFAULT_VAULT = ".secrets/credentials.vault"
DEFAULT_KEY = "file:.secrets/vault.key"
KINDS = ("token", "api_key", "oauth")   # oauth: an access token with its refresh token
# a secret is sent as a header value: printable ASCII, no CR/LF
_SECRET_OK = re.compile(r"^[\x21-\x7e][\x20-\x7e]{0,16383}$")
_NAME_OK = re.compile(r"^[\x21-\x7e]{1,256}$")


class VaultError(Exception):
    """The vault or its key cannot be used (missing key, wrong key, corrupt file). Never
    carries a secret."""


class NoEntry(Exception):
    """No usable entry for (connection, subject): `why` is none, revoked or expired."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


@dataclass
class Entry:
    connection: str
    subject: str
    kind: str = "token"
    created: float = 0.0
    expires: float | None = None
    revoked: float | None = None
    nonce: str | None = None
    sealed: str | None = None

    def aad(self) -> bytes:
        return json.dumps([VERSION, self.connection, self.subject, self.kind, self.created, self.expires],
                          separators=(",", ":")).encode()


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def key_path(ref: str) -> Path | None:
    return Path(ref[5:]) if ref.startswith("file:") else None


def load_key(ref: str, create: bool = False) -> bytes:
    """`file:PATH` or `env:NAME` -> 32-byte key. VaultError says why not (no key material)."""
    kind, _, where = ref.partition(":")
    if kind == "env":
        raw = os.environ.get(where, "")
        if not raw:
            raise VaultError(f"vault key {ref}: environment variable is not set")
    elif kind == "file" and where:
        p = Path(where)
        if not p.exists() and create:
            p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(_b64(AESGCM.generate_key(bit_length=256)) + "\n")
        try:
            st = p.stat()
            raw = p.read_text().strip()
        except OSError as e:
            raise VaultError(f"vault key {ref}: cannot read ({e.strerror})") from None
        if st.st_mode & 0o077:
            raise VaultError(f"vault key {ref}: readable by other users (chmod 600)")
    else:
        raise VaultError(f"vault key must be file:PATH or env:NAME, not {ref!r}")
    try:
        key = _unb64(raw)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise VaultError(f"vault key {ref}: not 32 bytes of base64url")
    return key


class Vault:
    def __init__(self, path: str | os.PathLike, key: bytes | None, entries: dict[tuple[str, str], Entry] | None = None):
        self.path = Path(path)
        self._aead = AESGCM(key) if key is not None else None
        self.entries: dict[tuple[str, str], Entry] = entries or {}

    @classmethod
    def load(cls, path: str | os.PathLike, key: bytes | None) -> "Vault":
        p = Path(path)
        if not p.exists():
            return cls(p, key)
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
            if doc.get("version") != VERSION:
                raise VaultError(f"{p}: unsupported vault version {doc.get('version')!r}")
            entries = {}
            for raw in doc["entries"]:
                e = Entry(**raw)
                entries[(e.connection, e.subject)] = e
        except VaultError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise VaultError(f"{p}: not a readable vault ({type(e).__name__})") from None
        return cls(p, key, entries)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        doc = {"version": VERSION, "entries": [asdict(e) for e in self.entries.values()]}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".vault-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:       # mkstemp creates it 0600
                json.dump(doc, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _need_key(self) -> AESGCM:
        if self._aead is None:
            raise VaultError("no vault key")
        return self._aead

    def put(self, connection: str, subject: str, secret: str, kind: str = "token",
            expires: float | None = None, now: float | None = None, refresh_token: str | None = None) -> Entry:
        """kind oauth: `secret` is the access token and `refresh_token` is required."""
        if not _NAME_OK.match(connection) or not _NAME_OK.match(subject):
            raise ValueError("connection and subject must be printable, without spaces")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}")
        if (kind == "oauth") != (refresh_token is not None):
            raise ValueError("an oauth entry needs a refresh token, and only an oauth entry has one")
        for value in (secret, refresh_token or "x"):
            if not _SECRET_OK.match(value):
                raise ValueError("the secret must be one line of printable ASCII (it is sent as a header value)")
        aead = self._need_key()
        e = Entry(connection, subject, kind, round(now if now is not None else time.time(), 3),
                  round(expires, 3) if expires is not None else None)
        plain = json.dumps({"access_token": secret, "refresh_token": refresh_token}) if kind == "oauth" else secret
        nonce = secrets.token_bytes(12)
        e.nonce, e.sealed = _b64(nonce), _b64(aead.encrypt(nonce, plain.encode(), e.aad()))
        self.entries[(connection, subject)] = e
        return e

    def revoke(self, connection: str, subject: str, now: float | None = None) -> bool:
        e = self.entries.get((connection, subject))
        if e is None or e.revoked is not None:
            return False
        e.revoked = now if now is not None else time.time()
        e.nonce = e.sealed = None
        return True

    def lookup(self, connection: str, subject: str, now: float | None = None, margin: float = 0.0) -> str:
        """The secret, or NoEntry (none / revoked / expired); VaultError if it cannot be opened.
        An oauth entry counts as expired `margin` seconds early (time to refresh it)."""
        e = self._live(connection, subject)
        early = margin if e.kind == "oauth" else 0.0
        if e.expires is not None and e.expires - early <= (now if now is not None else time.time()):
            raise NoEntry("expired")
        plain = self._open(e)
        return json.loads(plain)["access_token"] if e.kind == "oauth" else plain

    def refresh_token(self, connection: str, subject: str) -> str | None:
        """The refresh token of a live oauth entry (expired or not), else None."""
        try:
            e = self._live(connection, subject)
        except NoEntry:
            return None
        return json.loads(self._open(e))["refresh_token"] if e.kind == "oauth" else None

    def _live(self, connection: str, subject: str) -> Entry:
        e = self.entries.get((connection, subject))
        if e is None:
            raise NoEntry("none")
        if e.revoked is not None or e.sealed is None or e.nonce is None:
            raise NoEntry("revoked")
        return e

    def _open(self, e: Entry) -> str:
        try:
            plain = self._need_key().decrypt(_unb64(e.nonce or ""), _unb64(e.sealed or ""), e.aad()).decode()
        except (InvalidTag, ValueError):
            raise VaultError(f"vault entry for {e.subject} on {e.connection} does not open with this key "
                             "(wrong key or edited file)") from None
        values = [plain]
        if e.kind == "oauth":
            try:
                doc = json.loads(plain)
                values = [doc["access_token"], doc["refresh_token"]]
            except (ValueError, KeyError, TypeError):
                values = [""]
        if not all(isinstance(v, str) and _SECRET_OK.match(v) for v in values):
            raise VaultError("vault entry holds an unusable secret")
        return plain

    def rows(self) -> list[dict]:
        """Metadata only: never a secret."""
        return [{"connection": e.connection, "subject": e.subject, "kind": e.kind, "created": e.created,
                 "expires": e.expires, "revoked": e.revoked} for e in self.entries.values()]


@contextmanager
def updating(path: str | os.PathLike, key: bytes | None) -> Iterator[Vault]:
    """Read-modify-write under an exclusive lock (<vault>.lock), so the CLI and a gateway
    refreshing a token never lose each other's changes."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(f"{p}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        v = Vault.load(p, key)
        yield v
        v.save()
    finally:
        os.close(fd)


# ---------------------------------------------------------------- CLI
