"""`mcp-bastion` commands of addons.core.identity.vault (moved out of the hook module: the CLI is its own layer)."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from addons.core.identity.vault import DEFAULT_KEY, DEFAULT_VAULT, KINDS, Vault, VaultError, load_key, updating


def add_cli(sub) -> None:
    p = sub.add_parser("creds", help="per-user upstream credentials (the encrypted vault)",
                       description="Manage per-subject upstream credentials for connections with "
                                   "`credential: {vault: ...}`. Secrets are read from stdin or a file "
                                   "and never printed.")
    p.add_argument("--vault", default=DEFAULT_VAULT, help=f"vault file (default {DEFAULT_VAULT})")
    p.add_argument("--key", default=DEFAULT_KEY, help=f"vault key: file:PATH or env:NAME (default {DEFAULT_KEY})")
    cs = p.add_subparsers(dest="creds_command", metavar="ACTION", required=True)
    s = cs.add_parser("set", help="store a subject's token or API key for a connection (secret from stdin)")
    s.add_argument("--connection", required=True)
    s.add_argument("--subject", required=True, help="the caller's verified `sub`")
    s.add_argument("--kind", choices=KINDS, default="token")
    s.add_argument("--secret-file", help="read the secret from this file instead of stdin")
    s.add_argument("--expires-in", type=int, default=None, help="seconds until the entry stops being used "
                   "(oauth: until the gateway refreshes it)")
    s.add_argument("--refresh-token-file", help="kind oauth: file holding the refresh token (the access token "
                   "comes from stdin / --secret-file)")
    s.set_defaults(func=_cli_set)
    ls = cs.add_parser("list", help="subjects, connections, kinds, created / expiry / revoked times")
    ls.add_argument("--connection", default=None)
    ls.set_defaults(func=_cli_list)
    r = cs.add_parser("revoke", help="delete a subject's secret for a connection (kept as revoked)")
    r.add_argument("--connection", required=True)
    r.add_argument("--subject", required=True)
    r.set_defaults(func=_cli_revoke)


def _err(msg: str) -> int:
    print(f"mcp-bastion creds: {msg}", file=sys.stderr)
    return 1


def _cli_set(args) -> int:
    if args.expires_in is not None and args.expires_in <= 0:
        return _err("--expires-in must be positive")
    try:
        raw = Path(args.secret_file).read_text() if args.secret_file else sys.stdin.read()
    except OSError as e:
        return _err(f"cannot read the secret: {e.strerror}")
    secret = raw.strip("\r\n")
    try:
        refresh = Path(args.refresh_token_file).read_text().strip() if args.refresh_token_file else None
    except OSError as e:
        return _err(f"cannot read the refresh token: {e.strerror}")
    try:
        with updating(args.vault, load_key(args.key, create=True)) as v:
            now = time.time()
            v.put(args.connection, args.subject, secret, args.kind,
                  now + args.expires_in if args.expires_in else None, now, refresh_token=refresh)
    except (VaultError, ValueError) as e:
        return _err(str(e))
    print(f"stored {args.kind} for {args.subject} on {args.connection}")
    return 0


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else "-"


def _cli_list(args) -> int:
    try:
        v = Vault.load(args.vault, None)       # metadata needs no key
    except VaultError as e:
        return _err(str(e))
    print(f"{'connection':16} {'subject':24} {'kind':8} {'created':20} {'expires':20} revoked")
    for r in sorted(v.rows(), key=lambda r: (r["connection"], r["subject"])):
        if args.connection and r["connection"] != args.connection:
            continue
        print(f"{r['connection']:16} {r['subject']:24} {r['kind']:8} {_when(r['created']):20} "
              f"{_when(r['expires']):20} {_when(r['revoked'])}")
    return 0


def _cli_revoke(args) -> int:
    try:
        with updating(args.vault, None) as v:
            if not v.revoke(args.connection, args.subject):
                return _err(f"no active entry for {args.subject} on {args.connection}")
    except VaultError as e:
        return _err(str(e))
    print(f"revoked {args.subject} on {args.connection}")
    return 0
