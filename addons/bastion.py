"""The mcp-bastion addon chain: `mitmdump -s addons/bastion.py`.

Order matters: route, verify, parse, decide, hold, rewrite responses,
record, and only then point the request at its upstream with the service credential.
Every addon is wrapped so that an exception refuses the flow (fail closed).
"""
from __future__ import annotations

import importlib
import logging
import os
import sys

# mitmproxy loads this file as a script; make the package importable from a checkout.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from addons.hooks.failclosed import FailClosed  # noqa: E402

log = logging.getLogger("bastion")

# (module, class) in chain order; a module that does not exist yet is skipped, but the
# Injector refuses to forward anything a missing stage should have checked.
CHAIN = (
    ("addons.hooks.connections", "Router"),
    ("addons.hooks.identity", "Identity"),
    ("addons.hooks.mcpflow", "McpParser"),
    ("addons.hooks.schemacheck", "ArgSchema"),
    ("addons.hooks.policy", "Policy"),
    ("addons.hooks.integrity", "Integrity"),
    ("addons.hooks.approval", "Approval"),
    ("addons.hooks.masking", "Masking"),
    ("addons.hooks.responses", "ResponseRewriter"),
    ("addons.hooks.redaction", "SecretRedaction"),
    ("addons.hooks.metrics", "Metrics"),
    ("addons.hooks.recorder", "Recorder"),
    ("addons.hooks.legacyrefusal", "LegacyRefusals"),
    ("addons.hooks.connections", "Injector"),
)


def build_chain(skip: frozenset[str] = frozenset()) -> list:
    out = []
    for modname, cls in CHAIN:
        if cls.lower() in skip:
            continue
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name == modname:
                continue
            raise
        out.append(FailClosed(getattr(mod, cls)()))
    return out


# BASTION_SKIP=masking,recorder switches stages off (benchmarks only; identity and policy
# cannot be skipped: the Injector refuses what they did not check).
addons = build_chain(frozenset(s.strip().lower() for s in os.environ.get("BASTION_SKIP", "").split(",") if s.strip()))
