"""The `redaction` addon: the gateway's own secrets never reach a caller or the store.

Collects every secret the gateway holds — each connection's credential (`from: env:` /
`file:`), the embedded issuer's signing key, the masking key — into one SecretIndex
(addons/core/masking/secretscan.py), rebuilt when one of their files changes (rotation; the previous
generation stays matched too, an upstream may still echo it). Per flow it puts that index,
plus the caller's own token (added by the identity addon), on the record
(`rec.known_secrets`) and then redacts:

- every JSON-RPC message of the response (decoded strings and keys, so any JSON escaping
  is seen through), as a response transform after masking;
- the final bytes of every response — JSON or not, gateway refusals included — and of
  every SSE event as it leaves the gateway, plus response header values;
- the recorder scans every recorded event with the same indexes (addons/hooks/recorder.py).

Each hit is a `known-secret` mask event on the record (an audit row) and a log warning
naming the secret by label, never by value.
"""
from __future__ import annotations

import logging
import urllib.parse
from pathlib import Path
from typing import Any

from mitmproxy import ctx, http

from addons.core import mcpwire
from addons.core.record import BastionRecord, MaskEvent, get_record
from addons.core.rules import RulesWatch, RulesError, rules_files
from addons.core.sessionseal import KEY_FILE as SESSION_KEY_FILE
from addons.hooks.state import KEY_FILE as STATE_KEY_FILE
from addons.core.sessionseal import KeyringError, parse_keyring
from addons.core.masking.secretscan import (
    Secret, SecretIndex, StreamRedactor, find_spans, pem_secrets, redact_bytes, redact_obj, redact_str, redact_url,
)

log = logging.getLogger("bastion.redaction")

MASK_TYPE = "known-secret"


def note_hits(rec: BastionRecord, where: str, labels: set[str]) -> None:
    """Audit event for a redaction: a mask row per place, and a log line naming the secrets."""
    if not labels:
        return
    log.warning("redacted known secret(s) %s in %s (connection %s)", ", ".join(sorted(labels)), where,
                rec.connection or "-")
    rec.add_masks([MaskEvent(where, MASK_TYPE, len(labels))])


def credential_value(secret: str, scheme: str | None) -> str:
    return secret[len(scheme) + 1:] if scheme and secret.startswith(scheme + " ") else secret


def gather_secrets(rules_dir: str, key_dir: str, mask_key_file: str, audit_key_file: str = "",
                   session_keys_file: str = "", state_key_file: str = "",
                   state_url: str = "") -> tuple[list[Secret], list[Path]]:
    """Every secret value the gateway holds, and the files they come from (to watch)."""
    from addons.core.connections import load_connections
    from addons.core.identity.jwtverify import LOCAL_KEY_FILE

    secrets: list[Secret] = []
    files: list[Path] = list(rules_files(rules_dir, "connections"))
    try:
        conns = load_connections(rules_dir)
    except RulesError as e:
        log.error("known-secret redaction: connections not readable (%s); other secrets still redacted", e)
        conns = {}
    for c in conns.values():
        if c.credential is None:
            continue
        kind, _, ref = c.credential.source.partition(":")
        if kind == "file":
            p = Path(ref)
            files += [p] if p.is_absolute() else [Path(rules_dir) / p, Path.cwd() / p]
        if c.secret:
            secrets.append(Secret(f"credential of connection {c.name}",
                                  credential_value(c.secret, c.credential.scheme)))
    issuer = Path(key_dir) / LOCAL_KEY_FILE
    files.append(issuer)
    try:
        secrets += pem_secrets("issuer signing key", issuer.read_bytes())
    except OSError:
        pass                                      # no embedded issuer (JWKS / OIDC)
    if audit_key_file:
        audit = Path(audit_key_file)
        files.append(audit)
        try:
            secrets += pem_secrets("audit signing key", audit.read_bytes())
        except OSError:
            pass
    ring = Path(session_keys_file or Path(key_dir) / SESSION_KEY_FILE)
    files.append(ring)
    try:
        secrets += [Secret("session key", k) for k in parse_keyring(ring.read_text(encoding="utf-8")).secret_texts]
    except (OSError, UnicodeDecodeError, KeyringError):
        pass                                      # not created yet, or refused by the parser addon
    mask_key = Path(mask_key_file)
    files.append(mask_key)
    try:
        secrets.append(Secret("masking key", mask_key.read_text(encoding="utf-8").strip()))
    except (OSError, UnicodeDecodeError):
        pass
    state_key = Path(state_key_file or Path(key_dir) / STATE_KEY_FILE)
    files.append(state_key)
    try:
        secrets.append(Secret("state engine key", state_key.read_text(encoding="utf-8").strip()))
    except (OSError, UnicodeDecodeError):
        pass                                      # no shared state engine (or not created yet)
    password = urllib.parse.urlsplit(state_url).password if state_url else None
    if password:
        secrets.append(Secret("state engine password", urllib.parse.unquote(password)))
    return secrets, files


class SecretRedaction:
    name = "redaction"

    def __init__(self) -> None:
        self.index = SecretIndex(())
        self._generations: list[list[Secret]] = []
        self._watch = RulesWatch(self._reread)
        self._files: list[Path] = []
        self._sources: tuple[str, ...] = ("rules", ".secrets", ".secrets/mask-key", "", "", "", "")
        self._log_filter: LogRedactor | None = None

    # -- lifecycle ------------------------------------------------------------------

    def configure(self, updated) -> None:
        if updated & {"bastion_rules", "bastion_key_dir", "bastion_mask_key_file", "bastion_audit_key",
                      "bastion_session_keys", "bastion_state_key", "bastion_state"}:
            o = ctx.options
            self.reload(*(getattr(o, name) if name in o else default for name, default in (
                ("bastion_rules", "rules"), ("bastion_key_dir", ".secrets"),
                ("bastion_mask_key_file", ".secrets/mask-key"), ("bastion_audit_key", ""),
                ("bastion_session_keys", ""), ("bastion_state_key", ""), ("bastion_state", ""))))

    def running(self) -> None:
        self._watch.start()
        # the gateway's own secrets out of every log line (mitmproxy's included)
        self._log_filter = LogRedactor(self)
        for h in logging.getLogger().handlers:
            h.addFilter(self._log_filter)

    def done(self) -> None:
        self._watch.stop()
        if self._log_filter is not None:
            for h in logging.getLogger().handlers:
                h.removeFilter(self._log_filter)

    def reload(self, rules_dir: str, key_dir: str, mask_key_file: str, audit_key_file: str = "",
               session_keys_file: str = "", state_key_file: str = "", state_url: str = "") -> None:
        self._sources = (rules_dir, key_dir, mask_key_file, audit_key_file, session_keys_file, state_key_file,
                         state_url)
        secrets, self._files = gather_secrets(*self._sources)
        values = {s.value for s in secrets}
        if not self._generations or values != {s.value for s in self._generations[-1]}:
            # keep the previous generation: the old credential may still be in use upstream
            self._generations = [*self._generations[-1:], secrets]
            self.index = SecretIndex([s for g in self._generations for s in g])
            log.info("known-secret redaction: %d secret value(s) (%s)", len(self.index.labels),
                     ", ".join(sorted({s.label for s in secrets})) or "-")
        self._watch.watch(lambda: self._files)

    def check_reload(self) -> bool:
        """Rebuild the index when a secret's file changed (rotation); True if re-read."""
        return bool(self._watch.check())

    def _reread(self) -> bool:
        self.reload(*self._sources)
        return True

    # -- hooks ------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # earliest hook: every flow, refused or not, carries the index the recorder uses
        rec = get_record(flow.metadata)
        if self.index and self.index not in rec.known_secrets:
            rec.known_secrets.insert(0, self.index)

    def request(self, flow: http.HTTPFlow) -> None:
        rec = get_record(flow.metadata)
        if flow.response is not None:
            redact_request_path(flow, rec)          # refused: never forwarded, only logged
        elif rec.connection is not None and rec.known_secrets:
            rec.response_transforms.append(MessageRedactor(rec))

    def error(self, flow: http.HTTPFlow) -> None:
        redact_request_path(flow, get_record(flow.metadata))

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        rec = get_record(flow.metadata)
        resp = flow.response
        redact_request_path(flow, rec)              # forwarded already: only the log shows it now
        if resp is None or not rec.known_secrets:
            return
        self._headers(rec, resp)
        if callable(resp.stream):
            # the responses addon emits whole SSE events: redact each as it leaves
            resp.stream = EventStreamRedactor(resp.stream, rec)
        elif resp.stream:
            longest = max(i.longest for i in rec.known_secrets)
            resp.stream = ChunkStreamRedactor(StreamRedactor(rec.known_secrets, max(longest - 1, 0)), rec)

    def response(self, flow: http.HTTPFlow) -> None:
        rec = get_record(flow.metadata)
        resp = flow.response
        if resp is None or resp.stream or not rec.known_secrets:
            return
        self._headers(rec, resp)
        try:
            body = resp.get_content(strict=True)
        except ValueError:
            body = resp.raw_content     # undecodable: scan what the client gets
            if body:
                new, hit = redact_bytes(rec.known_secrets, body)
                if hit:
                    resp.headers.pop("content-encoding", None)
                    resp.content = new
                    note_hits(rec, "response body", hit)
            return
        if body and body == rec.clean_json_text:
            rec.response_body_clean = True          # exactly the text the message transform scanned
        elif body:
            new, hit = redact_bytes(rec.known_secrets, body)
            if hit:
                resp.content = new
                note_hits(rec, "response body", hit)
            else:
                rec.response_body_clean = True

    @staticmethod
    def _headers(rec: BastionRecord, resp: http.Response) -> None:
        # one scan over every value (a scan's fixed cost dwarfs a header's bytes); values
        # cannot hold a newline, so a match across two of them only costs the slow path
        if not find_spans(rec.known_secrets, b"\n".join(v for _, v in resp.headers.fields))[1]:
            return
        found: set[str] = set()
        fields = []
        for k, v in resp.headers.fields:
            nv, hit = redact_bytes(rec.known_secrets, v)
            found |= hit
            fields.append((k, nv))
        if found:
            resp.headers.fields = tuple(fields)
            note_hits(rec, "response headers", found)


def redact_request_path(flow: http.HTTPFlow, rec: BastionRecord) -> None:
    """Tokens in the URL must not reach mitmproxy's log line or the flow in mitmweb."""
    new = redact_url(flow.request.path, rec.known_secrets)
    if new != flow.request.path:
        flow.request.path = new


class LogRedactor(logging.Filter):
    """Handler filter: a log line that contains a known secret is logged redacted."""

    def __init__(self, owner: SecretRedaction):
        super().__init__()
        self.owner = owner

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is the handler's business
            return True
        new, hit = redact_str([self.owner.index], text)
        if hit:
            record.msg, record.args = new, ()
        return True


class MessageRedactor:
    """Response transform: redacts decoded strings and keys of one JSON-RPC message."""

    def __init__(self, rec: BastionRecord):
        self.rec = rec
        self.readonly = True

    def __call__(self, msg: dict) -> Any:
        # one C-speed pass over the message as JSON text first: a decoded string appears
        # there JSON-escaped, and that escaping is one of the variants searched for
        text = mcpwire.dumps(msg)
        if not find_spans(self.rec.known_secrets, text)[1]:
            self.readonly = True
            self.rec.clean_json_text = text
            return msg
        labels: set[str] = set()
        out = redact_obj(self.rec.known_secrets, msg, labels)
        self.readonly = out is msg
        note_hits(self.rec, "$ (JSON-RPC message)", labels)
        return out


class EventStreamRedactor:
    """Wraps the responses addon's stream callable (whole SSE events per output)."""

    def __init__(self, inner, rec: BastionRecord):
        self.inner = inner
        self.rec = rec

    def __call__(self, data: bytes) -> bytes:
        out = self.inner(data)
        if not isinstance(out, bytes):
            out = b"".join(out)
        new, hit = redact_bytes(self.rec.known_secrets, out)
        note_hits(self.rec, "SSE event", hit)
        self.rec.stream_chunk_clean = not hit
        return new


class ChunkStreamRedactor:
    """A raw streamed body (not parsed by the gateway): redacted across chunk boundaries."""

    def __init__(self, scanner: StreamRedactor, rec: BastionRecord):
        self.scanner = scanner
        self.rec = rec

    def __call__(self, data: bytes) -> bytes:
        out = self.scanner.feed(data, final=not data)
        if self.scanner.labels:
            note_hits(self.rec, "streamed body", self.scanner.labels)
            self.scanner.labels = set()
        return out
