"""Self-contained MCP session ids: the id a client sees is a sealed envelope (pure, no mitmproxy).

The envelope is AES-256-GCM over (expiry, owner fingerprint, connection, upstream session
id), with the format version and key id as associated data, in URL-safe base64 without
padding (visible ASCII, as MCP requires of a session id, and plain in a query string).
Any replica holding the keyring opens it: no shared table says who owns a session, the
envelope does. Opening refuses (SealError, the caller answers 404 as for an unknown
session) a forged or altered envelope, one sealed under a key no longer in the keyring,
one presented by another identity or for another connection, and an expired one.

Keyring file: one key per line, `<kid> <key>` (8 hex digits, 64 hex digits = 32 bytes),
`#` comments. The LAST key seals; every key opens. Rotation: add a new last line (keep
the old ones until the envelopes they sealed have expired, `bastion_session_ttl`).
"""
from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from addons.core.privatefiles import private_dir, write_private
from addons.core.textsafe import get_logger

log = get_logger("bastion.sessions")

VERSION = 1
KEY_FILE = "session-keys"             # default name, next to the issuer key in bastion_key_dir
NONCE = 12
TAG = 16
FP = 16                               # bytes of the owner fingerprint kept in the envelope
MAX_UPSTREAM_ID = 256                 # longer upstream ids are not sealed (the response is refused)
MAX_CONNECTION = 255
# 1 version + 4 kid + nonce + 8 expiry + fp + 1 + connection + 1 + upstream id + tag, in base64
MAX_ENVELOPE = (1 + 4 + NONCE + 8 + FP + 1 + MAX_CONNECTION + 1 + MAX_UPSTREAM_ID + TAG) * 4 // 3 + 4
_HEADER = struct.Struct(">B4s")
_ENVELOPE_CHARS = re.compile(r"^[A-Za-z0-9_-]+$")
_LINE = re.compile(r"^([0-9a-f]{8})\s+([0-9a-f]{64})$")
_VISIBLE = re.compile(r"^[\x21-\x7e]+$")


class SealError(Exception):
    """The presented session id does not open for this caller. The message is for the log
    (it names no secret and no session id); the caller only learns "unknown session"."""


class UnknownKey(SealError):
    """Sealed under a key id this keyring does not hold (rotated out, or not loaded yet)."""


class KeyringError(Exception):
    pass


def owner_fingerprint(issuer: str | None, sub: str) -> bytes:
    """Who owns a session: the issuer and subject of the verified token (two issuers may
    use the same `sub` for different people)."""
    return hashlib.sha256(f"{issuer or ''}\0{sub}".encode()).digest()[:FP]


@dataclass(frozen=True)
class Opened:
    upstream_id: str
    expires: int


class Keyring:
    """Keys by id; the last one seals."""

    def __init__(self, keys: list[tuple[bytes, bytes]]):
        if not keys:
            raise KeyringError("the session keyring holds no key")
        self.aeads = {kid: AESGCM(key) for kid, key in keys}
        if len(self.aeads) != len(keys):
            raise KeyringError("the session keyring names one key id twice")
        self.current = keys[-1][0]
        self._secrets = tuple(key.hex() for _, key in keys)

    @property
    def secret_texts(self) -> tuple[str, ...]:
        """The keys as written in the file (for the log redactor)."""
        return self._secrets

    def seal(self, upstream_id: str, owner: bytes, connection: str, expires: int) -> str:
        if not _VISIBLE.match(upstream_id) or len(upstream_id) > MAX_UPSTREAM_ID:
            raise SealError("upstream session id is not 1-256 visible ASCII characters")
        conn, sid = connection.encode(), upstream_id.encode("ascii")
        if len(conn) > MAX_CONNECTION or len(owner) != FP:
            raise SealError("connection name or owner fingerprint out of range")
        header = _HEADER.pack(VERSION, self.current)
        nonce = os.urandom(NONCE)
        plain = struct.pack(">Q", expires) + owner + bytes([len(conn)]) + conn + sid
        sealed = self.aeads[self.current].encrypt(nonce, plain, header)
        return base64.urlsafe_b64encode(header + nonce + sealed).rstrip(b"=").decode("ascii")

    def open(self, envelope: str, owner: bytes, connection: str, now: float) -> Opened:
        if not envelope or len(envelope) > MAX_ENVELOPE or not _ENVELOPE_CHARS.match(envelope):
            raise SealError("not a session envelope (length or characters)")
        try:
            raw = base64.urlsafe_b64decode(envelope + "=" * (-len(envelope) % 4))
        except ValueError:
            raise SealError("not a session envelope (base64)") from None
        if base64.urlsafe_b64encode(raw).rstrip(b"=") != envelope.encode():
            raise SealError("not a session envelope (non-canonical base64)")   # one text per envelope
        if len(raw) < _HEADER.size + NONCE + TAG + 8 + FP + 1:
            raise SealError("not a session envelope (too short)")
        version, kid = _HEADER.unpack_from(raw)
        if version != VERSION:
            raise SealError("not a session envelope (version)")
        aead = self.aeads.get(kid)
        if aead is None:
            raise UnknownKey("session envelope sealed under a key not in the keyring")
        header, nonce, sealed = raw[:_HEADER.size], raw[_HEADER.size:_HEADER.size + NONCE], raw[_HEADER.size + NONCE:]
        try:
            plain = aead.decrypt(nonce, sealed, header)
        except InvalidTag:
            raise SealError("session envelope failed authentication (forged or altered)") from None
        expires = struct.unpack_from(">Q", plain)[0]
        fp = plain[8:8 + FP]
        n = plain[8 + FP]
        conn, sid = plain[9 + FP:9 + FP + n], plain[9 + FP + n:]
        if not secrets.compare_digest(fp, owner):
            raise SealError("session envelope presented by another identity")
        if conn != connection.encode():
            raise SealError("session envelope belongs to another connection")
        if now >= expires:
            raise SealError("session envelope expired")
        return Opened(sid.decode("ascii"), expires)


def parse_keyring(text: str, source: str = "session keyring") -> Keyring:
    keys = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if m is None:
            raise KeyringError(f"{source}:{n}: expected '<8 hex digit key id> <64 hex digit key>'")
        keys.append((bytes.fromhex(m.group(1)), bytes.fromhex(m.group(2))))
    try:
        return Keyring(keys)
    except KeyringError as e:
        raise KeyringError(f"{source}: {e}") from None


def new_key_line() -> str:
    return f"{secrets.token_hex(4)} {secrets.token_hex(32)}\n"


def load_keyring(path: str | os.PathLike, warn: Callable[[str], None] = lambda _m: None) -> Keyring:
    """The keyring at `path`, created (0600, directory 0700) with one key when missing.
    Creation never overwrites: replicas starting together on one key dir share the first."""
    p = Path(path)
    if not p.exists():
        private_dir(p.parent)
        write_private(p, ("# mcp-bastion session keys: '<kid> <key>' per line; the last seals, all open\n"
                          + new_key_line()).encode(), overwrite=False)
    with open(p, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        text = f.read().decode("utf-8", "replace")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        warn(f"session keyring {p} is readable by group/others; chmod 600 it")
    return parse_keyring(text, str(p))


class Sealer:
    """Session ids for the gateway: the keyring file (re-read when it changes; a bad file
    keeps the last good keys), owner fingerprints and the lifetime of new ids."""

    def __init__(self, path: str | os.PathLike, ttl: float, clock: Callable[[], float] = time.time):
        self.path, self.ttl, self.clock = Path(path), ttl, clock
        self.keyring = load_keyring(self.path, log.warning)   # KeyringError / OSError: refuse to start
        self._looked = float("-inf")

    def reload(self) -> None:
        """Re-read the keyring (the gateway's RulesWatch calls this when the file moved)."""
        try:
            self.keyring = load_keyring(self.path, log.warning)
            log.info("session keyring reloaded: %d key(s)", len(self.keyring.aeads))
        except (OSError, KeyringError) as e:
            log.error("session keyring reload rejected, keeping the last good keys: %s", e)

    def seal(self, upstream_id: str, issuer: str | None, sub: str, connection: str) -> str:
        return self.keyring.seal(upstream_id, owner_fingerprint(issuer, sub), connection,
                                 int(self.clock() + self.ttl))

    def open(self, envelope: str, issuer: str | None, sub: str, connection: str) -> str:
        """The upstream id; SealError when the envelope does not open for this caller.
        A key id not in the ring (another replica saw a rotation first) makes it look at
        the file once, at most every second whatever callers send."""
        owner = owner_fingerprint(issuer, sub)
        try:
            return self.keyring.open(envelope, owner, connection, self.clock()).upstream_id
        except UnknownKey:
            now = time.monotonic()
            if now - self._looked < 1.0:
                raise
            self._looked = now
            self.reload()
            return self.keyring.open(envelope, owner, connection, self.clock()).upstream_id


def rotate(path: str | os.PathLike, keep: int = 2) -> str:
    """Append a new sealing key and keep the newest `keep` keys (>= 2: envelopes sealed
    by the previous key still open). Returns the new key id."""
    if keep < 2:
        raise KeyringError("keep at least 2 keys: the previous one still opens live sessions")
    p = Path(path)
    lines = [l for l in (p.read_text().splitlines() if p.exists() else []) if _LINE.match(l.split("#", 1)[0].strip())]
    new = new_key_line()
    text = "# mcp-bastion session keys: '<kid> <key>' per line; the last seals, all open\n"
    text += "".join(l + "\n" for l in lines[-(keep - 1):]) + new
    parse_keyring(text, str(p))
    private_dir(p.parent)
    write_private(p, text.encode())
    return new.split()[0]


# ---------------------------------------------------------------- CLI
