"""`mcp-bastion` commands of addons.hooks.connections (moved out of the hook module: the CLI is its own layer)."""
from __future__ import annotations

from addons.core.rules import RulesError
from addons.core.connections import load_connections


def add_cli(sub) -> None:
    p = sub.add_parser("connections", help="list the registered connections (no secrets)")
    p.set_defaults(func=_cli_list)


def _cli_list(args) -> int:
    try:
        conns = load_connections(args.rules)
    except RulesError as e:
        print(e)
        return 1
    for c in conns.values():
        cred = f"{c.credential.source} -> {c.credential.header}" if c.credential else "none"
        print(f"{c.name:16} {c.transport:10} {c.origin}{c.path}  credential: {cred}")
    return 0
