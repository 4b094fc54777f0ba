"""`mcp-bastion` commands of addons.hooks.masking (moved out of the hook module: the CLI is its own layer)."""
from __future__ import annotations

from pathlib import Path
from addons.core.masking.engine import load_masking, mask_message, mask_value, validate_dir
from addons.core.record import MaskEvent
from addons.core.rules import RulesError


def add_cli(sub) -> None:
    p = sub.add_parser("mask", help="preview masking: mask a JSON-RPC message or JSON document from a file or stdin")
    p.add_argument("file", nargs="?", default="-", help="JSON file (default: stdin)")
    p.add_argument("--connection", default=None)
    p.add_argument("--tool", default=None)
    p.add_argument("--roles", default="", help="comma-separated roles")
    p.add_argument("--sub", default=None)
    p.add_argument("--profile", default=None, help="use this profile instead of selecting one")
    p.set_defaults(func=_cli_mask)
    c = sub.add_parser("mask-check", help="validate rules/masking.yaml (file:line on errors)")
    c.set_defaults(func=_cli_check)


def _cli_check(args) -> int:
    errs = validate_dir(args.rules)
    for e in errs:
        print(e)
    if not errs:
        print(f"{args.rules}: masking rules OK")
    return 1 if errs else 0


def _cli_mask(args) -> int:
    import json
    import sys

    try:
        cfg = load_masking(args.rules, b"preview-key-not-the-gateway-key")
    except RulesError as e:
        print(e, file=sys.stderr)
        return 1
    if args.profile:
        if args.profile not in cfg.profiles:
            print(f"unknown profile {args.profile!r} (have: {', '.join(cfg.profiles)})", file=sys.stderr)
            return 1
        profiles = [cfg.profiles[args.profile]]
    else:
        roles = [r for r in args.roles.split(",") if r]
        profiles = cfg.select(args.connection, args.tool, roles, args.sub)
    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    doc = json.loads(text)
    events: list[MaskEvent] = []
    for prof in profiles:
        if isinstance(doc, dict) and doc.get("jsonrpc") == "2.0":
            doc, evs = mask_message(prof, doc)
        else:
            doc, evs = mask_value(prof, doc)
        events += evs
    print(json.dumps(doc, indent=2, ensure_ascii=False))
    print(f"profiles: {', '.join(p.name for p in profiles)}", file=sys.stderr)
    for ev in events:
        print(f"masked {ev.count}x {ev.type} at {ev.path}", file=sys.stderr)
    return 0
