"""`mcp-bastion` command line. Each module of this package contributes its subcommands
through `add_cli(subparsers)`; this file only assembles them."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Modules that contribute subcommands (each defines add_cli(subparsers)).
CLI_MODULES = (
    "addons.cli.identity",
    "addons.cli.policy",
    "addons.cli.recordings",
    "addons.cli.audit",
    "addons.cli.approvals",
    "addons.cli.connections",
    "addons.cli.vault",
    "addons.cli.masking",
    "addons.cli.integrity",
    "addons.cli.sessionkeys",
    "addons.cli.serve",
)


def default_gateway() -> str:
    """The gateway CLI commands talk to: $BASTION_GATEWAY, else the local one on
    $BASTION_PORT (where ./run.sh starts it; 8080 by default)."""
    return os.environ.get("BASTION_GATEWAY") or f"http://127.0.0.1:{os.environ.get('BASTION_PORT') or '8080'}"


def add_gateway_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gateway", default=default_gateway(),
                   help="gateway base URL (default: $BASTION_GATEWAY, else http://127.0.0.1:$BASTION_PORT, port 8080)")


def command_names() -> set[str]:
    """The CLI's subcommands (./run.sh tells them from mitmproxy options with this)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcp-bastion", description="mcp-bastion: identity-aware MCP gateway")
    parser.add_argument("--rules", default="rules", help="rules directory (default: rules)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in CLI_MODULES:
        importlib.import_module(name).add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        from addons.cli import serve
        return serve.main(argv[1:])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    rc = func(args)
    return int(rc or 0)


