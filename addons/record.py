"""The typed record each bastion addon reads and writes on flow.metadata["bastion"].

Nothing else is shared between addons (see shared/DESIGN.md). Pure: no mitmproxy import,
so policy, masking and recorder code can be tested without a flow.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from addons.mcp import Message

METADATA_KEY = "bastion"

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


@dataclass(frozen=True)
class MaskEvent:
    """One kind of masking applied to a response. Never holds the value."""

    path: str
    type: str
    count: int = 1


@dataclass
class BastionRecord:
    started: float = field(default_factory=time.time)
    connection: str | None = None          # registered connection name
    upstream_path: str | None = None       # path sent upstream
    identity: Identity | None = None
    messages: list[Message] = field(default_factory=list)   # parsed client->server messages
    batch: bool = False
    session_id: str | None = None
    protocol_version: str | None = None
    decisions: list[Decision] = field(default_factory=list)
    refusal: str | None = None             # why the gateway answered itself (refused)
    refusal_rule: str | None = None
    approval: dict[str, Any] | None = None  # outcome of an approval hold
    masks: list[MaskEvent] = field(default_factory=list)
    response_messages: list[dict] = field(default_factory=list)  # JSON-RPC messages as the caller saw them
    # Pure functions the response pipeline applies, in order, to every JSON-RPC message
    # of the response (whole JSON body or each SSE event). Registered by policy (list
    # filtering) and masking. Raising = fail closed (message replaced by an error).
    response_transforms: list[Callable[[dict], dict]] = field(default_factory=list)
    mask_required: bool = False            # unparsable response must not pass raw
    # Indexes of the secret values this flow must never show or store (gateway secrets,
    # the caller's token): addons/secretscan.SecretIndex, filled by redaction and identity.
    known_secrets: list[Any] = field(default_factory=list)
    # client->server message -> (the copy that may be shown or stored, mask events): the
    # `requests:` masking rules, set by the masking addon. The upstream gets the original.
    request_mask: Callable[[dict], tuple[dict, list]] | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def refuse(self, reason: str, rule: str | None = None) -> None:
        if self.refusal is None:
            self.refusal = reason
            self.refusal_rule = rule


def get_record(metadata: dict) -> BastionRecord:
    rec = metadata.get(METADATA_KEY)
    if rec is None:
        rec = metadata[METADATA_KEY] = BastionRecord()
    return rec
