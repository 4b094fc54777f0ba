"""Fault injection for e2e tests, loaded with -s BEFORE addons/bastion.py: the hook named
by BASTION_FAULT ("module:Class.hook", e.g. "addons.hooks.policy:Policy.request") raises.
The gateway must refuse or replace, never forward unchecked, and stay up."""
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

_target = os.environ["BASTION_FAULT"]
_modname, _, _attr = _target.partition(":")
_cls, _, _hook = _attr.partition(".")
# importlib, not `import addons.x`: mitmproxy would read a module-level `addons` as this
# script's addon list
_mod = importlib.import_module(_modname)


def _boom(self, *args, **kwargs):
    raise RuntimeError(f"injected fault in {_target}")


setattr(getattr(_mod, _cls), _hook, _boom)
