"""mitmweb / mitmproxy console content view "Bastion masked": the default view of an MCP
request body handled by the gateway. It shows the JSON-RPC message(s) with the tool
arguments masked by the `requests:` rules of rules/masking.yaml and the gateway's known
secrets redacted, so an approver looking at a held call does not see a password in `env`.

The flow itself keeps the real body (it is what the upstream receives once approved): the
"Raw" view, the body download and flow files written with `-w` show it. See docs/audit.md.
"""
from __future__ import annotations

import json
from typing import Any, Callable

from mitmproxy import contentviews, http

from addons.core.record import METADATA_KEY
from addons.core.masking.secretscan import redact_obj

HIDDEN = "[request body hidden: it could not be masked]"


class MaskedRequestView(contentviews.Contentview):
    name = "Bastion masked"
    syntax_highlight = "yaml"           # JSON with a comment line: YAML highlights both

    def __init__(self, config: Callable[[], Any]):
        self._config = config           # the masking addon's current MaskConfig (reloads apply)

    def render_priority(self, data: bytes, metadata: contentviews.Metadata) -> float:
        flow = metadata.flow
        rec = flow.metadata.get(METADATA_KEY) if flow is not None else None
        if rec is None or getattr(rec, "connection", None) is None:
            return -1
        if not isinstance(flow, http.HTTPFlow) or metadata.http_message is not flow.request:
            return -1
        return 100                       # above every built-in view: the default for these bodies

    def prettify(self, data: bytes, metadata: contentviews.Metadata) -> str:
        # never raises: mitmproxy would fall back to a view that shows the raw arguments
        flow = metadata.flow
        rec = flow.metadata.get(METADATA_KEY) if flow is not None else None
        try:
            return masked_body(data, self._config(), getattr(rec, "known_secrets", []))
        except Exception:  # noqa: BLE001
            return HIDDEN


def masked_body(data: bytes, config: Any, secrets: list) -> str:
    """Pure: the body of an MCP request as an approver may see it."""
    if not data:
        return ""
    doc = json.loads(data)
    items = doc if isinstance(doc, list) else [doc]
    out = []
    for item in items:
        if isinstance(item, dict) and config is not None:
            item, _ = config.mask_request(item)
        out.append(redact_obj(secrets, item) if secrets else item)
    shown = out if isinstance(doc, list) else out[0]
    return ("# arguments masked by the gateway (rules/masking.yaml `requests:`); the upstream receives "
            "the original. View \"Raw\" shows the bytes as sent.\n" + json.dumps(shown, indent=2, ensure_ascii=False))
