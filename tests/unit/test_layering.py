"""Layering: pure modules import no mitmproxy, and nothing in addons/ shadows the official
`mcp` SDK inside mitmdump (mitmproxy's script loader leaves the script's folder on sys.path)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ADDONS = ROOT / "addons"
CORE = sorted((ADDONS / "core").rglob("*.py"))
HOOKS = sorted((ADDONS / "hooks").glob("*.py"))


def imports(path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """(module, names imported from it) for every import statement in the file."""
    out: list[tuple[str, tuple[str, ...]]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, tuple(a.name for a in node.names)))
    return out


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def test_layout_has_the_three_layers():
    assert len(CORE) > 20 and len(HOOKS) > 10, (len(CORE), len(HOOKS))
    assert (ADDONS / "cli" / "__init__.py").exists()
    flat = sorted(f.name for f in ADDONS.glob("*.py") if f.name not in ("__init__.py", "bastion.py"))
    assert not flat, f"modules left in the flat addons/ folder: {flat}"


@pytest.mark.parametrize("path", CORE, ids=rel)
def test_core_imports_no_mitmproxy_hooks_or_cli(path):
    bad = sorted(m for m, _ in imports(path)
                 if m.split(".")[0] == "mitmproxy" or m.startswith(("addons.hooks", "addons.cli", "addons.bastion")))
    assert not bad, f"{rel(path)} imports {bad}: core stays free of mitmproxy and of the hook and CLI layers"


@pytest.mark.parametrize("path", HOOKS, ids=rel)
def test_hooks_do_not_reach_into_each_other(path):
    """A hook module may use another hook module's public helpers, never its internals, and
    never the CLI."""
    bad = []
    for m, names in imports(path):
        if m.startswith("addons.cli"):
            bad.append(m)
        elif m.startswith("addons.hooks."):
            bad += [f"{m}.{n}" for n in names if n.startswith("_")]
    assert not bad, f"{rel(path)} imports {bad}"


def test_layering_check_catches_a_violation(tmp_path):
    """The checks above can fail: a core module importing mitmproxy is seen."""
    f = tmp_path / "x.py"
    f.write_text("from mitmproxy import http\nfrom addons.hooks.integrity import _private\n")
    assert ("mitmproxy", ("http",)) in imports(f) and ("addons.hooks.integrity", ("_private",)) in imports(f)


def test_no_name_in_addons_shadows_an_installed_package():
    """mitmproxy's script loader puts addons/ on sys.path: none of its top-level names may
    hide an installed package (addons/mcp.py once hid the SDK)."""
    import importlib.util
    for f in ADDONS.iterdir():
        stem = f.stem if f.suffix == ".py" else f.name if f.is_dir() else None
        if stem in (None, "__init__", "__pycache__"):
            continue
        spec = importlib.util.find_spec(stem) if stem not in sys.modules else None
        assert spec is None or spec.origin is None or ADDONS in Path(spec.origin).parents, \
            f"addons/{f.name} shadows the installed package {stem} inside mitmdump"


def test_mitmdump_script_context_imports_the_sdk(tmp_path):
    """A script loaded from addons/ (as mitmdump loads addons/bastion.py) sees the SDK as `mcp`."""
    probe = ADDONS / "_probe_sdk_import.py"
    out = tmp_path / "mcp_file.txt"
    probe.write_text("import mcp, pathlib, os\n"
                     f"pathlib.Path({str(out)!r}).write_text(mcp.__file__)\n"
                     "from mitmproxy import ctx\n"
                     "def running():\n    ctx.master.shutdown()\n")
    try:
        mitmdump = Path(sys.executable).parent / "mitmdump"
        subprocess.run([str(mitmdump), "-q", "--listen-port", "0", "-s", str(probe)], cwd=ROOT, timeout=60,
                       capture_output=True)
    finally:
        probe.unlink()
    assert out.exists(), "the probe script did not run"
    assert "site-packages" in out.read_text() and Path(out.read_text()).parent.name == "mcp", out.read_text()


def test_stages_share_only_typed_record_fields():
    """Facts cross stages as typed fields of BastionRecord, not through an untyped dict, and
    no stage looks another up at run time."""
    import dataclasses

    from addons.core.record import BastionRecord
    fields = {f.name: f.type for f in dataclasses.fields(BastionRecord)}
    assert "notes" not in fields
    untyped = sorted(n for n, t in fields.items() if str(t).replace(" ", "") in ("dict", "dict[str,Any]", "Any")
                     and n != "audit_state")
    assert not untyped, f"untyped record fields: {untyped}"


def test_no_stage_looks_another_up_at_run_time():
    """Stages get what they use through their constructors (addons/bastion.py wires them). The
    one use of the master's addon registry left is the Injector registering its own Forwarder
    behind mitmweb's addons, guarded against a second registration on script reload."""
    uses = []
    for f in sorted(ADDONS.rglob("*.py")):
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if "addons.get(" in line:
                uses.append((rel(f), line.strip()))
    assert uses == [("addons/hooks/connections.py", "if ctx.master.addons.get(Forwarder.name) is None:")], uses
