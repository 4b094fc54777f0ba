"""The README's walkthrough is the real output: its commands run against `./run.sh` on a
fresh copy of the repository (no .secrets, no recordings) with non-default ports
(BASTION_PORT, DEMO_PORT, BASTION_WEB_PORT), and the output must equal the README block
(ports shown as the defaults). README_UPDATE=1 rewrites the block from this run."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from tests.e2e.conftest import ROOT, free_port
from tests.e2e.procs import start_run_sh, stop

START, END = "<!-- walkthrough:start -->\n```\n", "```\n<!-- walkthrough:end -->"
DEFAULTS = {"BASTION_PORT": 8080, "DEMO_PORT": 8931, "BASTION_WEB_PORT": 8081}


def fresh_copy(dest: Path) -> Path:
    """The checkout's files as a clone has them (tracked and new, not ignored), sharing the venv."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    (dest / ".venv").symlink_to(ROOT / ".venv")
    return dest


def commands(readme: str) -> list[str]:
    block = readme[readme.index(START) + len(START):readme.index(END)]
    return [line[2:] for line in block.splitlines() if line.startswith("$ ")]


def normalise(text: str, ports: dict[str, int]) -> str:
    for name, port in ports.items():
        text = text.replace(f":{port}", f":{DEFAULTS[name]}")
    return text


def test_readme_walkthrough_matches_the_real_demo(tmp_path):
    repo = fresh_copy(tmp_path / "clone")
    ports = {name: free_port() for name in DEFAULTS}
    env = {**os.environ, **{k: str(v) for k, v in ports.items()}}
    env.pop("BASTION_GATEWAY", None)
    readme = (ROOT / "README.md").read_text()
    cmds = commands(readme)
    assert len(cmds) >= 5
    gw, banner = start_run_sh(repo, env, tmp_path / "run.log")
    try:
        assert f"127.0.0.1:{ports['BASTION_PORT']}/mcp/demo" in banner
        script = "".join(f"echo '@@@{i}'\n{cmd.replace(':8080', ':' + str(ports['BASTION_PORT']))} 2>&1\n"
                         for i, cmd in enumerate(cmds))
        out = subprocess.run(["bash", "-c", script], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    finally:
        stop(gw)
    parts = re.split(r"^@@@\d+\n", out.stdout, flags=re.M)[1:]
    assert len(parts) == len(cmds), out.stdout + out.stderr
    got = "".join(f"$ {cmd}\n{normalise(part, ports)}" for cmd, part in zip(cmds, parts))
    current = readme[readme.index(START) + len(START):readme.index(END)]
    if os.environ.get("README_UPDATE") == "1":
        (ROOT / "README.md").write_text(readme.replace(START + current + END, START + got + END))
        return
    assert got == current, "README walkthrough drifted from the real output; run with README_UPDATE=1 to regenerate"
