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
# modules with logic only: parsing, policy, masking, audit, identity verification, credentials
PURE = ("mcpwire", "record", "sessionseal", "rules", "policy_rules", "sqlclass", "sqlmask", "shellguard", "shellsyntax",
        "shellpolicy", "programs", "pathguard", "argschema", "maskcore", "toolintegrity", "jwtverify", "store",
        "auditchain", "auditexport", "secretscan", "privatefiles", "textsafe", "sessions", "credentials", "vault")


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("name", PURE)
def test_pure_modules_import_no_mitmproxy(name):
    bad = sorted(m for m in imported_modules(ADDONS / f"{name}.py") if m == "mitmproxy" or m.startswith("mitmproxy."))
    assert not bad, f"addons/{name}.py imports {bad}: keep it free of mitmproxy"


def test_no_module_in_addons_shadows_an_installed_package():
    import importlib.util
    for f in ADDONS.glob("*.py"):
        if f.stem in ("__init__",):
            continue
        spec = importlib.util.find_spec(f.stem) if f.stem not in sys.modules else None
        assert spec is None or spec.origin is None or Path(spec.origin).parent == ADDONS, \
            f"addons/{f.name} shadows the installed package {f.stem} inside mitmdump"


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
