"""`mcp-bastion verify` and `mcp-bastion export --format ocsf|jsonl`: prove the audit store
untampered, and hand it to a SIEM. No mitmproxy import."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from addons.core.audit.chain import DEFAULT_AUDIT_KEY, check_anchor, load_verify_key, verify_store


def add_cli(sub) -> None:
    p = sub.add_parser("verify", help="check the audit store's hash chains and signed segment manifests",
                       description="Checks every instance directory of the store: each journal line's chain "
                                   "value, each segment's signed manifest (signature, sha256, row count, link "
                                   "to the previous file). Exit 0 if intact, 1 naming the first broken record "
                                   "of each instance.")
    p.add_argument("--store", default=os.environ.get("BASTION_RECORDINGS", "recordings"),
                   help="audit store directory (default: $BASTION_RECORDINGS or recordings)")
    p.add_argument("--key", default=DEFAULT_AUDIT_KEY,
                   help="the audit signing key (private: also checks live journals) or its public key PEM "
                        f"(segments only); default {DEFAULT_AUDIT_KEY}")
    p.add_argument("--anchor", default=None,
                   help="also check against the external anchor file (bastion_audit_anchor): every anchored "
                        "segment must still be there, unchanged")
    p.set_defaults(func=cli_verify)


def cli_verify(args) -> int:
    if not Path(args.store).is_dir():
        print(f"error: no audit store at {args.store}", file=sys.stderr)
        return 2
    try:
        pub, ckey = load_verify_key(args.key)
    except (OSError, ValueError) as e:
        print(f"error: cannot load the audit key {args.key}: {e}", file=sys.stderr)
        return 2
    rep = verify_store(args.store, pub, ckey)
    if args.anchor:
        check_anchor(args.store, args.anchor, rep)
    for p in rep.problems:
        print(f"BROKEN {p}")
    summary = (f"{rep.instances} instance(s), {rep.segments} segment(s), {rep.journals} journal(s), "
               f"{rep.rows} record(s) checked")
    if rep.retired:
        summary += f", {rep.retired} segment(s) removed by retention (manifests kept)"
    if rep.unverified_journals:
        summary += f"; {rep.unverified_journals} live journal(s) NOT checked (public key only: pass the private key)"
    print(("FAILED: " if rep.problems else "OK: ") + summary)
    return 1 if rep.problems else 0
