"""`mcp-bastion` commands of addons.hooks.integrity (moved out of the hook module: the CLI is its own layer)."""
from __future__ import annotations

import asyncio
from addons.core import integrity as ti
from addons.core.rules import RulesError


def add_cli(sub) -> None:
    p = sub.add_parser("pin", help="pin a connection's tool definitions (rules/pins/NAME.yaml), or --diff them")
    p.add_argument("connection")
    p.add_argument("--diff", action="store_true", help="show what changed since the pins were written")
    p.set_defaults(func=_cli_pin)


def _cli_pin(args) -> int:
    from addons.core.connections import load_connections
    try:
        conns = load_connections(args.rules)
        pins = ti.load_pins(args.rules, args.connection)
    except RulesError as e:
        print(e)
        return 1
    conn = conns.get(args.connection)
    if conn is None:
        print(f"no connection {args.connection!r} in {args.rules}/connections.yaml")
        return 1
    try:
        from addons.core.mcpclient import list_upstream_tools
        tools = asyncio.run(list_upstream_tools(conn))
    except Exception as e:  # noqa: BLE001 - report any transport failure plainly
        print(f"cannot list the tools of {args.connection} at {conn.origin}{conn.path}: {type(e).__name__}: {e}")
        return 1
    if args.diff:
        if pins is None:
            print(f"{args.connection} has no pins yet; run `mcp-bastion pin {args.connection}`")
            return 1
        lines = ti.diff_pins(pins, tools)
        print("\n".join(lines) if lines else f"{args.connection}: {len(tools)} tool(s), all match their pins")
        return 1 if lines else 0
    path = ti.write_pins(args.rules, args.connection, tools)
    print(f"pinned {len(tools)} tool(s) of {args.connection} in {path}")
    return 0
