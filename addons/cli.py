"""`mcp-bastion` command line. Each feature module contributes its subcommands
through `add_cli(subparsers)`; this file only assembles them."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that contribute subcommands (each defines add_cli(subparsers)).
CLI_MODULES = (
    "addons.identity",
    "addons.policy",
    "addons.recorder",
    "addons.audit",
    "addons.approval",
    "addons.connections",
    "addons.masking",
    "addons.integrity",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcp-bastion", description="mcp-bastion: identity-aware MCP gateway")
    parser.add_argument("--rules", default="rules", help="rules directory (default: rules)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in CLI_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue  # feature not built yet
            raise
        add = getattr(mod, "add_cli", None)
        if add is not None:
            add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    rc = func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
