"""Fault injection for the fail-closed e2e test: loaded with -s BEFORE addons/bastion.py,
it makes the policy addon's request hook raise. The gateway must refuse, not forward."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import importlib  # noqa: E402

# not `import addons.policy`: mitmproxy would read the script's `addons` name as its addon list
_policy = importlib.import_module("addons.policy")


def _boom(self, flow):
    raise RuntimeError("injected fault")


_policy.Policy.request = _boom
