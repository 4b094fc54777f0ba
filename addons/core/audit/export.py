"""Audit store rows for SIEMs: JSON lines as stored, or OCSF API Activity events. Pure.

OCSF (schema 1.3.0): class 6003 API Activity, category 6 Application Activity. One OCSF
event per store row: the caller (`actor.user`, roles as groups, client id as app, the
policy decision as `actor.authorizations`), the MCP method as `api.operation`, the
connection as `api.service`, tool / resource as `resources`, the HTTP exchange, and what
has no OCSF attribute under `unmapped`. Arguments and results are the stored ones
(masked and redacted) — an export is as safe as the store.
"""
from __future__ import annotations

import json
from typing import Any, Iterable, Iterator

OCSF_VERSION = "1.3.0"
CLASS_UID, CATEGORY_UID = 6003, 6
READS = frozenset({"resources/read", "resources/list", "resources/templates/list", "tools/list",
                   "prompts/list", "prompts/get", "server/discover"})
MAPPED = {"ts", "time", "instance", "seq", "flow_id", "session_id", "connection", "method", "target", "tool",
          "sub", "roles", "client_id", "issuer", "client_addr", "http_method", "path", "status", "rpc_id",
          "error_code", "action", "rule", "reason", "approval_outcome", "approver", "kind", "direction"}


def _activity(method: str | None) -> tuple[int, str]:
    if method in READS:
        return 2, "Read"
    return 99, method or "Other"


def _failed(row: dict) -> bool:
    return (row.get("kind") in ("error", "refusal") or row.get("action") == "deny"
            or row.get("approval_outcome") in ("denied", "timeout", "cancelled")
            or (row.get("status") or 0) >= 400)


def _severity(row: dict) -> tuple[int, str]:
    if row.get("kind") == "mask" and row.get("mask_type") == "known-secret":
        return 4, "High"          # an upstream (or a caller) tried to pass a gateway secret
    if row.get("kind") == "refusal" or row.get("action") == "deny":
        return 3, "Medium"
    return 1, "Informational"


def ocsf_event(row: dict) -> dict:
    """One store row (dict of the `events` view) as an OCSF API Activity event."""
    activity_id, activity_name = _activity(row.get("method"))
    sev_id, sev = _severity(row)
    failed = _failed(row)
    user: dict[str, Any] = {"uid": row.get("sub"), "name": row.get("sub")}
    if row.get("roles"):
        user["groups"] = [{"name": r} for r in row["roles"]]
    actor: dict[str, Any] = {"user": {k: v for k, v in user.items() if v is not None}}
    if row.get("client_id"):
        actor["app_name"] = row["client_id"]
    if row.get("kind") in ("decision", "approval", "refusal"):
        decision = row.get("action") or row.get("approval_outcome") or "deny"
        actor["authorizations"] = [{"decision": decision,
                                    "policy": {k: v for k, v in (("name", row.get("rule")),
                                                                 ("desc", row.get("reason"))) if v}}]
    ev: dict[str, Any] = {
        "class_uid": CLASS_UID, "class_name": "API Activity",
        "category_uid": CATEGORY_UID, "category_name": "Application Activity",
        "activity_id": activity_id, "activity_name": activity_name,
        "type_uid": CLASS_UID * 100 + activity_id,
        "time": int((row.get("ts") or 0) * 1000),
        "severity_id": sev_id, "severity": sev,
        "status_id": 2 if failed else 1, "status": "Failure" if failed else "Success",
        "actor": actor,
        "api": {"operation": row.get("method") or row.get("kind"),
                "service": {"name": row.get("connection") or "-"},
                **({"request": {"uid": row["rpc_id"]}} if row.get("rpc_id") else {})},
        "metadata": {"version": OCSF_VERSION, "log_name": row.get("kind"),
                     "product": {"name": "mcp-bastion", "vendor_name": "mcp-bastion"},
                     "uid": f"{row.get('instance')}:{row.get('seq')}",
                     "correlation_uid": row.get("session_id"), "logged_time": int((row.get("ts") or 0) * 1000)},
    }
    if row.get("reason"):
        ev["status_detail"] = row["reason"]
    if row.get("error_code") is not None:
        ev["status_code"] = str(row["error_code"])
    target = row.get("tool") or row.get("target")
    if target:
        ev["resources"] = [{"name": target, "type": "mcp_tool" if row.get("tool") else "mcp_target"}]
    if row.get("client_addr"):
        ip, _, port = str(row["client_addr"]).rpartition(":")
        ev["src_endpoint"] = {"ip": ip, **({"port": int(port)} if port.isdigit() else {})}
    else:
        ev["src_endpoint"] = {"name": "unknown"}
    if row.get("http_method") or row.get("path"):
        ev["http_request"] = {"http_method": row.get("http_method"), "url": {"path": row.get("path")}}
    if row.get("status") is not None:
        ev["http_response"] = {"code": row["status"]}
    unmapped = {k: v for k, v in row.items() if k not in MAPPED and v is not None}
    if unmapped:
        ev["unmapped"] = unmapped
    return ev


def export_lines(rows: Iterable[dict], fmt: str) -> Iterator[str]:
    """Rows of the events view (JSON columns decoded) as JSON lines, raw or OCSF."""
    for row in rows:
        obj = ocsf_event(row) if fmt == "ocsf" else row
        yield json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=str) + "\n"
