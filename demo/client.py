"""A tiny MCP client (official SDK) for trying the gateway by hand and for tests.

    python -m demo.client URL --token TOKEN list
    python -m demo.client URL --token TOKEN call TOOL '{"arg": 1}'
    python -m demo.client URL --legacy ...     # 2024-11-05 HTTP+SSE transport (URL ends in the SSE endpoint)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from addons.core.mcpclient import connect  # noqa: F401 - re-exported: tests and docs use demo.client.connect
from addons.core.textsafe import esc


def result_json(result: Any) -> Any:
    return result.model_dump(mode="json", exclude_none=True, by_alias=True)


async def _run(args, http_errors: list[tuple[int, str]]) -> int:
    async with connect(args.url, args.token, legacy=args.legacy, mode=args.mode, http_errors=http_errors) as c:
        if args.action == "list":
            res = await c.list_tools()
            for t in res.tools:
                print(f"{t.name:20} {t.description or ''}")
            return 0
        res = await c.call_tool(args.tool, json.loads(args.arguments or "{}"))
        print(json.dumps(result_json(res), indent=2, ensure_ascii=False))
        return 1 if getattr(res, "is_error", False) or getattr(res, "isError", False) else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="demo.client")
    ap.add_argument("url")
    ap.add_argument("--token")
    ap.add_argument("--legacy", action="store_true")
    ap.add_argument("--mode", default=None, help="auto | legacy | 2026-07-28 (default: auto; legacy with --legacy)")
    sub = ap.add_subparsers(dest="action", required=True)
    sub.add_parser("list")
    c = sub.add_parser("call")
    c.add_argument("tool")
    c.add_argument("arguments", nargs="?")
    args = ap.parse_args(argv)
    http_errors: list[tuple[int, str]] = []
    try:
        return asyncio.run(_run(args, http_errors))
    except Exception as e:  # noqa: BLE001 - a CLI: say what failed
        while isinstance(e, BaseExceptionGroup) and e.exceptions:
            e = e.exceptions[0]
        print(esc(f"error: {type(e).__name__}: {e} ({args.url})"), file=sys.stderr)
        for status, body in dict.fromkeys(http_errors):   # what the gateway said, e.g. why the token is invalid
            print(esc(f"gateway answered HTTP {status}: {body}"), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
