"""`mcp-bastion session-keys list|rotate`: the keyring that seals session ids (no key printed)."""
from __future__ import annotations

from pathlib import Path

from addons.core.sessionseal import KEY_FILE, KeyringError, load_keyring, rotate


def add_cli(sub) -> None:
    p = sub.add_parser("session-keys", help="show or rotate the keyring that seals session ids (no key is printed)")
    p.add_argument("action", choices=["list", "rotate"])
    p.add_argument("--key-dir", default=".secrets", help="key directory (default .secrets): its session-keys file")
    p.add_argument("--keys", default="", help="the keyring file, when not KEY_DIR/session-keys (bastion_session_keys)")
    p.add_argument("--keep", type=int, default=2, help="rotate: keys kept, the new one included (default 2)")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    path = Path(args.keys or Path(args.key_dir) / KEY_FILE)
    try:
        if args.action == "rotate":
            kid = rotate(path, args.keep)
            print(f"{path}: new sealing key {kid}; gateways reading this file switch within a second")
        ring = load_keyring(path, lambda m: print(f"warning: {m}"))
    except (OSError, KeyringError) as e:
        print(f"error: {e}")
        return 1
    for kid in ring.aeads:
        print(f"{kid.hex()}{'  seals' if kid == ring.current else '  opens'}")
    return 0
