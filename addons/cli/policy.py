"""`mcp-bastion` commands of addons.hooks.policy (moved out of the hook module: the CLI is its own layer)."""
from __future__ import annotations

import json
import os
from typing import Any
from addons.core.mcpwire import Message
from addons.core.policy.rules import (explain, load_policy)
from addons.core.record import Identity
from addons.core.rules import RulesError


def add_cli(sub) -> None:
    p = sub.add_parser("check", help="validate rules/ (exit 1 with file:line on errors)")
    p.add_argument("dir", nargs="?", help="rules directory (default: --rules)")
    p.add_argument("--secrets", default=".secrets", help="key directory whose file modes are checked too")
    p.set_defaults(func=_cli_check)
    e = sub.add_parser("explain", help="show which rule decides a call")
    e.add_argument("--sub", required=True)
    e.add_argument("--roles", default="")
    e.add_argument("--client-id")
    e.add_argument("--connection", required=True)
    e.add_argument("--method", default="tools/call")
    e.add_argument("--tool", help="tool name (or resource URI / prompt name for other methods)")
    e.add_argument("--args", default="{}", help="JSON object of arguments")
    e.add_argument("--environment", default=None,
                   help="environment (default: the connection's `environment:` in connections.yaml)")
    e.set_defaults(func=_cli_explain)


def _cli_check(args) -> int:
    d = args.dir or args.rules
    errors: list[str] = []
    from addons.core import connections
    errors += connections.validate_dir(d)
    try:
        pol = load_policy(d)
    except RulesError as e:
        errors.append(str(e))
        pol = None
    try:
        from addons.core.masking import engine as maskcore
        validate = getattr(maskcore, "validate_dir", None)
        if validate is not None:
            errors += list(validate(d))
    except ModuleNotFoundError:
        pass
    from addons.core.integrity import validate_pin_dir
    errors += validate_pin_dir(d)
    for e in errors:
        print(e)
    from addons.core.audit.chain import loose_modes
    for w in loose_modes([os.environ.get("BASTION_RECORDINGS", "recordings"), args.secrets]):
        print(w)
    if errors:
        return 1
    print(f"{d}: OK ({len(pol.rules)} policy rules, {len(pol.blocklist)} blocklist patterns)")
    return 0


def _cli_explain(args) -> int:
    try:
        pol = load_policy(args.rules)
        arguments = json.loads(args.args)
    except RulesError as e:
        print(e)
        return 1
    except json.JSONDecodeError as e:
        print(f"--args is not JSON: {e}")
        return 2
    ident = Identity(sub=args.sub, roles=tuple(r for r in args.roles.split(",") if r), client_id=args.client_id)
    params: dict[str, Any] = {}
    if args.method == "tools/call":
        params = {"name": args.tool, "arguments": arguments}
    elif args.method == "resources/read":
        params = {"uri": args.tool}
    elif args.method == "prompts/get":
        params = {"name": args.tool, "arguments": arguments}
    msg = Message(kind="request", raw={"jsonrpc": "2.0", "id": 1, "method": args.method, "params": params},
                  id=1, method=args.method)
    print(f"{args.sub} [{args.roles}] -> {args.connection} {args.method} {args.tool or ''} {args.args}")
    env = args.environment
    if env is None:
        from addons.core.connections import load_connections
        try:
            conn = load_connections(args.rules).get(args.connection)
        except RulesError:
            conn = None
        env = (conn.environment if conn is not None else None) or ""
    for line in explain(pol, ident, args.connection, msg, environment=env):
        print(line)
    return 0
