"""`mcp-bastion` commands of addons.hooks.approval (moved out of the hook module: the CLI is its own layer)."""
from __future__ import annotations

import json
from typing import Any
from addons.cli import add_gateway_arg
from addons.core.textsafe import esc
from addons.hooks.approval import ADMIN_PREFIX


def add_cli(sub) -> None:
    def common(p):
        add_gateway_arg(p)
        p.add_argument("--token", required=True, help="the approver's bearer token (mcp-bastion token …)")
    p = sub.add_parser("approvals", help="list calls waiting for approval")
    common(p)
    p.set_defaults(func=_cli_list)
    a = sub.add_parser("approve", help="approve a held call")
    a.add_argument("id")
    common(a)
    a.set_defaults(func=lambda args: _cli_decide(args, "approve"))
    d = sub.add_parser("deny", help="deny a held call")
    d.add_argument("id")
    d.add_argument("--reason", default="", help="shown to the caller in the JSON-RPC error")
    common(d)
    d.set_defaults(func=lambda args: _cli_decide(args, "deny"))


def _call(args, method: str, path: str, body: dict | None = None) -> tuple[int, Any]:
    import httpx
    url = args.gateway.rstrip("/") + path
    try:
        r = httpx.request(method, url, json=body, timeout=10, headers={"authorization": f"Bearer {args.token}"})
    except httpx.HTTPError as e:
        return 0, {"error": f"gateway unreachable at {url} ({type(e).__name__}); "
                            "is it running? (--gateway, $BASTION_GATEWAY or $BASTION_PORT)"}
    try:
        data = r.json()
    except ValueError:
        data = {"error": r.text[:200]}
    if r.status_code != 200 and isinstance(data, dict):
        data["error_description"] = f"{data.get('error_description') or data.get('error')} ({method} {url})"
    return r.status_code, data


def _failed(status: int, data: dict) -> int:
    code = f" {status} {data['error']}" if status and data.get("error_description") else ""
    print(esc(f"error{code}: {data.get('error_description') or data.get('error')}"))
    return 1


def _cli_list(args) -> int:
    status, data = _call(args, "GET", ADMIN_PREFIX)
    if status != 200:
        return _failed(status, data)
    if not data["pending"]:
        print("no calls waiting for approval")
    for p in data["pending"]:
        calls = "; ".join(f"{c['target'] or c['method']} {json.dumps(c['arguments'], ensure_ascii=False)[:120]}"
                          for c in p["calls"])
        print(esc(f"{p['id']}  {p['requester']:12} {p['connection']:10} rule={p['rule']}  "
                  f"expires in {p['expires_in']:.0f}s  {calls}"))
    return 0


def _cli_decide(args, action: str) -> int:
    body = {"reason": args.reason} if action == "deny" else None
    status, data = _call(args, "POST", f"{ADMIN_PREFIX}/{args.id}/{action}", body)
    if status != 200:
        return _failed(status, data)
    if data["outcome"] == "pending":
        print(f"{esc(data['id'])}: approved by {esc(data['approver'])} for their part; "
              f"still waiting for an approver with role {esc(', '.join(data['waiting_for']))}")
        return 0
    print(f"{esc(data['id'])}: {esc(data['outcome'])} by {esc(data['approver'])}")
    return 0
