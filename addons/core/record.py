"""The typed record each bastion addon reads and writes on flow.metadata["bastion"].

Nothing else is shared between addons. Pure: no mitmproxy import,
so policy, masking and recorder code can be tested without a flow.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from addons.core.mcpwire import Message

METADATA_KEY = "bastion"
MAX_MASK_EVENTS = 1024   # distinct (path, type) mask kinds kept per flow

Action = Literal["allow", "deny", "approve"]


@dataclass(frozen=True)
class Identity:
    """A verified caller. Filled by the identity addon."""

    sub: str
    roles: tuple[str, ...] = ()
    client_id: str | None = None
    token_id: str | None = None
    issuer: str | None = None


@dataclass
class Decision:
    """What policy decided for one JSON-RPC message (or a whole batch)."""

    action: Action
    rule: str | None = None          # rule name that decided; None = default deny
    reason: str = ""                 # shown to the caller on deny; never secrets
    mask_profile: str | None = None
    approvers: tuple[str, ...] = ()  # roles allowed to approve (action == "approve")
    timeout: float | None = None     # approval timeout in seconds
    message_id: Any = None           # JSON-RPC id the decision applies to
    code: int | None = None          # JSON-RPC error code of a refusal, when not the default
    # (argument, new value) the gateway forwards instead of the caller's: SQL as analysed,
    # with sensitive columns masked inside it (addons/core/sql/mask.py)
    rewrites: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class MaskEvent:
    """One kind of masking applied to a response. Never holds the value."""

    path: str
    type: str
    count: int = 1


class Transient:
    """A secret the record holds only while this flow is processed: copies of the flow
    (mitmweb duplicate, saved state) and reprs carry nothing of it."""

    __slots__ = ("value",)

    def __init__(self, value: str):
        self.value = value

    def __repr__(self) -> str:
        return "Transient([redacted])"

    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self):
        return (type(None), ())


@dataclass(frozen=True)
class CheckedRequest:
    """The request as the checks saw it. The Injector forwards only a request that still
    matches it (an edit in mitmweb, a script or a replay after the checks is refused)."""

    method: str
    scheme: str
    host: str
    port: int
    path: str
    headers_sha256: str      # every header field except Host and Content-Length, in order
    body_sha256: str         # the body as inspected (the audit's request_sha256)


@dataclass(frozen=True)
class SharedTake:
    """A rate-limit / blast-radius bucket take the policy leaves for the shared state engine
    (bastion_state set): the state stage takes it atomically, or refuses the call."""
    key: tuple                 # (kind, rule, principal[, tool])
    calls: int                 # bucket capacity
    per: float                 # seconds to refill it
    cost: int                  # tokens this call takes
    message_id: Any
    rule: str
    code: int                  # JSON-RPC error code when the bucket is empty
    why: str                   # the refusal's text


# How SDKs frame a result (compact, or json.dumps' default separators): the id in its
# canonical JSON spelling; another framing simply gets no ResultSource
_RESULT_ENVELOPES = ('{"jsonrpc":"2.0","id":%s,"result":', '{"jsonrpc": "2.0", "id": %s, "result": ')


class ResultSource:
    """The exact text of one upstream message's `result`: what follows the envelope
    `{"jsonrpc":"2.0","id":<id>,"result":` at the very start of the text it was parsed from.
    That prefix is a complete run of top-level tokens, so the rest of the text alone
    determines the result: equal digests, equal results, whatever the (per-request) id.
    The digest (computed once, on first use) keys caches of what depends only on a result:
    tools/list visibility, learned argument schemas."""

    __slots__ = ("text", "start", "_digest")

    def __init__(self, text: bytes | str, start: int) -> None:
        self.text, self.start = text, start
        self._digest: bytes | None = None

    @classmethod
    def of(cls, text: bytes | str, msg: Any) -> ResultSource | None:
        """The result text of `msg` (parsed from `text`), or None: no result, another framing,
        or a batch (its text starts with `[`)."""
        if not isinstance(msg, dict) or "result" not in msg:
            return None
        mid = msg.get("id")
        if isinstance(mid, bool) or not isinstance(mid, (int, str)):
            return None
        canon = json.dumps(mid)
        for envelope in _RESULT_ENVELOPES:
            prefix: bytes | str = envelope % canon
            if isinstance(text, bytes):
                prefix = prefix.encode()
            if text.startswith(prefix):      # type: ignore[arg-type]
                return cls(text, len(prefix))
        return None

    def digest(self) -> bytes:
        if self._digest is None:
            rest = memoryview(self.text)[self.start:] if isinstance(self.text, bytes) \
                else self.text[self.start:].encode("utf-8", "surrogatepass")
            self._digest = hashlib.sha256(rest).digest()
        return self._digest


@dataclass
class BastionRecord:
    started: float = field(default_factory=time.time)
    connection: str | None = None          # registered connection name
    upstream_path: str | None = None       # path sent upstream
    identity: Identity | None = None
    messages: list[Message] = field(default_factory=list)   # parsed client->server messages
    batch: bool = False
    session_id: str | None = None          # the upstream's session id (the client's envelope opened)
    session_envelope: str | None = None    # the sealed id the client holds (addons/core/sessionseal.py)
    session_key: tuple[str, str] | None = None  # (connection, session) this flow uses, owner checked
    session_stream: bool = False           # an open stream of session_key (keeps it from idling out)
    protocol_version: str | None = None
    decisions: list[Decision] = field(default_factory=list)
    refusal: str | None = None             # why the gateway answered itself (refused)
    refusal_rule: str | None = None
    approval: dict[str, Any] | None = None  # outcome of an approval hold
    masks: list[MaskEvent] = field(default_factory=list)
    response_messages: list[dict] = field(default_factory=list)  # JSON-RPC messages as the caller saw them
    # Written by redaction (response hook): the final JSON body was scanned with
    # known_secrets and nothing was found. Read by the recorder, which then does not scan
    # the same messages a second time when it records them.
    response_body_clean: bool = False
    # Written by redaction's SSE stream callable for each output it returns: that output was
    # scanned with known_secrets without a hit. Read (and reset) by the recorder's stream
    # callable, which wraps it, so it does not scan those messages a second time.
    stream_chunk_clean: bool = False
    # Written by redaction's message transform: the JSON text (mcpwire.dumps) of the last
    # message it scanned without a hit. Read by redaction's response hook: a final body
    # byte-identical to it was scanned already.
    clean_json_text: bytes | None = field(default=None, repr=False)
    # Pure functions the response pipeline applies, in order, to every JSON-RPC message
    # of the response (whole JSON body or each SSE event). Registered by policy (list
    # filtering) and masking. Raising = fail closed (message replaced by an error).
    response_transforms: list[Callable[[dict], dict]] = field(default_factory=list)
    mask_required: bool = False            # unparsable response must not pass raw
    # responses: the text of the result now being transformed, while the message is still
    # exactly what the upstream sent (None once a transform changed it, and between messages)
    response_source: ResultSource | None = field(default=None, repr=False)
    # The caller's verified bearer token, kept only for the Injector to exchange (RFC 8693
    # subject_token) and cleared there; never recorded, never forwarded.
    subject_token: Transient | None = field(default=None, repr=False)
    credential_kind: str | None = None     # service | exchange | vault: what went upstream (audit)
    # masks one text with this request's profiles (SSE id fields); None: nothing to mask
    mask_text: Callable[[str], str] | None = None
    # Indexes of the secret values this flow must never show or store (gateway secrets,
    # the caller's token): addons/secretscan.SecretIndex, filled by redaction and identity.
    known_secrets: list[Any] = field(default_factory=list)
    # client->server message -> (the copy that may be shown or stored, mask events): the
    # `requests:` masking rules, set by the masking addon. The upstream gets the original.
    request_mask: Callable[[dict], tuple[dict, list]] | None = None
    # --- facts one stage leaves for a later one (each names its writer and readers) ---
    auth_failure: str | None = None        # identity: why the caller was refused (audit)
    stream_checked: bool = False           # McpParser: a GET/DELETE stream request was checked (Injector)
    legacy_stream: bool = False            # Router: POST to an announced legacy HTTP+SSE endpoint
    # legacy refusals: the exact ping body that carries a refusal upstream (Injector forwards only it)
    refusal_carrier: bytes | None = field(default=None, repr=False)
    # McpParser, legacy stream: the (connection, session) request this response id answers ->
    # its response transforms (responses), and how an `endpoint` event binds the session
    pending_lookup: Callable[[Any], list | None] | None = field(default=None, repr=False)
    bind_session: Callable[[str], str | None] | None = field(default=None, repr=False)  # -> the sealed id
    response_messages_dropped: int = 0     # responses: messages not kept (limit; recorder notes it)
    mask_profiles: tuple[str, ...] = ()    # masking: the profiles chosen for this caller
    masks_dropped: int = 0                 # mask events over MAX_MASK_EVENTS (counted, not listed)
    integrity_hidden: list[str] = field(default_factory=list)   # integrity: tools hidden from tools/list
    injections: list[dict[str, Any]] = field(default_factory=list)  # integrity: injection marks found
    output_capped: dict[str, Any] | None = None   # integrity: result over max_output_chars
    injected_header: str | None = None     # Injector: the credential header name (recorder redacts it)
    metrics_counted: bool = False          # metrics: this flow is counted once
    audit_state: Any = field(default=None, repr=False)  # recorder's own per-flow state
    # the caller's Authorization header values, taken out of the flow before anything
    # (mitmweb, flow files) sees it; cleared once the identity addon has verified them
    caller_authorization: tuple[str, ...] | None = field(default=None, repr=False)
    shared_takes: list[SharedTake] = field(default_factory=list)  # policy -> state stage (bastion_state)
    checked: CheckedRequest | None = None     # fixed when the body was parsed (McpParser)
    outgoing: CheckedRequest | None = None    # as the Injector made it: host, path, no credentials
    # (header, value) the forwarder adds at the last moment, outside any flow the UI shows
    credential: tuple[str, str] | None = field(default=None, repr=False)
    _mask_index: dict[tuple[str, str], int] = field(default_factory=dict, repr=False)

    def __deepcopy__(self, memo: dict) -> None:
        # mitmproxy copies flow.metadata for flow files, exports, duplicates and replays
        # (Flow.get_state): the record holds callables and secrets and belongs to this one
        # pass through the chain, so a copy starts without one
        return None

    def add_masks(self, events: list[MaskEvent]) -> None:
        """Add events to masks, summing counts per (path, type); at most MAX_MASK_EVENTS
        kinds, the rest counted in masks_dropped."""
        for ev in events:
            k = (ev.path, ev.type)
            i = self._mask_index.get(k)
            if i is not None:
                old = self.masks[i]
                self.masks[i] = MaskEvent(old.path, old.type, old.count + ev.count)
            elif len(self.masks) < MAX_MASK_EVENTS:
                self._mask_index[k] = len(self.masks)
                self.masks.append(ev)
            else:
                self.masks_dropped += ev.count

    def refuse(self, reason: str, rule: str | None = None) -> None:
        if self.refusal is None:
            self.refusal = reason
            self.refusal_rule = rule


def get_record(metadata: dict) -> BastionRecord:
    rec = metadata.get(METADATA_KEY)
    if rec is None:
        rec = metadata[METADATA_KEY] = BastionRecord()
    return rec
