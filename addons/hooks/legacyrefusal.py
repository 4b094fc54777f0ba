"""The `legacy_refusals` addon: deliver refusals to legacy HTTP+SSE clients.

On the 2024-11-05 HTTP+SSE transport a client POSTs to the messages endpoint, gets
`202 Accepted`, and reads every response from its GET event stream; it never reads the
POST body. A refusal written as the POST body (policy deny, approval denied or timed
out) would leave the client waiting forever, so for that transport the refusal travels
where the client looks:

- the refused request is replaced by a `ping` with the same JSON-RPC id (no parameters,
  no client data: every MCP server must answer it, and it has no effect),
- the ping's answer, when it arrives on the session's event stream, is replaced by the
  refusal (the request's response transforms follow its id onto the stream, see
  addons/hooks/mcpflow.py), so the caller sees exactly the error a Streamable HTTP caller sees.

The Injector forwards such a carrier only if its body is byte for byte the one built
here. Sits after the recorder (the refusal is audited as it was decided) and before the
Injector.
"""
from __future__ import annotations

import json

from mitmproxy import http

from addons.core.mcpwire import id_key
from addons.hooks.httputil import checked_snapshot
from addons.core.record import BastionRecord, get_record
from addons.core.textsafe import get_logger

log = get_logger("bastion.legacy")



def refusal_errors(body: bytes) -> dict[str, dict] | None:
    """The JSON-RPC errors of a refusal body, by id; None when it is not one."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    items = obj if isinstance(obj, list) else [obj]
    out: dict[str, dict] = {}
    for it in items:
        # an error, or a tool error result the gateway wrote (argument validation, SEP-1303)
        if not (isinstance(it, dict) and "id" in it
                and (isinstance(it.get("error"), dict)
                     or (isinstance(it.get("result"), dict) and it["result"].get("isError") is True))):
            return None
        if it["id"] is not None:
            out[id_key(it["id"])] = it
    return out


def carrier_for(rec: BastionRecord, errors: dict[str, dict]) -> bytes | None:
    """Pings with the ids of the refused requests, or None if some request has no error."""
    ids = [m.id for m in rec.messages if m.kind == "request"]
    if not ids or any(id_key(i) not in errors for i in ids):
        return None
    pings = [{"jsonrpc": "2.0", "id": i, "method": "ping"} for i in ids]
    return json.dumps(pings if rec.batch else pings[0], separators=(",", ":")).encode()


def answer_with(errors: dict[str, dict]):
    """Response transform: the answer to a carrier ping becomes the refusal."""
    def transform(message: dict) -> dict:
        err = errors.get(id_key(message.get("id"))) if "id" in message else None
        return dict(err) if err is not None and ("result" in message or "error" in message) else message
    return transform


class LegacyRefusals:
    name = "legacy_refusals"

    def request(self, flow: http.HTTPFlow) -> None:
        rec = get_record(flow.metadata)
        resp = flow.response
        if resp is None or not rec.legacy_stream or rec.refusal is None or resp.status_code != 200:
            return
        errors = refusal_errors(resp.content or b"")
        if not errors:
            return
        carrier = carrier_for(rec, errors)
        if carrier is None:
            return  # notifications only: nobody waits for an answer
        rec.response_transforms.append(answer_with(errors))
        rec.refusal_carrier = carrier
        flow.request.content = carrier
        rec.checked = checked_snapshot(flow.request)   # the carrier is what goes upstream now
        flow.response = None
        log.info("refusal for %s sent on the legacy event stream (carrier ping upstream)", rec.connection)
