"""`mcp-bastion` commands of addons.hooks.identity (moved out of the hook module: the CLI is its own layer)."""
from __future__ import annotations

from addons.core.identity import jwtverify as jv


def add_cli(sub) -> None:
    p = sub.add_parser("token", help="print a token from the gateway's embedded issuer",
                       description="Mint a bearer token signed by the embedded issuer key "
                                   "(created in the key directory on first use). Prints only the token.")
    p.add_argument("--sub", required=True, help="subject: one identity per person or job")
    p.add_argument("--roles", default="", help="comma-separated roles, e.g. analyst,ops")
    p.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    p.add_argument("--aud", default=None, help=f"audience (default {jv.DEFAULT_AUDIENCE})")
    p.add_argument("--client-id", default=None, help="client id claim (e.g. the CI job or agent)")
    p.add_argument("--key-dir", default=".secrets", help="embedded issuer key directory (default .secrets)")
    p.set_defaults(func=_cli_token)


def _cli_token(args) -> int:
    import sys
    if args.ttl <= 0 or args.ttl > 366 * 86400:
        print("mcp-bastion token: --ttl must be between 1 second and a year", file=sys.stderr)
        return 2
    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    try:
        token = jv.mint_token(args.key_dir, args.sub, roles=roles, ttl=args.ttl, aud=args.aud,
                              client_id=args.client_id)
    except (OSError, ValueError) as e:
        print(f"mcp-bastion token: {e}", file=sys.stderr)
        return 1
    print(token)
    return 0

