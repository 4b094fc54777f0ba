"""Which stages of addons/bastion.py's chain are usable in this checkout (pure).

Other stages are written in parallel: a module may be missing, empty or half-written.
The bench then runs a stand-in for identity/policy and says so in RESULTS.md.
"""
from __future__ import annotations

import importlib


def stage_available(modname: str, attr: str) -> bool:
    try:
        mod = importlib.import_module(modname)
    except Exception:  # noqa: BLE001 - missing or not importable yet: not available
        return False
    return hasattr(mod, attr)


def missing_stages(chain) -> set[str]:
    """Lower-cased class names (BASTION_SKIP spelling) of chain entries that cannot load."""
    return {cls.lower() for modname, cls in chain if not stage_available(modname, cls)}
